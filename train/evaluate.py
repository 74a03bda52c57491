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
import os
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.files import check_output_file, sha256_file
from common.identity import load_identity
from common.store import OK, StoreReader, reason_name
from train.bundle import layout_valid
from train.config import EvalConfig
from train.data import images_to_tensor, resize_images
from train.render import PosedMesh, render_lookup, rotated_params
from train.runs import (
    RunError,
    open_trained,
    resolve_device,
    sampled_inside,
)

__all__ = ["Evaluator", "UVMethods", "check_compatible", "evaluate", "reconstruction_metrics",
           "usable_samples", "YAW_BANDS"]

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


class UVMethods:
    """Each method's UV maps (B, 3, U, U) in [0, 1] for a batch of a store, from networks in memory.

    sampler, generator: the networks (eval mode is the caller's business), or None for the store-only methods;
    image_size: the side the sampler's input is resized to; basis: the store's texture basis (``bfm`` and the
    ``sampler`` fill need it)."""

    def __init__(self, reader: StoreReader, device: torch.device, sampler=None, generator=None,
                 image_size: int = 0, basis=None) -> None:
        self.reader, self.device, self.basis = reader, device, basis
        self.sampler, self.generator, self.image_size = sampler, generator, image_size

    def uv_bfm(self, coeff: np.ndarray) -> torch.Tensor:
        uv = np.clip(self.basis.synthesize(coeff), 0.0, 1.0)
        return torch.from_numpy(uv).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def __call__(self, name: str, b: dict) -> torch.Tensor:
        if name == "bl":
            return b["uv_bl"]
        if name == "bfm":
            return self.uv_bfm(b["tex_coeff"])
        x = resize_images(b["image"], self.image_size)
        uv_spl, grid = self.sampler(x, out_size=self.reader.layout.uv_size)
        inside = sampled_inside(grid)
        if name == "sampler":
            return inside * uv_spl + (1.0 - inside) * self.uv_bfm(b["tex_coeff"])
        return self.generator(uv_spl, inside, grid=grid).clamp(0.0, 1.0)


def check_compatible(reader: StoreReader, where: str, face_model_hash: str, uv_size: int, what: str) -> None:
    """A RunError unless the store ``where`` has the face model (hence UV layout) and UV size of ``what``."""
    if face_model_hash != reader.attrs.get("face_model_hash"):
        raise RunError(f"{where} was built with face model {reader.attrs.get('face_model_hash')}, {what} was "
                       f"trained with {face_model_hash}: their UV layouts differ; build the evaluation store with "
                       f"the training store's face model")
    if uv_size != reader.layout.uv_size:
        raise RunError(f"{where} has UV size {reader.layout.uv_size}, {what} {uv_size}; build it with "
                       f"--uv-size {uv_size}")


def _checkpoint_methods(cfg: EvalConfig, reader: StoreReader, device: torch.device) -> UVMethods:
    """The methods of ``cfg`` on ``reader``, with the networks of ``cfg.checkpoint`` when given."""
    basis = reader.texture_basis()
    if basis is None and any(m in ("bfm", "sampler") for m in cfg.methods):
        raise RunError(f"{cfg.store} has no texture basis: methods bfm and sampler need one")
    methods = UVMethods(reader, device, basis=basis)
    methods.checkpoint_file = methods.step = None
    if cfg.checkpoint is not None:
        run = open_trained(Path(cfg.checkpoint), str(device))
        methods.checkpoint_file, methods.sampler, methods.generator, methods.step = (run.weights, run.sampler,
                                                                                     run.generator, run.step)
        methods.image_size = run.config.image_size
        check_compatible(reader, cfg.store, run.bundle.face_model.fingerprint(), run.bundle.uv_size, "the checkpoint")
    return methods


def usable_samples(reader: StoreReader, limit: int = 0) -> tuple[np.ndarray, list[dict]]:
    """(indices of the usable samples (status OK), the first ``limit`` when > 0; the unusable ones with their
    manifest path and reason)."""
    status = reader.checked_status()  # a completed chunk whose status reads PENDING is refused, not skipped
    reason = np.asarray(reader.group["reason"][...])
    ok = np.flatnonzero(status == OK)
    failed = [{"index": int(i), "path": str(reader.group["manifest_path"][int(i)]), "reason": reason_name(reason[i])}
              for i in np.flatnonzero(status != OK)]
    return (ok[:limit] if limit else ok), failed


class Evaluator:
    """Table 1's and the completion metrics of UV maps, accumulated over samples of one store.

    identity: the network of the ID Recon / Front columns (None: no identity columns)."""

    def __init__(self, reader: StoreReader, device: torch.device, identity: torch.nn.Module | None = None) -> None:
        self.reader, self.device, self.identity = reader, device, identity
        self.model = reader.face_model()
        self.mesh = PosedMesh(self.model, device)
        self.valid = torch.from_numpy(layout_valid(reader))[None, None].to(device)
        self.truth = reader.layout.has_truth
        self.names = ["image", "face_region", "params", "pose", "uv_bl", "tex_coeff", "uv_gt_mask"] + (
            ["uv_true"] if self.truth else [])

    @torch.no_grad()
    def __call__(self, uv_maps, methods: tuple[str, ...], idx: np.ndarray, batch_size: int, on_batch=None
                 ) -> dict[str, dict]:
        """``uv_maps(method, batch)`` (a :class:`UVMethods`) evaluated on samples ``idx``: per method, the means and
        standard deviations of each column and, with ``uv_true``, ``completion_mae_255`` per yaw band."""
        per = {m: defaultdict(list) for m in methods}
        comp = {m: defaultdict(lambda: np.zeros(2)) for m in methods}
        for k in range(0, len(idx), batch_size):
            b = _batch(self.reader, idx[k:k + batch_size], self.names, self.device)
            self._accumulate(uv_maps, methods, b, per, comp)
            if on_batch is not None:
                on_batch(min(k + batch_size, len(idx)), len(idx))
        return {m: _summary(per[m], comp[m]) for m in methods}

    def _accumulate(self, uv_maps, methods, b: dict, per: dict, comp: dict) -> None:
        mesh, s, ident = self.mesh, self.reader.layout.image_size, self.identity
        n = b["image"].shape[0]
        verts = mesh.verts(b["params"], s, s)
        grid, cover = mesh.lookup(verts, s)
        points = mesh.landmarks(verts)
        front = f_in = None
        if ident is not None:
            f_in = ident(b["image"] * b["face"], points)
            p_front = rotated_params(b["params"].cpu().numpy(), np.zeros(n), s, self.model)
            v_front = mesh.verts(torch.from_numpy(p_front).to(self.device), s, s)
            front = (*mesh.lookup(v_front, s), mesh.landmarks(v_front))
        yaw = b["pose"][:, 0].abs().cpu().numpy()
        for m in methods:
            uv = uv_maps(m, b)
            render = render_lookup(uv, grid, cover)
            for key, v in reconstruction_metrics(render, b["image"], b["face"]).items():
                per[m][key] += v.tolist()
            if ident is not None:
                per[m]["id_recon"] += _cosine(ident(render * b["face"], points), f_in).tolist()
                r_front = render_lookup(uv, front[0], front[1])
                per[m]["id_front"] += _cosine(ident(r_front, front[2]), f_in).tolist()
            if self.truth:
                errs = completion_errors(uv, b["uv_true"], b["uv_gt_mask"] > 0.5, self.valid)
                for band, lo, hi in (("all", 0.0, 91.0), *YAW_BANDS):
                    sel = torch.from_numpy((yaw >= lo) & (yaw < hi)).to(self.device)
                    comp[m][f"{band}/n"] += np.array([float(sel.sum()), 0.0])
                    for key, (tot, cnt) in errs.items():
                        comp[m][f"{band}/{key}"] += np.array([float(tot[sel].sum()), float(cnt[sel].sum())])


def evaluate(cfg: EvalConfig, on_batch=None) -> dict:
    """Evaluate ``cfg.methods`` on the store; returns (and writes to ``cfg.out``) every number as JSON."""
    try:
        out = check_output_file(cfg.out)  # before the work, not after it
    except ValueError as e:
        raise RunError(f"--out {cfg.out}: {e}; pass a file in a writable folder, e.g. eval/metrics.json") from None
    dev = resolve_device(cfg.device)
    try:
        reader = StoreReader(cfg.store)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise RunError(f"--store {cfg.store}: {e}") from None
    methods = _checkpoint_methods(cfg, reader, dev)
    evaluator = Evaluator(reader, dev, load_identity(cfg.identity, dev) if cfg.identity != "none" else None)
    idx, failed = usable_samples(reader, cfg.limit)
    if len(idx) == 0:
        raise RunError(f"{cfg.store}: no usable samples (status OK) to evaluate")
    t0 = time.perf_counter()
    rows = evaluator(methods, cfg.methods, idx, cfg.batch_size, on_batch)
    result = _assemble(cfg, reader, methods, rows, idx, failed, time.perf_counter() - t0)
    text = json.dumps(result, indent=2)
    tmp = out.with_name(f".{out.name}.tmp")
    try:  # whole or not at all: an interrupted write leaves no half metrics.json
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"--out {out}: cannot write it ({e.strerror})") from None
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


def _summary(per: dict[str, list], comp: dict[str, np.ndarray]) -> dict:
    """One method's row: the mean and standard deviation of each per-sample column and, when ``comp`` holds
    completion sums, MAE x 255 on seen / unseen / all face texels per yaw band (None where a band has no texel)."""
    row = {k: float(np.mean(v)) for k, v in per.items()}
    row.update({f"{k}_std": float(np.std(v)) for k, v in per.items()})
    if comp:
        c = {}
        for band in ("all", *(b[0] for b in YAW_BANDS)):
            entry = {key: (comp[f"{band}/{key}"][0] / comp[f"{band}/{key}"][1]
                           if comp[f"{band}/{key}"][1] > 0 else None) for key in ("seen", "unseen", "all")}
            entry["samples"] = int(comp[f"{band}/n"][0])
            c[band] = entry
        row["completion_mae_255"] = c
    return row


def _assemble(cfg, reader, methods, rows, idx, failed, seconds) -> dict:
    ck = methods.checkpoint_file
    return {"store": str(cfg.store), "store_fingerprint": store_fingerprint(reader),
            "checkpoint": None if ck is None else str(ck),
            "checkpoint_sha256": None if ck is None else sha256_file(ck),
            "checkpoint_step": None if ck is None else methods.step,
            "samples": len(idx), "failures": failed, "identity": cfg.identity, "ssim": SSIM_SETTINGS,
            "image_size": reader.layout.image_size, "uv_size": reader.layout.uv_size, "seconds": round(seconds, 2),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "methods": rows}
