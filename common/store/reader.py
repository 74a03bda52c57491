"""Reading a store: :class:`StoreReader`, the trainer's one way in (samples, batches, counts, and what the
trainer needs besides them: the face model, crop layout, mirror index and texture basis the build used)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from common.config import CropConfig
from common.store.chunks import ChunkVerifier, completed_chunks
from common.store.groups import read_face_model, read_texture_basis, read_uv_layout
from common.store.location import layout_of, open_store, quiet_listing
from common.store.schema import FAILED, OK, PENDING, PER_CHUNK, array_specs, reason_name
from common.store.validate import validate_store
from common.texbasis import UVTextureBasis
from common.uvlayout import CropLayout

if TYPE_CHECKING:  # common.facemodel imports torch; reading arrays from a store should not need it
    from common.facemodel import FaceModel


class StoreReader:
    """Read-only access to a finished or partial store (local path or a URL zarr understands)."""

    def __init__(self, path) -> None:
        self.path = path
        self.group = open_store(path, mode="r")
        self.layout = layout_of(self.group)
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.layout.n_samples

    def __repr__(self) -> str:
        return f"StoreReader({self.path!r}, n={len(self)}, image_size={self.layout.image_size})"

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def names(self) -> list[str]:
        """Sample-aligned array names (everything :meth:`sample` returns besides ``index`` and ``path``)."""
        return [k for k in array_specs(self.layout) if k not in PER_CHUNK]

    def status(self) -> np.ndarray:
        """(N,) uint8 per-sample status as stored (see :meth:`checked_status` for training and evaluation)."""
        return self.group["status"][:]

    @property
    def verifier(self) -> ChunkVerifier:
        """This reader's :class:`~common.store.chunks.ChunkVerifier` (each chunk checked once per reader)."""
        if "verifier" not in self._cache:
            self._cache["verifier"] = ChunkVerifier(self.group, str(self.path))
        return self._cache["verifier"]

    def checked_status(self) -> np.ndarray:
        """:meth:`status`, refused (:class:`~common.store.chunks.DamagedChunk`) when a completed chunk's status reads
        PENDING: what a trainer or evaluator selects samples by."""
        status = self.status()
        self.verifier.check_status(status)
        return status

    def ok_indices(self) -> np.ndarray:
        """(n_ok,) int64 indices of samples with status OK, ascending."""
        return np.flatnonzero(self.status() == OK)

    def paths(self) -> np.ndarray:
        """(N,) source keys (manifest order)."""
        return np.asarray(self.group["manifest_path"][:], dtype=object)

    def sample(self, i: int, names: Sequence[str] | None = None) -> dict[str, Any]:
        """All arrays (or ``names``) of sample ``i`` with its leading axis dropped, plus ``index`` and ``path``. For
        looking at a store (``uvprep show``), damaged or not: unlike :meth:`batch`, not verified."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        i = int(i) % n
        out: dict[str, Any] = {k: self.array(k)[i] for k in self._names(names)}
        out["index"], out["path"] = i, str(self.array("manifest_path")[i])
        return out

    def batch(self, indices, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays (or ``names``) for ``indices`` (any order, repeats allowed): name -> (len(indices), ...). Each chunk
        is checked against its SHA-256 record the first time this reader touches it (:meth:`verifier`); a damaged one
        raises :class:`~common.store.chunks.DamagedChunk`."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"batch indices must lie in [0, {len(self)}), found [{idx.min()}, {idx.max()}]")
        uniq, inv = np.unique(idx, return_inverse=True)
        for c in np.unique(uniq // self.layout.chunk):  # each chunk verified against its record once per reader
            self.verifier.check(int(c))
        out = {k: self.array(k).get_orthogonal_selection((uniq,))[inv] for k in self._names(names)}
        out["index"] = idx
        return out

    def array(self, name: str) -> zarr.Array:
        """The array ``name``, opened once per reader (``group[name]`` reads its metadata each time: a request per
        array and call on object storage)."""
        key = f"array:{name}"
        if key not in self._cache:
            self._cache[key] = self.group[name]
        return self._cache[key]

    def _names(self, names) -> list[str]:
        if names is None:
            return self.names
        bad = sorted(set(names) - set(self.names))
        if bad:
            raise KeyError(f"unknown arrays {bad}; the store has {self.names}")
        return list(names)

    def counts(self) -> dict[str, Any]:
        """{"ok", "failed", "pending", "failed_by_reason": {short name: n}, "chunks_done", "n_chunks"}."""
        st, rs = self.status(), self.group["reason"][:]
        by = {reason_name(r): int(c) for r, c in zip(*np.unique(rs[st == FAILED], return_counts=True), strict=True)}
        return {"ok": int((st == OK).sum()), "failed": int((st == FAILED).sum()), "pending": int((st == PENDING).sum()),
                "failed_by_reason": by, "chunks_done": int(completed_chunks(self.group).sum()),
                "n_chunks": self.layout.n_chunks}

    def failures(self) -> list[tuple[int, str, str]]:
        """(index, source key, reason short name) of every failed sample (:func:`common.store.reason_name`)."""
        st, rs = self.status(), self.group["reason"][:]
        idx = np.flatnonzero(st == FAILED)
        paths = self.group["manifest_path"][idx] if idx.size else []
        return [(int(i), str(p), reason_name(rs[i])) for i, p in zip(idx, paths, strict=True)]

    def storage(self) -> dict[str, tuple[int, int]]:
        """name -> (stored bytes, raw bytes) for every array (stored bytes exclude metadata)."""
        with quiet_listing():
            return {k: (int(a.nbytes_stored()), int(a.nbytes)) for k, a in self.group.arrays()}

    def validate(self) -> list[str]:
        """Problems found (empty when the store is sound): see :func:`validate_store`."""
        return validate_store(self.group)

    # what a trainer needs besides the samples (read once, then cached on this reader)
    def face_model(self) -> FaceModel:
        """The face model the store was built with (``model/``): a :class:`common.facemodel.FaceModel` with
        mean_shape (V, 3), id_basis (V, 3, Kid), exp_basis (V, 3, Kexp) float32, triangles (F, 3) int64,
        uv (V, 2) float32, symmetry (V,) int64, regions name -> (V,) bool, keypoints (68,) int64 or None.
        ``face_model().fingerprint() == attrs["face_model_hash"]``."""
        if "face_model" not in self._cache:
            self._cache["face_model"] = read_face_model(self.group)
        return self._cache["face_model"]

    def _uv_layout(self) -> tuple[CropLayout, np.ndarray, CropConfig]:
        if "uv_layout" not in self._cache:
            self._cache["uv_layout"] = read_uv_layout(self.group)
        return self._cache["uv_layout"]

    def crop_layout(self) -> CropLayout:
        """Where the partial crops are cut (``uv_layout/``): boxes (row0, row1, col0, col1) in the U x U UV image,
        ctr_region (hc, wc) bool, sd_region (hs, ws) bool; see :mod:`common.uvlayout`."""
        return self._uv_layout()[0]

    def mirror_index(self) -> np.ndarray:
        """(U*U,) int64: flat index of each texel's mirror texel, -1 where none (``common.uvtools.texel_mirror_index``,
        used with ``common.uvlayout.mirror_uv``)."""
        return self._uv_layout()[1]

    def crop_config(self) -> CropConfig:
        """The crop thresholds the build used: frontal_yaw_max, profile_yaw_min (degrees), min_coverage, margin."""
        return self._uv_layout()[2]

    def texture_basis(self) -> UVTextureBasis | None:
        """The UV texture basis of Eq. 8 (``texture/``): mean (U, U, 3), basis (U, U, 3, K) float32 (stored
        float16), valid (U, U) bool; None while the build has not written it yet."""
        if "texture" not in self._cache:
            t = read_texture_basis(self.group)
            if t is None:
                return None
            self._cache["texture"] = UVTextureBasis(mean=t["mean"], basis=t["basis"], valid=t["valid"], name=t["name"])
        return self._cache["texture"]
