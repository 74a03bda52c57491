"""Checking a store against the schema (:func:`validate_store`): attributes, every array's shape, dtype and
chunks, the manifest, the per-sample codes, the fitted values of OK samples, and the ``model/`` and ``uv_layout/``
groups. Read-only; image pixels are not read.
"""

from __future__ import annotations

import numpy as np
import zarr

from common.store.groups import model_group_problems, uv_layout_group_problems
from common.store.location import as_group, layout_of, quiet_listing
from common.store.schema import (
    OK,
    PENDING,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    StoreLayout,
    StoreMismatch,
    array_specs,
    code_problems,
    manifest_sha256,
    manifest_specs,
)


def _examples(mask: np.ndarray, offset: int = 0, k: int = 5) -> str:
    idx = np.flatnonzero(mask)[:k] + offset
    return ", ".join(str(int(i)) for i in idx) + (", ..." if mask.sum() > k else "")


def pending_chunks(status: np.ndarray, chunk: int) -> np.ndarray:
    """(n_chunks,) bool: the chunks of ``chunk`` samples whose ``status`` (N,) holds a PENDING sample."""
    return np.add.reduceat((status == PENDING).astype(np.int64), np.arange(0, len(status), chunk)) > 0


def schema_problems(group: zarr.Group, layout: StoreLayout) -> list[str]:
    """Arrays missing (``NAME: missing``), of the wrong shape, dtype or chunks, or not in the schema."""
    problems = []
    specs = {**array_specs(layout), **manifest_specs(layout)}
    for name, spec in specs.items():
        if name not in group:
            problems.append(f"{name}: missing")
            continue
        a = group[name]
        dtype_ok = (a.dtype.kind in "OTU" or str(a.dtype).startswith("StringDType")) if name == "manifest_path" \
            else a.dtype == spec.dtype
        if tuple(a.shape) != spec.shape or not dtype_ok or tuple(a.chunks) != spec.chunks:
            problems.append(f"{name}: expected shape {spec.shape} {spec.dtype} chunks {spec.chunks}, found "
                            f"{tuple(a.shape)} {a.dtype} chunks {tuple(a.chunks)}")
    with quiet_listing():
        extra = sorted(set(group.array_keys()) - set(specs))
    if extra:
        problems.append(f"unexpected arrays {extra} (not in schema version {SCHEMA_VERSION})")
    return problems


def _code_problems(group: zarr.Group, layout: StoreLayout, st: np.ndarray) -> list[str]:
    """Codes outside the schema or breaking its rules (``st``: the stored ``status``)."""
    problems = []
    rs, done = group["reason"][:], group["chunk_done"][:]
    bad = code_problems(st, rs)
    if bad["status"].any():
        problems.append(f"status: values outside {{0, 1, 2}} at samples {_examples(bad['status'])}")
    if not np.isin(done, (0, 1)).all():
        problems.append("chunk_done: values other than 0 / 1")
    if bad["reason"].any():
        problems.append(f"reason: unknown codes at samples {_examples(bad['reason'])}")
    if bad["no_reason"].any():
        problems.append(f"reason: failed samples without a reason: {_examples(bad['no_reason'])}")
    if bad["ok_reason"].any():
        problems.append(f"reason: OK samples with a failure reason: {_examples(bad['ok_reason'])}")
    held = (done == 1) & pending_chunks(st, layout.chunk)
    if held.any():
        problems.append(f"chunk_done: chunks {_examples(held)} are marked done but hold PENDING samples")
    return problems


def _fit_problems(group: zarr.Group, ok: np.ndarray) -> list[str]:
    """NaN/inf ``params``, ``pose``, ``tex_coeff`` or an impossible pose in OK samples (``ok``: (N,) bool)."""
    problems = []
    for name in ("params", "pose", "tex_coeff"):
        vals = group[name][:]
        nonfinite = ok & ~np.isfinite(vals.reshape(len(vals), -1)).all(1)
        if nonfinite.any():
            problems.append(f"{name}: {int(nonfinite.sum())} OK samples have NaN/inf values: "
                            f"{_examples(nonfinite)}")
        if name == "pose":
            lim = np.array([90.0, 180.0, 180.0], np.float32)
            with np.errstate(invalid="ignore"):
                out = ok & (np.abs(vals) > lim + 1e-3).any(1)
            if out.any():
                problems.append(f"pose: {int(out.sum())} OK samples outside |yaw| <= 90, |pitch|, |roll| <= 180 "
                                f"degrees: {_examples(out)}")
    return problems


def validate_store(path_or_group) -> list[str]:
    """Check a store against the schema; returns human-readable problems (empty list: sound).

    Checks: schema version and attributes; every array present with the schema's shape, dtype and
    chunks (bool masks are bool by dtype); no unexpected arrays; manifest sorted with unique keys and
    matching its recorded sha256; status / reason / chunk_done codes valid and consistent (a chunk
    marked done holds no PENDING sample, failed samples carry a reason); OK samples have finite
    ``params``, ``pose`` and ``tex_coeff`` and a pose within |yaw| <= 90, |pitch|, |roll| <= 180;
    the ``model/`` group is complete, its arrays hash to its recorded fingerprint and that equals the
    root ``face_model_hash``; the ``uv_layout/`` group is complete, fits the layout (U, crop shapes,
    mirror index (U*U,) in [-1, U*U)) and was computed for the same model. Image pixels are not read.
    """
    group = as_group(path_or_group, "r")
    try:
        layout = layout_of(group)
    except (StoreMismatch, KeyError, ValueError, TypeError) as e:
        return [f"attributes: {e}"]
    missing = [k for k in (*REQUIRED_ATTRS, "manifest", "created") if k not in group.attrs]
    problems = [f"attributes: missing {missing}"] if missing else []
    problems += schema_problems(group, layout)
    problems += model_group_problems(group) + uv_layout_group_problems(group, layout)
    if any(p.split(":")[0] in ("status", "reason", "chunk_done", "params", "pose", "tex_coeff") for p in problems):
        return problems
    st = group["status"][:]
    problems += _code_problems(group, layout, st)
    ok = st == OK
    if ok.any():
        problems += _fit_problems(group, ok)
    if not any(p.startswith("manifest") for p in problems):
        paths = [str(p) for p in group["manifest_path"][:]]
        if any(a >= b for a, b in zip(paths, paths[1:], strict=False)):
            problems.append("manifest_path: keys are not sorted and unique")
        sha = manifest_sha256(paths, group["manifest_size"][:], group["manifest_mtime"][:])
        if sha != group.attrs.get("manifest", {}).get("sha256"):
            problems.append("manifest: arrays do not match the recorded sha256 (edited after creation?)")
    return problems

