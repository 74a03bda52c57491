"""The linear UV texture model: ``UV_bfm = mean + basis @ c`` on the texels of a UV image (Eq. 8's basis).

Shared by both sides: ``uvprep build`` fits and stores it (the store's ``texture/`` group), the trainer reads
it back with ``common.store.StoreReader.texture_basis``. Fitting it (Eq. 8) and learning one from data
(masked PCA) are in :mod:`preprocess.texture`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class UVTextureBasis:
    """A linear UV texture model.

    mean: (U, U, 3) float32 in [0, 1]; basis: (U, U, 3, K) float32; valid: (U, U) bool texels inside
    the UV layout; name: provenance ("procedural", "bfm2009", "pca:<store hash>", ...).
    """

    mean: np.ndarray
    basis: np.ndarray
    valid: np.ndarray
    name: str = "unnamed"

    def __post_init__(self) -> None:
        u = self.mean.shape[0]
        if self.mean.shape != (u, u, 3):
            raise ValueError(f"mean: expected (U, U, 3), found {self.mean.shape}")
        if self.basis.ndim != 4 or self.basis.shape[:3] != (u, u, 3):
            raise ValueError(f"basis: expected ({u}, {u}, 3, K), found {self.basis.shape}")
        if self.valid.shape != (u, u) or self.valid.dtype != bool:
            raise ValueError(f"valid: expected ({u}, {u}) bool, found {self.valid.shape} {self.valid.dtype}")

    @property
    def size(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.basis.shape[3])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.basis, self.valid):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def synthesize(self, coeff: np.ndarray) -> np.ndarray:
        """coeff (B, K') with K' <= K -> UV maps (B, U, U, 3) float32 (not clipped; invalid texels = mean)."""
        coeff = np.asarray(coeff, np.float32)
        k = coeff.shape[1]
        if k > self.n_components:
            raise ValueError(f"{k} coefficients given, the basis has {self.n_components}")
        flat = self.basis[..., :k].reshape(-1, k)
        return self.mean[None] + (coeff @ flat.T).reshape(-1, *self.mean.shape)

    def save(self, path: str | Path) -> None:
        """Write a small ``.npz`` (float16 basis) that the pipeline reuses."""
        np.savez_compressed(path, mean=self.mean.astype(np.float32), basis=self.basis.astype(np.float16),
                            valid=self.valid, name=np.array(self.name))

    @classmethod
    def load(cls, path: str | Path) -> UVTextureBasis:
        try:
            with np.load(path) as z:
                return cls(mean=z["mean"].astype(np.float32), basis=z["basis"].astype(np.float32),
                           valid=z["valid"].astype(bool), name=str(z["name"]))
        except KeyError as e:
            raise ValueError(f"{path}: not a UV texture basis file (missing key {e}); "
                             f"write one with UVTextureBasis.save") from e

    @classmethod
    def from_face_model(cls, model, size: int) -> UVTextureBasis:
        """Rasterise a face model's per-vertex texture mean/basis (V, 3[, K]) into UV space at ``size``."""
        from common.uvtools import uv_vertex_attribute_image

        if model.tex_basis is None:
            raise ValueError(f"face model {model.name!r} has no texture basis; learn one with learn_masked_pca")
        k = model.n_tex
        attrs = np.concatenate([model.tex_mean, model.tex_basis.reshape(model.n_vertices, 3 * k)], 1)
        img, cover = uv_vertex_attribute_image(model, attrs.astype(np.float32), size)
        mean = img[..., :3]
        basis = img[..., 3:].reshape(size, size, 3, k)
        return cls(mean=mean.astype(np.float32), basis=basis.astype(np.float32), valid=cover, name=model.name)
