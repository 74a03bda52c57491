"""Where the completion error of trained runs comes from, on a held-out synthetic store: unseen-texel MAE x 255 per
|yaw| band, split into faces the synthetic world drew occluders on and faces it did not (issue 19, section 1).

    python scripts/completion_breakdown.py --store OUT/heldout.zarr RUN [RUN ...] [--per-sample]

For each run (a run or export directory): UV_pred's and UV_spl's unseen error next to UV_bl's (the pseudo ground
truth, built under the occluder masks) and the ratio UV_pred / UV_bl, the number issue 19's completion target bounds
at 1.1. The occluder masks are not stored: they are regenerated from the store's recorded synthetic source (its
seed and config), which draws sample i the same way every time. "Unseen" is the store's ``uv_gt_mask`` complement
inside the face texels, as ``uvtrain eval`` counts it; band means weigh each face by its unseen texels, as
``uvtrain eval`` does. Prints a markdown table; ``--per-sample`` also prints one row per face.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from common.store import StoreReader
from common.synthetic import SyntheticConfig, generate
from train.bundle import layout_valid
from train.data import images_to_tensor
from train.evaluate import YAW_BANDS, completion_errors
from train.runs import open_trained, predict_uv


def occluded_faces(reader: StoreReader, store: Path) -> np.ndarray:
    """(N,) bool: the faces of a synthetic store its world drew occluders on, regenerated from the recorded source."""
    attrs = json.loads((Path(store) / "zarr.json").read_text())["attributes"]
    src = attrs["config"]["source"]
    if src.get("kind") != "synthetic":
        raise SystemExit(f"{store}: built from a {src.get('kind')!r} source; the occluder split needs a synthetic "
                         "one")
    cfg = dataclasses.replace(SyntheticConfig(**src["config"]), seed=src["seed"])
    model = reader.face_model()
    return np.array([generate(i, cfg, model).occluder_mask.any() for i in range(len(reader))])


def unseen_mae(uv: torch.Tensor, truth: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Per face: unseen-texel MAE x 255, as ``uvtrain eval`` counts it (:func:`train.evaluate.completion_errors`)."""
    total, count = completion_errors(uv, truth, seen, valid)["unseen"]
    return (total / count.clamp(min=1)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--per-sample", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    reader = StoreReader(str(args.store))
    idx = np.arange(len(reader))
    a = reader.batch(idx, ["image", "uv_bl", "uv_true", "uv_gt_mask", "pose"])
    image, truth = images_to_tensor(a["image"]), images_to_tensor(a["uv_true"])
    seen = torch.from_numpy(a["uv_gt_mask"]).unsqueeze(1) > 0.5
    valid = torch.from_numpy(layout_valid(reader))[None, None]
    errors = {"UV_bl": unseen_mae(images_to_tensor(a["uv_bl"]), truth, seen, valid)}
    for run_dir in args.runs:
        run = open_trained(run_dir)
        uv_spl, uv_pred = predict_uv(run.sampler, run.generator, image, reader.layout.uv_size)
        errors[f"{run_dir.name}: UV_spl"] = unseen_mae(uv_spl, truth, seen, valid)
        errors[f"{run_dir.name}: UV_pred"] = unseen_mae(uv_pred, truth, seen, valid)
    occluded = occluded_faces(reader, args.store)
    yaw, weight = np.abs(a["pose"][:, 0]), (~seen & valid).flatten(1).sum(1).numpy()

    names = list(errors)
    print("| \\|yaw\\| band | faces | " + " | ".join(names) + " | " +
          " | ".join(f"{n.split(':')[0]}: UV_pred / UV_bl" for n in names if n.endswith("UV_pred")) + " |")
    print("|---" * (2 + len(names) + sum(n.endswith("UV_pred") for n in names)) + "|")
    for (_, lo, hi), band in zip(YAW_BANDS, ("< 30°", "30–60°", "> 60°"), strict=True):
        for label, sel in (("all", None), ("occluded", True), ("clear", False)):
            s = (yaw >= lo) & (yaw < hi) & (True if sel is None else occluded == sel)
            if not s.any():
                continue
            mean = {n: float(np.sum(e[s] * weight[s]) / weight[s].sum()) for n, e in errors.items()}
            ratios = [mean[n] / mean["UV_bl"] for n in names if n.endswith("UV_pred")]
            print(f"| {band} {label} | {int(s.sum())} | " + " | ".join(f"{mean[n]:.1f}" for n in names) + " | " +
                  " | ".join(f"{r:.2f}" for r in ratios) + " |")
    if args.per_sample:
        print("\n| face | \\|yaw\\| | occluded | unseen texels | " + " | ".join(names) + " |")
        print("|---" * (4 + len(names)) + "|")
        for i in np.argsort(yaw):
            print(f"| {i} | {yaw[i]:.1f} | {'yes' if occluded[i] else ''} | {int(weight[i])} | " +
                  " | ".join(f"{errors[n][i]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
