"""The pre-pass's fits and unwraps, kept in the store for the chunks that hold the same samples.

The texture-basis pre-pass (:func:`preprocess.build.prepass_batch`) decodes, fits and unwraps ``pca_samples``
photos spread over the manifest; the chunks that hold those photos used to do it all again (about 30 % of a small
build). Each pre-pass batch now also writes the rows of :class:`preprocess.stages.GeometryResult` of its fitted
samples into the store's scratch group ``prepass_geometry`` (one Zarr chunk per sample, so batches never share a
chunk), and marks them done last; a chunk reads the rows it holds back instead of decoding, fitting and
unwrapping them. A sample's geometry does not depend on the batch it was computed in, so the store is the same
either way (``tests/test_build.py``). The group records the build's config; it lives as long as the store is being
built (a resumed build reuses it) and is removed once every chunk is written.

Only for stores without ground truth (photo sources): the synthetic source's ``uv_true`` comes from rendering the
sample, which the chunk has to do anyway.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import zarr

from common.store import open_store
from common.store.location import quiet_listing

GROUP = "prepass_geometry"
"""The store's scratch group holding the pre-pass rows (absent once the build is complete)."""


def _fields(image_size: int, uv_size: int, occlusion: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-sample arrays: name -> (shape of one row, dtype); float32 UV_gt as the stages compute it."""
    s, u = image_size, uv_size
    f = {"image": ((s, s, 3), "uint8"), "face_region": ((s, s), "bool"), "face_mask_eroded": ((s, s), "bool"),
         "params": ((62,), "float32"), "pose": ((3,), "float32"), "uv_gt": ((u, u, 3), "float32"),
         "uv_gt_mask": ((u, u), "bool")}
    if occlusion:
        f["occlusion"] = ((s, s), "bool")
    return f


def config_token(record: dict) -> str:
    """The identity of a build's config (:func:`preprocess.build.config_record`) the rows were computed under."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def create(out: str, indices: np.ndarray, token: str, image_size: int, uv_size: int, occlusion: bool) -> None:
    """(Re)create the scratch group for the pre-pass samples ``indices`` (sorted, unique), nothing done yet."""
    root = open_store(out, mode="r+")
    drop_group(root)
    g = root.create_group(GROUP, attributes={"config": token})
    g.create_array("index", data=np.asarray(indices, np.int64))
    g.create_array("done", shape=(len(indices),), chunks=(1,), dtype="uint8", fill_value=0)
    for name, (shape, dtype) in _fields(image_size, uv_size, occlusion).items():
        g.create_array(name, shape=(len(indices), *shape), chunks=(1, *shape), dtype=dtype,
                       fill_value=False if dtype == "bool" else 0)


def _open(out: str, token: str, mode: str = "r") -> zarr.Group | None:
    try:
        root = open_store(out, mode=mode)
        with quiet_listing():
            if GROUP not in root:
                return None
        g = root[GROUP]
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return g if g.attrs.get("config") == token else None


def write_rows(out: str, token: str, indices: np.ndarray, geo) -> None:
    """Store the rows of ``geo`` (:class:`~preprocess.stages.GeometryResult` of the samples ``indices``) that were
    fitted and unwrapped (reason 0); each is marked done after its data. No-op without a matching group."""
    g = _open(out, token, mode="r+")
    if g is None:
        return
    index = g["index"][...]
    where = np.searchsorted(index, indices)
    known = (where < len(index)) & (index[np.minimum(where, len(index) - 1)] == indices)
    ok = known & (geo.reason == 0)
    if not ok.any():
        return
    names = [n for n in _fields(1, 1, True) if n in g]
    rows = np.flatnonzero(ok)
    lo, hi = int(where[rows[0]]), int(where[rows[-1]]) + 1
    if hi - lo == rows.size and np.array_equal(where[rows], np.arange(lo, hi)):  # a batch: one write per array
        for name in names:
            g[name][lo:hi] = getattr(geo, name)[rows]
        g["done"][lo:hi] = 1
        return
    for j in rows:
        for name in names:
            g[name][where[j]] = getattr(geo, name)[j]
        g["done"][where[j]] = 1


def read_rows(out: str, token: str, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The done rows among samples [start, stop): their sample indices (k,) and arrays name -> (k, ...)."""
    g = _open(out, token)
    if g is None:
        return np.zeros(0, np.int64), {}
    index = g["index"][...]
    lo, hi = np.searchsorted(index, [start, stop])
    if lo == hi:
        return np.zeros(0, np.int64), {}
    done = np.flatnonzero(g["done"][lo:hi] == 1)
    if done.size == 0:
        return np.zeros(0, np.int64), {}
    names = [n for n in _fields(1, 1, True) if n in g]
    return index[lo:hi][done], {n: g[n][lo:hi][done] for n in names}


def drop(out: str) -> None:
    """Remove the scratch group (the build is complete)."""
    drop_group(open_store(out, mode="r+"))


def drop_group(root: zarr.Group) -> None:
    with quiet_listing():
        if GROUP in root:
            del root[GROUP]
