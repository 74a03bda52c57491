"""Completion against truth on a synthetic store: UV_pred vs uv_true next to UV_bl, UV_bfm and a constant.

For every OK sample of a store that holds ``uv_true`` (``uvprep build --src synthetic``), runs the trained sampler
and generator of a run directory on the stored photo and reports the mean absolute error (x255) against the true
UV map on the face texels the photo saw (UV_gt's mask), on those it did not see, and on all of them; next to the
pseudo ground truth UV_bl, the texture-model fit UV_bfm (Eq. 8) and the mean colour of the observed texels.

    python scripts/eval_synthetic.py --run-dir out/demo/run --store out/demo/store.zarr [--out metrics.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from common.store import StoreReader
from train.loop import load_trained, predict_uv


def evaluate(run_dir: str, store: str, limit: int | None = None, device: str = "cpu") -> dict[str, dict[str, float]]:
    cfg, sampler, generator, step = load_trained(run_dir, device)
    reader = StoreReader(store)
    if "uv_true" not in reader.names:
        raise SystemExit(f"{store} has no uv_true: build it with --src synthetic")
    basis = reader.texture_basis()
    valid = basis.valid if basis is not None else np.ones((reader.layout.uv_size,) * 2, bool)
    idx = reader.ok_indices()[:limit]
    sums: dict[str, dict[str, float]] = {}
    counts = {"seen": 0, "unseen": 0, "all": 0}
    for lo in range(0, len(idx), 8):
        b = reader.batch(idx[lo:lo + 8], ["image", "uv_gt_mask", "uv_bl", "uv_true", "tex_coeff"])
        img = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).float().div(255)
        img = F.interpolate(img, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        _, pred = predict_uv(sampler, generator, img.to(device), reader.layout.uv_size)
        maps = {"uv_pred": pred.permute(0, 2, 3, 1).cpu().numpy(), "uv_bl": b["uv_bl"] / 255.0}
        if basis is not None:
            maps["uv_bfm"] = np.clip(basis.synthesize(b["tex_coeff"]), 0, 1)
        seen = b["uv_gt_mask"] & valid
        regions = {"seen": seen, "unseen": ~b["uv_gt_mask"] & valid, "all": np.broadcast_to(valid, seen.shape)}
        truth = b["uv_true"] / 255.0
        mean_col = (truth * seen[..., None]).sum((1, 2)) / np.maximum(seen.sum((1, 2)), 1)[:, None]  # (B, 3)
        maps["mean_colour"] = np.broadcast_to(mean_col[:, None, None, :], truth.shape)
        for name, m in maps.items():
            err = np.abs(m - truth).mean(-1) * 255
            for r, mask in regions.items():
                sums.setdefault(name, {}).setdefault(r, 0.0)
                sums[name][r] += float(err[mask].sum())
        for r, mask in regions.items():
            counts[r] += int(mask.sum())
    out = {name: {r: v / max(counts[r], 1) for r, v in d.items()} for name, d in sums.items()}
    out["_meta"] = {"samples": len(idx), "step": step, "texels": counts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = evaluate(args.run_dir, args.store, args.limit, args.device)
    meta = res.pop("_meta")
    print(f"{meta['samples']} samples, checkpoint step {meta['step']}; mean |x - uv_true| x255 on face texels")
    print(f"{'map':<12} {'seen':>8} {'unseen':>8} {'all':>8}")
    for name, d in res.items():
        print(f"{name:<12} {d['seen']:>8.1f} {d['unseen']:>8.1f} {d['all']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**res, "_meta": meta}, f, indent=2)


if __name__ == "__main__":
    main()
