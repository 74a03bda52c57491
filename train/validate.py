"""Validation during ``uvtrain fit`` (``--val-store``): ``uvtrain eval``'s metrics of the networks being trained, on
a fixed subset of a held-out store, and the choice of ``best.pt``.

A run that learns is a held-out curve that goes down; the training losses alone do not show it (the generator can
lower Eq. 14 while it drifts from the photo). During the sampler stages the sampler alone is validated (``uvtrain
eval``'s ``sampler`` method: UV_spl, texels sampled outside the image filled by UV_bfm, its input resized to the
stage's image size); in the generator stage UV_pred (``generator``). The metrics are those of
:class:`train.evaluate.Evaluator`: Table 1's ``l1``, ``l1_face``, ``ssim`` (and ``id_recon`` / ``id_front`` with
``--val-identity``) and, on a store with ``uv_true``, completion MAE x 255 on ``seen`` / ``unseen`` / ``all`` face
texels, in total and per yaw band.

Validation does not change training: the networks run in eval mode under ``torch.no_grad`` (no spectral-norm power
iteration, no gradient), their train/eval flags and torch's global random states are put back afterwards, and the
samples are read outside the training stream (tested: a run with validation logs the same losses as one without).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.store import StoreReader
from train.config import HIGHER_IS_BETTER, RunOptions
from train.evaluate import Evaluator, UVMethods, check_compatible, store_fingerprint, usable_samples
from train.runs import BEST, RunError, checkpoint_record, rng_state, set_rng_state

__all__ = ["BAND_KEYS", "Validator", "best_record", "improves", "validate"]

BAND_KEYS = {"|yaw|<30": "yaw00-30", "30-60": "yaw30-60", ">60": "yaw60-90"}
"""The yaw bands of :data:`train.evaluate.YAW_BANDS` as metric-key parts (TensorBoard tags allow no ``|<>``)."""
BATCH = 8
"""Samples per validation batch."""


def flat_metrics(row: dict) -> dict[str, float]:
    """An :class:`Evaluator` row as flat metrics: ``l1``, ``l1_face``, ``ssim`` (``id_recon``, ``id_front``) and,
    with completion, ``seen_mae`` / ``unseen_mae`` / ``all_mae`` over all samples and ``BAND/seen_mae``... per yaw
    band (absent where a band has no texel)."""
    out = {k: float(row[k]) for k in ("l1", "l1_face", "ssim", "id_recon", "id_front") if k in row}
    for band, c in row.get("completion_mae_255", {}).items():
        prefix = "" if band == "all" else f"{BAND_KEYS[band]}/"
        out.update({f"{prefix}{k}_mae": float(c[k]) for k in ("seen", "unseen", "all") if c[k] is not None})
    return out


def improves(new: dict, old: dict | None) -> bool:
    """Whether validation record ``new`` beats ``old`` (records as :meth:`Validator.__call__` returns them).

    Records of another metric, method (the sampler's are superseded by the generator's: inference uses UV_pred) or
    sample set do not compare: the new one wins."""
    if old is None or any(old.get(k) != new[k] for k in ("metric", "method", "samples_id")):
        return True
    if new["metric"] in HIGHER_IS_BETTER:
        return new["value"] > old["value"]
    return new["value"] < old["value"]


def best_record(path: Path) -> dict | None:
    """The validation record a ``best.pt`` holds (``val_best``), None without the file; memory-mapped, the weights
    are not read. A resumed run starts from it rather than from its checkpoint's copy, which lags when ``best.pt``
    was written after the checkpoint (or is gone)."""
    if not path.is_file():
        return None
    return checkpoint_record(path, "val_best")  # a damaged best.pt: one line naming it


class Validator:
    """The held-out store of a run (``run.val_store``), checked against the training store, and its fixed samples.

    face_model_hash, uv_size: the training store's (the val store must share its UV layout); identity: the network
    of the ID columns, or None."""

    def __init__(self, run: RunOptions, face_model_hash: str, uv_size: int, device: torch.device,
                 identity: torch.nn.Module | None = None) -> None:
        where = f"--val-store {run.val_store}"
        try:
            reader = StoreReader(run.val_store)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise RunError(f"{where}: {e}") from None
        check_compatible(reader, where, face_model_hash, uv_size, "this run")
        self.basis = reader.texture_basis()
        if self.basis is None:
            raise RunError(f"{where} has no texture basis (UV_bfm fills the sampler's empty texels); rebuild it")
        if run.val_metric.endswith("_mae") and not reader.layout.has_truth:
            raise RunError(f"{where} has no uv_true (a synthetic store has): --val-metric {run.val_metric} needs it; "
                           f"choose l1, l1_face or ssim")
        idx, _ = usable_samples(reader)
        if len(idx) == 0:
            raise RunError(f"{where}: no usable samples (status OK) to validate on")
        if 0 < run.val_samples < len(idx):
            idx = idx[np.linspace(0, len(idx) - 1, run.val_samples).round().astype(np.int64)]
        self.reader, self.device, self.idx, self.metric = reader, device, idx, run.val_metric
        self.evaluator = Evaluator(reader, device, identity)
        key = {"store": store_fingerprint(reader), "idx": idx.tolist(), "identity": run.val_identity}
        self.samples_id = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def __call__(self, step: int, stage: str, image_size: int, sampler: torch.nn.Module,
                 generator: torch.nn.Module | None = None) -> tuple[dict, dict]:
        """Validate ``sampler`` alone (``generator`` None; its input resized to ``image_size``) or UV_pred of both:
        (the ``metrics.jsonl`` row ``{"step", "phase": "val", "stage", "method", "val/KEY": ...}``, the record
        ``{"metric", "value", "step", "stage", "method", "samples_id"}`` that :func:`improves` compares)."""
        method = "sampler" if generator is None else "generator"
        nets = [m for m in (sampler, generator) if m is not None]
        modes = [(m, m.training) for net in nets for m in net.modules()]
        rng = rng_state()
        t0 = time.perf_counter()
        try:
            for net in nets:
                net.eval()
            uv_maps = UVMethods(self.reader, self.device, sampler, generator, image_size, self.basis)
            metrics = flat_metrics(self.evaluator(uv_maps, (method,), self.idx, BATCH)[method])
        finally:
            for m, training in modes:
                m.training = training
            set_rng_state(rng)
        row = {"step": step, "phase": "val", "stage": stage, "method": method,
               **{f"val/{k}": v for k, v in metrics.items()},
               "val/samples": len(self.idx), "val/seconds": time.perf_counter() - t0}
        if self.metric not in metrics:
            raise RunError(f"--val-metric {self.metric}: the validation gave no such metric ({', '.join(metrics)})")
        record = {"metric": self.metric, "value": metrics[self.metric], "step": step, "stage": stage,
                  "method": method, "samples_id": self.samples_id}
        return row, record


def validate(tr, stage, with_generator: bool) -> float:
    """Validate the networks of ``tr`` (a :class:`train.loop.Trainer` with a ``validator``) as they stand in
    ``stage`` on rank 0 (UV_pred when ``with_generator``, in a generator stage; else the sampler alone): the row goes
    to ``metrics.jsonl`` and TensorBoard (``val/KEY``), and ``best.pt`` is written (atomically, as ``checkpoint.pt``,
    with the record as ``val_best``) when the record beats ``tr.val_best``. The other ranks wait. Returns the seconds
    it took."""
    t0 = time.perf_counter()
    if tr.world.main:
        generator = tr.generator if with_generator else None
        row, record = tr.validator(tr.step, stage.name, stage.image_size, tr.sampler, generator)
        tr.log.write(row)
        if improves(record, tr.val_best):
            tr.val_best = record
            tr.save(stage, tr.rd / BEST)
    tr.world.barrier()
    return time.perf_counter() - t0
