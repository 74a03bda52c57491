"""Torch UV-map helpers for the trainer: shape checks, crops, the texel mirror and masked resizing.

Conventions (see :mod:`common.uvtools`): a UV map is ``(B, C, U, U)`` float, texel ``(row i, col j)``
at ``u = (j + 0.5) / U``, ``v = 1 - (i + 0.5) / U``, flattened row-major (``i * U + j``). A *mirror
index* is a ``(U * U,)`` int64 tensor giving, for every texel, the flat index of the texel holding its
mirror point across the face's symmetry plane, ``-1`` where there is none
(:func:`common.uvtools.texel_mirror_index`). Crop boxes are ``(row0, row1, col0, col1)``, half-open
(:class:`common.uvlayout.CropLayout`). Masks are float ``{0, 1}`` tensors.

Everything here is differentiable with respect to the UV maps and runs under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["expect_shape", "crop", "mirror", "side_crops", "centre_crop", "resize_masked"]

Box = tuple[int, int, int, int]


def expect_shape(name: str, t: Tensor, shape: Sequence[int | str | None],
                 dims: dict[str, int] | None = None) -> dict[str, int]:
    """Check ``t.shape`` against a pattern and return the bound dimension names.

    shape: one entry per dimension, an int (must match), a name (bound on first use, must match
    afterwards, also across calls sharing ``dims``) or None (anything). Raises ValueError naming the
    tensor, the expected pattern and the found shape, e.g.
    ``uv: expected (B, 3, U, U) with B=2, found (2, 4, 8, 8)``.
    """
    dims = {} if dims is None else dims
    pattern = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"

    def fail(why: str = "") -> None:
        bound = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise ValueError(f"{name}: expected {pattern}{' with ' + bound if bound else ''}, "
                         f"found {tuple(t.shape)}{why}")

    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.ndim != len(shape):
        fail()
    for s, n in zip(shape, t.shape, strict=True):
        if isinstance(s, str):
            if dims.setdefault(s, n) != n:
                fail()
        elif s is not None and s != n:
            fail()
    return dims


def _check_box(box: Sequence[int], u: int) -> Box:
    if len(box) != 4:
        raise ValueError(f"box: expected (row0, row1, col0, col1), found {tuple(box)}")
    r0, r1, c0, c1 = (int(b) for b in box)
    if not (0 <= r0 < r1 <= u and 0 <= c0 < c1 <= u):
        raise ValueError(f"box: expected 0 <= row0 < row1 <= {u} and 0 <= col0 < col1 <= {u}, found {tuple(box)}")
    return r0, r1, c0, c1


def crop(uv: Tensor, box: Sequence[int]) -> Tensor:
    """Cut a box out of a UV map: uv (B, C, U, U) -> (B, C, row1 - row0, col1 - col0) (a view)."""
    d = expect_shape("uv", uv, ("B", "C", "U", "U"))
    r0, r1, c0, c1 = _check_box(box, d["U"])
    return uv[:, :, r0:r1, c0:c1]


def _check_mirror_index(mirror_index: Tensor, u: int) -> None:
    expect_shape("mirror_index", mirror_index, (u * u,))
    if mirror_index.dtype != torch.int64:
        raise ValueError(f"mirror_index: expected int64, found {mirror_index.dtype}")


def mirror(uv: Tensor, mirror_index: Tensor) -> Tensor:
    """Mirror a UV map across the face's symmetry plane by a texel gather (differentiable).

    uv: (B, C, U, U); mirror_index: (U * U,) int64, -1 where a texel has no mirror (those texels
    become 0). Returns (B, C, U, U) with ``out[..., t] = uv[..., mirror_index[t]]`` on flat indices.
    With the column-flip index ``i * U + (U - 1 - j)`` this is ``torch.flip(uv, dims=[-1])``.
    """
    d = expect_shape("uv", uv, ("B", "C", "U", "U"))
    _check_mirror_index(mirror_index, d["U"])
    idx = mirror_index.to(uv.device)
    has = (idx >= 0).to(uv.dtype)
    flat = uv.flatten(2).index_select(2, idx.clamp(min=0)) * has
    return flat.view_as(uv)


def _region(region: Tensor, h: int, w: int, like: Tensor) -> Tensor:
    expect_shape("region", torch.as_tensor(region), (h, w))
    return torch.as_tensor(region, device=like.device).to(like.dtype)


def side_crops(uv_pred: Tensor, box: Sequence[int], region: Tensor, mirror_index: Tensor) -> Tensor:
    """UV_sd from a predicted map: its left side crop and its mirrored right side, stacked (Section 3.2.2).

    "UV_left and UV_right ... Due to UV map's symmetry, the latter two can be put together and denoted
    UV_sd": the face's right side is mirrored onto the left (the canonical side of the real side crops)
    so both halves are judged by one side discriminator.

    uv_pred: (B, 3, U, U); box: the side box (row0, row1, col0, col1) of size (h, w); region: (h, w)
    float/bool, the face's left half inside the box with the nose masked out; mirror_index: (U * U,)
    int64. Returns (2B, 3, h, w): rows ``[:B]`` the left side crop, rows ``[B:]`` the crop of the
    mirrored map, both multiplied by the region.
    """
    expect_shape("uv_pred", uv_pred, ("B", 3, "U", "U"))
    left = crop(uv_pred, box)
    right = crop(mirror(uv_pred, mirror_index), box)
    m = _region(region, left.shape[-2], left.shape[-1], uv_pred)
    return torch.cat([left, right], 0) * m


def centre_crop(uv_pred: Tensor, box: Sequence[int], region: Tensor) -> Tensor:
    """UV_ctr from a predicted map: the centre box times its region (nostrils masked out), Section 3.2.2.

    uv_pred: (B, 3, U, U); box: (row0, row1, col0, col1) of size (h, w); region: (h, w) float/bool.
    Returns (B, 3, h, w).
    """
    expect_shape("uv_pred", uv_pred, ("B", 3, "U", "U"))
    c = crop(uv_pred, box)
    return c * _region(region, c.shape[-2], c.shape[-1], uv_pred)


def _area_weights(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """(n_out, n_in) float32: fraction of output cell ``i`` covered by input cell ``k`` (rows sum to 1)."""
    scale = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64, device=device)[:, None] * scale
    k = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(lo + scale, k + 1) - torch.maximum(lo, k)).clamp(min=0)
    return (overlap / scale).float()


def resize_masked(uv: Tensor, mask: Tensor, size: int, min_coverage: float = 0.999) -> tuple[Tensor, Tensor]:
    """Area-resample a masked UV map to ``size`` x ``size`` (e.g. a 256 UV_gt to the sampler's 152).

    Every output texel is the exact area integral of the input over its footprint (fractional
    overlaps included, so any ratio works, up or down), averaged over the valid part only:
    ``uv_small = A (uv * mask) A^T / A mask A^T``. An output texel is valid when at least
    ``min_coverage`` of its area was valid (all of it, up to float rounding); invalid texels are 0.

    uv: (B, C, U, U); mask: (B, 1, U, U) float {0, 1}. Returns uv_small (B, C, size, size) float32 and
    mask_small (B, 1, size, size) float32 {0, 1}. Computed in float32 with autocast off (a coverage of
    0.999 is below bfloat16's resolution near 1).
    """
    d = expect_shape("uv", uv, ("B", "C", "U", "U"))
    expect_shape("mask", mask, ("B", 1, "U", "U"), d)
    if int(size) <= 0:
        raise ValueError(f"size: expected a positive UV size, found {size}")
    with torch.autocast(uv.device.type, enabled=False):
        a = _area_weights(d["U"], int(size), uv.device)
        m = mask.float()
        num = torch.einsum("ik,bckl,jl->bcij", a, uv.float() * m, a)
        cover = torch.einsum("ik,bckl,jl->bcij", a, m, a)
        valid = (cover >= min_coverage).float()
        return num / cover.clamp(min=1e-6) * valid, valid
