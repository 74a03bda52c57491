"""``uvtrain eval``: the paper's Table 1 (Section 4.3) and completion against the truth, on any store.

For every usable sample of the store (status OK), each method gives a complete UV map U x U:

- ``generator``: UV_pred = G(UV_spl, inside) of a trained run (Section 3.2);
- ``sampler``: the sampler alone, UV_spl, with the texels it cannot sample (outside the image) filled by UV_bfm;
- ``bfm``: UV_bfm, the store's texture-basis fit (Eq. 8);
- ``bl``: UV_bl, the store's pseudo ground truth (Eq. 9 + symmetric fill).

Metrics (all at the store's working size S, images in [0, 1]):

- **Reconstruction** (Table 1): the UV map rendered at the stored shape and pose (Eq. 6), R, against the input I,
  both with everything outside the face region masked to 0 (``face_region``, the I^m of Eq. 5): ``l1`` the mean
  absolute difference over the whole masked image (the paper's protocol; the background counts as 0 error),
  ``l1_face`` the same over face pixels only, ``ssim`` the SSIM of the two masked images (``pytorch_msssim``:
  Gaussian window 11, sigma 1.5, data range 1, averaged over the image and the RGB channels).
- **Identity** (Table 1): cosine similarity of identity features (``--identity``, default dlib's descriptor;
  ``lightcnn:PATH`` for the paper's network) between the masked input and (Recon) R, (Front) the face rendered at
  yaw 0 (the pose's pitch and roll kept), each aligned by the fit's 68 landmarks at its own pose.
- **Completion** (stores with ``uv_true``: the synthetic world): mean absolute error x 255 against the true UV
  texture, over texels the photo saw (``uv_gt_mask``), did not see, and all face texels (the layout), in total and
  per yaw band |yaw| < 30, 30-60, > 60 degrees; texel-weighted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.files import sha256_file
from common.identity import load_identity
from common.store import OK, Reason, StoreReader
from train.bundle import layout_valid, read_bundle
from train.config import EvalConfig
from train.data import images_to_tensor, resize_images
from train.render import PosedMesh, render_lookup, rotated_params
from train.runs import CHECKPOINT, RunError, load_run_config, load_trained, resolve_device, sampled_inside

__all__ = ["evaluate", "reconstruction_metrics", "YAW_BANDS"]

YAW_BANDS = (("|yaw|<30", 0.0, 30.0), ("30-60", 30.0, 60.0), (">60", 60.0, 90.01))
SSIM_SETTINGS = {"implementation": "pytorch_msssim.ssim", "win_size": 11, "win_sigma": 1.5, "data_range": 1.0,
                 "K": [0.01, 0.03]}


# ------------------------------------------------------------------------------------------ metrics
def reconstruction_metrics(render: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Table 1's reconstruction columns per sample: render, image (B, 3, H, W) in [0, 1]; mask (B, 1, H, W).

    Both images are masked (zero outside ``mask``) before comparing. Returns ``l1`` (mean over the whole image),
    ``l1_face`` (mean over masked pixels) and ``ssim`` (:data:`SSIM_SETTINGS`), each (B,).
    """
    from pytorch_msssim import ssim

    if render.shape != image.shape or render.ndim != 4 or mask.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ValueError(f"expected render and image (B, 3, H, W) and mask (B, 1, H, W), found "
                         f"{tuple(render.shape)}, {tuple(image.shape)}, {tuple(mask.shape)}")
    r, i = render * mask, image * mask
    diff = (r - i).abs()
    l1 = diff.mean((1, 2, 3))
    l1_face = diff.sum((1, 2, 3)) / (3.0 * mask.sum((1, 2, 3))).clamp_min(1.0)
    s = ssim(r.float(), i.float(), data_range=SSIM_SETTINGS["data_range"], size_average=False,
             win_size=SSIM_SETTINGS["win_size"], win_sigma=SSIM_SETTINGS["win_sigma"], K=tuple(SSIM_SETTINGS["K"]))
    return {"l1": l1, "l1_face": l1_face, "ssim": s}


def completion_errors(uv: torch.Tensor, truth: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per sample (sum of |uv - truth| x 255 over texels and channels, texel count) for ``seen`` / ``unseen`` /
    ``all`` face texels. uv, truth: (B, 3, U, U) in [0, 1]; seen: (B, 1, U, U) bool; valid: (1, 1, U, U) bool."""
    err = (uv - truth).abs().mean(1, keepdim=True) * 255.0
    sets = {"seen": seen & valid, "unseen": ~seen & valid, "all": valid.expand_as(seen)}
    return {k: ((err * m).sum((1, 2, 3)), m.sum((1, 2, 3)).float()) for k, m in sets.items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=1)


# ------------------------------------------------------------------------------------------ the run
def store_fingerprint(reader: StoreReader) -> str:
    """A content fingerprint of a store: its layout, build config, face model, texture basis and source manifest."""
    a = reader.attrs
    keep = {k: a.get(k) for k in ("layout", "config", "face_model_hash", "texture_basis_hash", "manifest")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Methods:
    """Produces each method's UV maps for a batch."""

    def __init__(self, cfg: EvalConfig, reader: StoreReader, device: torch.device) -> None:
        self.cfg, self.reader, self.device = cfg, reader, device
        self.basis = reader.texture_basis()
        if self.basis is None and any(m in ("bfm", "sampler") for m in cfg.methods):
            raise RunError(f"{cfg.store} has no texture basis: methods bfm and sampler need one")
        self.sampler = self.generator = None
        if cfg.checkpoint is not None:
            ck = Path(cfg.checkpoint)
            run_dir = ck.parent if ck.is_file() else ck
            bundle = read_bundle(run_dir, load_run_config(run_dir).store)
            self.train_cfg, self.sampler, self.generator, self.step = load_trained(run_dir, str(device), bundle)
            if bundle.face_model.fingerprint() != reader.attrs.get("face_model_hash"):
                raise RunError(f"{cfg.store} was built with face model {reader.attrs.get('face_model_hash')}, the "
                               f"checkpoint was trained with {bundle.face_model.fingerprint()}: their UV layouts "
                               f"differ; build the evaluation store with the training store's face model")
            if bundle.uv_size != reader.layout.uv_size:
                raise RunError(f"{cfg.store} has UV size {reader.layout.uv_size}, the checkpoint {bundle.uv_size}")
            self.checkpoint_file = run_dir / CHECKPOINT

    def uv_bfm(self, coeff: np.ndarray) -> torch.Tensor:
        uv = np.clip(self.basis.synthesize(coeff), 0.0, 1.0)
        return torch.from_numpy(uv).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def __call__(self, name: str, b: dict) -> torch.Tensor:
        if name == "bl":
            return b["uv_bl"]
        if name == "bfm":
            return self.uv_bfm(b["tex_coeff"])
        x = resize_images(b["image"], self.train_cfg.image_size)
        uv_spl, grid = self.sampler(x, out_size=self.reader.layout.uv_size)
        inside = sampled_inside(grid)
        if name == "sampler":
            return inside * uv_spl + (1.0 - inside) * self.uv_bfm(b["tex_coeff"])
        return self.generator(uv_spl, inside).clamp(0.0, 1.0)


def _usable(reader: StoreReader, limit: int) -> tuple[np.ndarray, list[dict]]:
    status = np.asarray(reader.group["status"][...])
    reason = np.asarray(reader.group["reason"][...])
    ok = np.flatnonzero(status == OK)
    failed = [{"index": int(i), "path": str(reader.group["manifest_path"][int(i)]),
               "reason": Reason(int(reason[i])).name.lower() if int(reason[i]) in Reason._value2member_map_
               else str(int(reason[i]))} for i in np.flatnonzero(status != OK)]
    return (ok[:limit] if limit else ok), failed


def evaluate(cfg: EvalConfig, on_batch=None) -> dict:
    """Evaluate ``cfg.methods`` on the store; returns (and writes to ``cfg.out``) every number as JSON."""
    dev = resolve_device(cfg.device)
    try:
        reader = StoreReader(cfg.store)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise RunError(f"--store {cfg.store}: {e}") from None
    methods = _Methods(cfg, reader, dev)
    model = reader.face_model()
    mesh = PosedMesh(model, dev)
    s = reader.layout.image_size
    valid_t = torch.from_numpy(layout_valid(reader))[None, None].to(dev)
    ident = load_identity(cfg.identity, dev) if cfg.identity != "none" else None
    idx, failed = _usable(reader, cfg.limit)
    if len(idx) == 0:
        raise RunError(f"{cfg.store}: no usable samples (status OK) to evaluate")
    truth = reader.layout.has_truth
    names = ["image", "face_region", "params", "pose", "uv_bl", "tex_coeff", "uv_gt_mask"] + (["uv_true"] if truth
                                                                                             else [])
    per = {m: defaultdict(list) for m in cfg.methods}
    comp = {m: defaultdict(lambda: np.zeros(2)) for m in cfg.methods}
    t0 = time.perf_counter()
    for k in range(0, len(idx), cfg.batch_size):
        bi = idx[k:k + cfg.batch_size]
        b = _batch(reader, bi, names, dev)
        verts = mesh.verts(b["params"], s, s)
        grid, cover = mesh.lookup(verts, s)
        target = b["image"] * b["face"]
        points = mesh.landmarks(verts)
        front = None
        if ident is not None:
            with torch.no_grad():
                f_in = ident(target, points)
            p_front = rotated_params(b["params"].cpu().numpy(), np.zeros(len(bi)), s, model)
            v_front = mesh.verts(torch.from_numpy(p_front).to(dev), s, s)
            front = (*mesh.lookup(v_front, s), mesh.landmarks(v_front))
        yaw = b["pose"][:, 0].abs().cpu().numpy()
        for m in cfg.methods:
            uv = methods(m, b)
            render = render_lookup(uv, grid, cover)
            for key, v in reconstruction_metrics(render, b["image"], b["face"]).items():
                per[m][key] += v.tolist()
            if ident is not None:
                with torch.no_grad():
                    per[m]["id_recon"] += _cosine(ident(render * b["face"], points), f_in).tolist()
                    r_front = render_lookup(uv, front[0], front[1])
                    per[m]["id_front"] += _cosine(ident(r_front, front[2]), f_in).tolist()
            if truth:
                errs = completion_errors(uv, b["uv_true"], b["uv_gt_mask"] > 0.5, valid_t)
                for band, lo, hi in (("all", 0.0, 91.0), *YAW_BANDS):
                    sel = torch.from_numpy((yaw >= lo) & (yaw < hi)).to(dev)
                    comp[m][f"{band}/n"] += np.array([float(sel.sum()), 0.0])
                    for key, (tot, cnt) in errs.items():
                        comp[m][f"{band}/{key}"] += np.array([float(tot[sel].sum()), float(cnt[sel].sum())])
        if on_batch is not None:
            on_batch(min(k + cfg.batch_size, len(idx)), len(idx))
    result = _assemble(cfg, reader, methods, per, comp, idx, failed, time.perf_counter() - t0)
    text = json.dumps(result, indent=2)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(text)
    return json.loads(text)  # exactly what the file holds


def _batch(reader: StoreReader, idx: np.ndarray, names: list[str], dev: torch.device) -> dict[str, torch.Tensor]:
    a = reader.batch(idx, names)

    def img(x):
        return images_to_tensor(x).to(dev)

    out = {"image": img(a["image"]), "uv_bl": img(a["uv_bl"]),
           "face": torch.from_numpy(a["face_region"]).unsqueeze(1).float().to(dev),
           "params": torch.from_numpy(a["params"]).to(dev), "pose": torch.from_numpy(a["pose"]).to(dev),
           "tex_coeff": a["tex_coeff"], "uv_gt_mask": torch.from_numpy(a["uv_gt_mask"]).unsqueeze(1).float().to(dev)}
    if "uv_true" in a:
        out["uv_true"] = img(a["uv_true"])
    return out


def _assemble(cfg, reader, methods, per, comp, idx, failed, seconds) -> dict:
    out = {"store": str(cfg.store), "store_fingerprint": store_fingerprint(reader),
           "checkpoint": None if cfg.checkpoint is None else str(methods.checkpoint_file),
           "checkpoint_sha256": None if cfg.checkpoint is None else sha256_file(methods.checkpoint_file),
           "checkpoint_step": None if cfg.checkpoint is None else methods.step,
           "samples": len(idx), "failures": failed, "identity": cfg.identity, "ssim": SSIM_SETTINGS,
           "image_size": reader.layout.image_size, "uv_size": reader.layout.uv_size, "seconds": round(seconds, 2),
           "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "methods": {}}
    for m in cfg.methods:
        row = {k: float(np.mean(v)) for k, v in per[m].items()}
        row.update({f"{k}_std": float(np.std(v)) for k, v in per[m].items()})
        if comp[m]:
            c = {}
            for band in ("all", *(b[0] for b in YAW_BANDS)):
                entry = {key: (comp[m][f"{band}/{key}"][0] / comp[m][f"{band}/{key}"][1]
                               if comp[m][f"{band}/{key}"][1] > 0 else None) for key in ("seen", "unseen", "all")}
                entry["samples"] = int(comp[m][f"{band}/n"][0])
                c[band] = entry
            row["completion_mae_255"] = c
        out["methods"][m] = row
    return out
