"""UV-image helpers built on the UV-space rasteriser of :mod:`common.render`.

Convention (from :mod:`common.facemodel`): a UV image of size ``U`` stores texel
``(row i, col j)`` at ``u = (j + 0.5) / U``, ``v = 1 - (i + 0.5) / U`` (v up, forehead in the top
rows). Texel indices are flattened row-major: ``index = i * U + j``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from common.render import Fragments, interpolate, uv_fragments, uv_to_pixel

if TYPE_CHECKING:  # annotations only: common.facemodel never needs the rasteriser, nor this module it
    from common.facemodel import FaceModel

__all__ = [
    "uv_to_pixel",
    "uv_to_texel",
    "texel_centres",
    "model_uv_fragments",
    "uv_vertex_attribute_image",
    "region_uv_mask",
    "texel_mirror_index",
]


def texel_centres(size: int) -> np.ndarray:
    """UV coordinates of every texel centre: (size, size, 2) float64, ``[..., 0] = u``, ``[..., 1] = v``."""
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, 1.0 - c)  # rows: v decreasing downwards
    return np.stack([u, v], -1)


def uv_to_texel(uv: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Texel holding each UV point: uv (..., 2) in [0, 1] -> (row, col) int64 arrays of shape (...).

    ``col = floor(u U)``, ``row = floor((1 - v) U)``, clipped to ``[0, U - 1]`` (so u = 1 lands in
    the last column). Inverse of :func:`texel_centres` on texel centres.
    """
    uv = np.asarray(uv, np.float64)
    if uv.shape[-1] != 2:
        raise ValueError(f"uv: expected (..., 2), found {uv.shape}")
    col = np.clip(np.floor(uv[..., 0] * size), 0, size - 1).astype(np.int64)
    row = np.clip(np.floor((1.0 - uv[..., 1]) * size), 0, size - 1).astype(np.int64)
    return row, col


def model_uv_fragments(model: FaceModel, size: int) -> Fragments:
    """Rasterise a face model's UV layout at ``size`` (Fragments with batch 1), on CPU."""
    if int(size) <= 0:
        raise ValueError(f"size: expected a positive UV image size, found {size}")
    return uv_fragments(torch.from_numpy(np.ascontiguousarray(model.uv, np.float64)),
                        torch.from_numpy(np.ascontiguousarray(model.triangles, np.int64)), int(size))


def uv_vertex_attribute_image(model: FaceModel, attr: np.ndarray, size: int,
                              frags: Fragments | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a per-vertex attribute into the UV image.

    attr: (V, C) (or (V,)) numeric. Returns img (size, size, C) float32, linearly interpolated
    over each UV triangle (0 outside the layout), and coverage (size, size) bool. ``frags``: a
    reusable :func:`model_uv_fragments` result.
    """
    attr = np.asarray(attr)
    if attr.ndim == 1:
        attr = attr[:, None]
    if attr.ndim != 2 or attr.shape[0] != model.n_vertices:
        raise ValueError(f"attr: expected ({model.n_vertices}, C) (one row per vertex), found {attr.shape}")
    frags = model_uv_fragments(model, size) if frags is None else frags
    img = interpolate(frags, torch.from_numpy(attr.astype(np.float64)))[0]
    return img.numpy().astype(np.float32), frags.tri_id[0].numpy() >= 0


def region_uv_mask(model: FaceModel, name: str, size: int, frags: Fragments | None = None) -> np.ndarray:
    """Rasterise one of the model's named per-vertex regions into a UV-image mask: (size, size) bool.

    A texel belongs to the region when the region weight interpolated over its UV triangle is
    >= 0.5. Texels outside the UV layout are False. ``frags``: a reusable
    :func:`model_uv_fragments` result (masks of several regions then share one UV rasterisation).
    """
    if name not in model.regions:
        raise KeyError(f"unknown region {name!r}; this model has {sorted(model.regions)}")
    w, cover = uv_vertex_attribute_image(model, model.regions[name].astype(np.float32)[:, None], size, frags)
    return (w[..., 0] >= 0.5) & cover


def texel_mirror_index(model: FaceModel, size: int, frags: Fragments | None = None) -> np.ndarray:
    """Flat index of each texel's mirror texel: (size * size,) int64, -1 where there is none.

    The mirror of the surface point at texel ``t`` (UV triangle ``tri``, barycentrics ``b``) is
    the point with the same barycentrics in the triangle ``symmetry[tri]``; its UV
    ``sum_k b_k uv[symmetry[tri_k]]`` is looked up with :func:`uv_to_texel`. -1 where the texel is
    not covered by the layout or its mirror lands on an uncovered texel. For a layout exactly
    symmetric under ``u -> 1 - u`` this is a column flip (``i * U + (U - 1 - j)``).
    """
    frags = model_uv_fragments(model, size) if frags is None else frags
    tri_id = frags.tri_id[0].reshape(-1).numpy()
    bary = frags.bary[0].reshape(-1, 3).numpy().astype(np.float64)
    covered = tri_id >= 0
    tri = np.asarray(model.triangles, np.int64)[tri_id[covered]]  # (N, 3)
    mirror_uv = np.einsum("nk,nkc->nc", bary[covered], np.asarray(model.uv, np.float64)[model.symmetry[tri]])
    row, col = uv_to_texel(mirror_uv, size)
    target = row * size + col
    out = np.full(size * size, -1, np.int64)
    out[covered] = np.where(covered[target], target, -1)
    return out
