"""Pseudo ground-truth texture UV_bl: symmetric fill of UV_gt, then Poisson blending into UV_bfm (Eq. 9).

The unwrapped photo texture ``UV_gt`` is only observed where the face was visible. Texels that are
missing but whose mirror texel (``u -> 1 - u``) was observed first take the mirror's value (the
paper's Fig. 5h); the result is then blended into the model texture ``UV_bfm`` by solving the
Poisson equation (Pérez et al. 2003) on the observed region.

Discretisation (shared by every solver, so they all solve the *same* linear system):

* Unknowns are the texels of ``Omega = mask``; the 5-point stencil links 4-neighbours. Neighbours
  outside the image are absent (homogeneous Neumann on the image border).
* Guidance is ``source_p - source_q`` on edges with both ends in ``Omega``. On edges that cross
  ``dOmega`` the source is not trusted (UV_gt is unobserved outside its mask), so the guidance
  there is the target's own gradient ``target_p - target_q``. With ``f_q = target_q`` fixed outside,
  the edge term becomes ``f_p - target_p``: the Dirichlet condition ``f = target`` acts on every
  crossing edge, and a source that differs from the target by a constant blends back to the target
  exactly.
* The solvers work on the correction ``g = f - source`` on ``Omega``, which solves the Laplace
  equation ``L g = b`` with ``b_p = n_p (target_p - source_p)`` (``n_p`` = number of crossing edges
  of ``p``). ``g`` is harmonic, hence smooth, which makes multigrid converge in a few cycles.
"""

from __future__ import annotations

import cv2
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from preprocess.config import BlendConfig, ShadingConfig
from preprocess.shading import estimate_shading, estimate_shading_batch

SOURCE_MODEL = 0
"""``source_map`` code: texel comes from the model texture UV_bfm (via the Poisson solution)."""
SOURCE_OBSERVED = 1
"""``source_map`` code: texel was observed in UV_gt."""
SOURCE_MIRRORED = 2
"""``source_map`` code: texel was missing in UV_gt and filled from its mirror texel."""
SOURCE_OUTSIDE = 255
"""``source_map`` code: texel lies outside the face layout (only when a face mask is given)."""


# ----------------------------------------------------------------------------------------------
# Linear system
# ----------------------------------------------------------------------------------------------


def _index_map(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(H+2, W+2) int64 map texel -> unknown index (raster order), -1 outside ``mask`` and on the pad."""
    idx = np.full((mask.shape[0] + 2, mask.shape[1] + 2), -1, np.int64)
    n = int(np.count_nonzero(mask))
    idx[1:-1, 1:-1][mask] = np.arange(n)
    return idx, n


def _degree(shape: tuple[int, int], sides: tuple[bool, bool, bool, bool] = (True,) * 4) -> np.ndarray:
    """(H, W) float32 number of neighbours of each texel; ``sides`` (top, bottom, left, right) that are
    image borders have no neighbour beyond them (Neumann), the others have one (Dirichlet)."""
    h, w = shape
    deg = np.full((h, w), 4, np.float32)
    for on, sl in zip(sides, (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]), strict=True):
        if on:
            deg[sl] -= 1
    return deg


def _laplacian_csr(mask: np.ndarray, deg: np.ndarray, dtype) -> tuple[sp.csr_matrix, np.ndarray]:
    """Masked 5-point Laplacian with the given (H, W) neighbour counts; see :func:`poisson_system`."""
    idx, n = _index_map(mask)
    r, c = np.nonzero(mask)
    r1, c1 = r + 1, c + 1
    # Columns of each row in increasing order: up, left, self, right, down (raster numbering).
    cols = np.stack([idx[r1 - 1, c1], idx[r1, c1 - 1], idx[r1, c1], idx[r1, c1 + 1], idx[r1 + 1, c1]], 1)
    valid = cols >= 0
    n_inside = valid.sum(1) - 1
    vals = np.broadcast_to(np.array([-1, -1, 0, -1, -1], dtype), cols.shape).copy()
    vals[:, 2] = deg[mask]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(valid.sum(1), out=indptr[1:])
    a = sp.csr_matrix((vals[valid], cols[valid], indptr), shape=(n, n))
    a.has_sorted_indices = True
    return a, (deg[mask] - n_inside).astype(dtype)


def poisson_system(mask: np.ndarray, dtype=np.float64) -> tuple[sp.csr_matrix, np.ndarray]:
    """Assemble the masked 5-point Laplacian of Eq. 9 without a python loop over texels.

    Args:
        mask: (H, W) bool, the unknown texels Omega.
        dtype: dtype of the matrix values.

    Returns:
        ``A``: (n, n) CSR, n = mask.sum(), unknowns in raster order; row ``p`` holds the number of
        in-image neighbours of ``p`` on the diagonal and -1 for each neighbour inside Omega. SPD unless
        Omega is the whole image.
        ``n_cross``: (n,) number of neighbours of each unknown outside Omega but inside the image.
        The correction ``g = f - source`` of Eq. 9 solves ``A g = n_cross * (target - source)``.
    """
    return _laplacian_csr(mask, _degree(mask.shape), dtype)


# ----------------------------------------------------------------------------------------------
# Matrix-free geometric multigrid on the (cropped) texel grid, all channels at once
# ----------------------------------------------------------------------------------------------

_CROSS = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32)


def _mask3(mask: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat(mask[:, :, None].astype(np.float32), channels, axis=2)


class _Level:
    """One grid of the hierarchy: the masked operator ``A x = m * (diag x - sum of 4 neighbours)``.

    Holds preallocated work images: every hot loop writes into these (``dst=``) instead of allocating,
    which on a 256^2 RGB grid is several times faster than fresh arrays (page faults dominate).
    """

    def __init__(self, mask: np.ndarray, deg: np.ndarray, channels: int, omega: float):
        self.mask = mask
        self.m3 = _mask3(mask, channels)
        self.diag = deg
        self.degm3 = np.ascontiguousarray(self.m3 * deg[:, :, None])
        self.wdinv3 = np.ascontiguousarray(self.m3 * (omega / deg[:, :, None]))
        h, w = mask.shape
        self.rhs, self.x, self.t1, self.t2 = (np.zeros((h, w, channels), np.float32) for _ in range(4))
        even = (h + h % 2, w + w % 2, channels)
        self.pad, self.blur, self.up = (np.zeros(even, np.float32) for _ in range(3))  # even-sized scratch

    def apply(self, x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
        """``out = A x`` for a (H, W, C) ``x`` that is zero outside the mask; ``tmp`` is scratch."""
        cv2.filter2D(x, -1, _CROSS, dst=tmp, borderType=cv2.BORDER_CONSTANT)
        cv2.multiply(self.m3, tmp, dst=tmp)
        cv2.multiply(self.degm3, x, dst=out)
        return cv2.subtract(out, tmp, dst=out)


def _restrict(fine: _Level, r: np.ndarray, coarse: _Level) -> np.ndarray:
    """Transpose of :func:`_prolong` into ``coarse.rhs``: [1 2 1]/4 blur (reflecting border), 2x2 sum."""
    hc, wc = coarse.mask.shape
    h, w = r.shape[:2]
    if (h, w) != (2 * hc, 2 * wc):  # odd size: zero-pad to even (the pad row/column is outside the mask)
        fine.pad[:h, :w] = r
        r = fine.pad
    cv2.GaussianBlur(r, (3, 3), 0, dst=fine.blur, borderType=cv2.BORDER_REFLECT)
    cv2.resize(fine.blur, (wc, hc), dst=coarse.rhs, interpolation=cv2.INTER_AREA)
    return cv2.multiply(coarse.rhs, coarse.m3, dst=coarse.rhs, scale=4.0)


def _prolong_add(xc: np.ndarray, fine: _Level, x: np.ndarray) -> np.ndarray:
    """``x += m * P xc``: cell-centred bilinear interpolation (9/16, 3/16, 3/16, 1/16), replicated border."""
    h, w = fine.mask.shape
    up = fine.up
    cv2.resize(xc, (up.shape[1], up.shape[0]), dst=up, interpolation=cv2.INTER_LINEAR)
    if up.shape[:2] != (h, w):
        up = np.ascontiguousarray(up[:h, :w])
    cv2.multiply(up, fine.m3, dst=fine.t2)
    return cv2.add(x, fine.t2, dst=x)


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32 number of 4-neighbours of each texel inside ``mask`` (none beyond the image), at least 1
    (a texel with none is outside the unknowns or, on a coarse grid, an isolated one: 1 keeps it regular)."""
    return np.maximum(cv2.filter2D(mask.astype(np.float32), -1, _CROSS, borderType=cv2.BORDER_CONSTANT), 1.0)


def _coarsen(mask: np.ndarray, op) -> np.ndarray:
    """2x2 pooling (``op`` = np.any / np.all) of a (H, W) bool mask; odd sizes padded with False.

    The four children combined elementwise (| or &): the same mask as ``op`` over a (H/2, 2, W/2, 2) view, ~10x
    quicker than numpy's reduction over the two 2-wide axes."""
    h, w = mask.shape
    m = np.zeros((h + h % 2, w + w % 2), bool)
    m[:h, :w] = mask
    both = np.logical_or if op is np.any else np.logical_and
    return both(both(m[0::2, 0::2], m[0::2, 1::2]), both(m[1::2, 0::2], m[1::2, 1::2]))


class _Multigrid:
    """Geometric multigrid for the Eq. 9 system on a texel grid; one V-cycle is an SPD preconditioner.

    Coarse grids pool 2x2 texels (a coarse texel is unknown if all its children are: a coarse domain
    inside the fine one under-corrects near the boundary, which smoothing fixes, whereas a larger one
    over-corrects the smoothest modes), the coarse operator is the 5-point stencil rediscretised there
    (measured: 6 PCG iterations vs 10 for 'any' pooling on a 256^2 face mask; with a partial Dirichlet boundary,
    coarse texels on the Neumann side pool with 'any' instead), interpolation is cell-centred
    bilinear and restriction its transpose, smoothing is weighted Jacobi. The coarsest grid is solved
    with a dense inverse. Everything is matrix-free OpenCV filtering on (H, W, C) float32 images, so all
    channels are smoothed, restricted and interpolated together.
    """

    def __init__(self, mask: np.ndarray, deg: np.ndarray, sides: tuple[bool, ...], channels: int,
                 config: BlendConfig, boundary: np.ndarray | None = None):
        self.nu = config.smoothing_steps
        self.omega = 0.8
        self.levels = [_Level(mask, deg, channels, self.omega)]
        while self.levels[-1].mask.sum() > config.coarsest_size:
            fine = self.levels[-1].mask
            m = _coarsen(fine, np.all)
            if boundary is None:
                deg_c = _degree(m.shape, sides)
            else:  # partial Dirichlet: a coarse texel is unknown also where its children are unknown or free
                # (Neumann) texels, Dirichlet where any child is a boundary texel, free elsewhere. Pinning the texels
                # that straddle the Neumann side to 0 (as 'all' pooling does) took 20-63 PCG iterations on FFHQ-like
                # mirrored halves; this 6-17 (issue 21)
                near = _coarsen(boundary, np.any)
                m |= _coarsen(fine, np.any) & ~near
                boundary = near & ~m
                deg_c = _neighbour_count(m | boundary)
            if not m.any():
                break
            self.levels.append(_Level(m, deg_c, channels, self.omega))
        last = self.levels[-1]
        self.flat = np.flatnonzero(last.mask)
        self.inverse = None  # coarsening stalled (checkerboard-like mask): smooth harder instead
        if len(self.levels) > 1 and self.flat.size <= 4 * config.coarsest_size:
            a, _ = _laplacian_csr(last.mask, last.diag, np.float64)
            self.inverse = spla.splu(a.tocsc())  # sparse LU: ~1 ms here, vs ~75 ms for a dense inverse

    def vcycle(self, r: np.ndarray, level: int = 0) -> np.ndarray:
        """Approximate ``A^-1 r`` for a (H, W, C) residual that is zero outside the mask.

        Returns the level's work image ``x`` (overwritten by the next call on this level).
        """
        lv = self.levels[level]
        last = level == len(self.levels) - 1
        if last and self.inverse is not None:
            ch = r.shape[2]
            lv.x.reshape(-1, ch)[self.flat] = self.inverse.solve(r.reshape(-1, ch)[self.flat].astype(np.float64))
            return lv.x
        x = cv2.multiply(lv.wdinv3, r, dst=lv.x)
        for _ in range((20 if last else self.nu) - 1):
            self._jacobi(lv, x, r)
        if not last:
            res = lv.apply(x, lv.t1, lv.t2)
            cv2.subtract(r, res, dst=res)
            xc = self.vcycle(_restrict(lv, res, self.levels[level + 1]), level + 1)
            _prolong_add(xc, lv, x)
            for _ in range(self.nu):
                self._jacobi(lv, x, r)
        return x

    def _jacobi(self, lv: _Level, x: np.ndarray, r: np.ndarray) -> None:
        """In place ``x += w D^-1 (r - A x)``, fused as ``(1 - w) x + w D^-1 (r + neighbour sum)``."""
        cv2.filter2D(x, -1, _CROSS, dst=lv.t1, borderType=cv2.BORDER_CONSTANT)
        cv2.add(r, lv.t1, dst=lv.t1)
        cv2.multiply(lv.wdinv3, lv.t1, dst=lv.t1)
        cv2.scaleAdd(x, 1.0 - self.omega, lv.t1, dst=x)


def _scalar(v: np.ndarray) -> tuple[float, ...]:
    """Per-channel factors as an OpenCV Scalar."""
    return tuple(float(x) for x in v) + (0.0,) * (4 - len(v))


def _pcg(level: _Level, b: np.ndarray, precond, tol: float, max_iter: int) -> np.ndarray:
    """Preconditioned CG on every channel of a (H, W, C) right-hand side at once (own step sizes each).

    Stops when the largest absolute update of any texel in one iteration is below ``tol``.
    """
    ch = b.shape[2]
    x, d, ad, tmp = (np.zeros_like(b) for _ in range(4))
    r = b.copy()

    def dots(u, v):
        return np.array(cv2.sumElems(cv2.multiply(u, v, dst=tmp))[:ch])

    z = precond(r)
    d[...] = z
    rz = dots(r, z)
    for _ in range(max_iter):
        level.apply(d, ad, tmp)
        dad = dots(d, ad)
        alpha = _scalar(np.divide(rz, dad, out=np.zeros_like(rz), where=dad > 0))
        cv2.multiply(d, alpha, dst=tmp)
        cv2.add(x, tmp, dst=x)
        if cv2.norm(tmp, cv2.NORM_INF) < tol:
            return x
        cv2.multiply(ad, alpha, dst=ad)
        cv2.subtract(r, ad, dst=r)
        z = precond(r)
        rz_new = dots(r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        cv2.multiply(d, _scalar(beta), dst=d)
        cv2.add(z, d, dst=d)
        rz = rz_new
    raise RuntimeError(f"Poisson blend: CG did not reach tol={tol:g} in {max_iter} iterations; "
                       f"raise BlendConfig.max_iter or use solver='direct'")


def _solve_sparse(a: sp.csr_matrix, b: np.ndarray, solver: str, config: BlendConfig) -> np.ndarray:
    """Solve ``A x = b`` for (n, C) ``b`` with sparse LU ("direct") or pyamg ("amg"); (n, C) float64."""
    if solver == "direct":  # one symmetric-ordered factorisation, all channels as one multi-column solve
        lu = spla.splu(a.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options={"SymmetricMode": True})
        return lu.solve(b)
    import pyamg

    ml = pyamg.ruge_stuben_solver(a)  # one hierarchy, reused for every channel
    return np.stack([ml.solve(b[:, k], tol=1e-6, accel="cg", maxiter=config.max_iter)
                     for k in range(b.shape[1])], 1)


def _correction(target: np.ndarray, source: np.ndarray, mask: np.ndarray, sides: tuple[bool, ...],
                config: BlendConfig, boundary: np.ndarray | None = None) -> np.ndarray:
    """The correction ``g = f - source`` on a cropped grid, (H, W, C) float32, zero outside ``mask``.

    ``boundary``: None (every neighbour outside ``mask`` is Dirichlet) or (H, W) bool, the only Dirichlet texels;
    edges to texels in neither are dropped (homogeneous Neumann). Every component of ``mask`` must then touch it.
    """
    deg = _degree(mask.shape, sides) if boundary is None else _neighbour_count(mask | boundary)
    solver = config.solver
    if solver == "auto":
        solver = "direct" if np.count_nonzero(mask) < config.direct_below else "mgcg"
    if solver != "mgcg" or not 2 <= target.shape[2] <= 4:  # OpenCV images hold 2..4 channels (C=1 squeezes)
        solver = "direct" if solver == "mgcg" else solver
        a, n_cross = _laplacian_csr(mask, deg, np.float64)
        b = n_cross[:, None] * (target[mask].astype(np.float64) - source[mask])
        g = np.zeros(target.shape, np.float32)
        g[mask] = _solve_sparse(a, b, solver, config)
        return g
    m3 = _mask3(mask, target.shape[2])
    n_inside = cv2.filter2D(m3, -1, _CROSS, borderType=cv2.BORDER_CONSTANT)
    n_cross = cv2.multiply(cv2.subtract(np.repeat(deg[:, :, None], target.shape[2], 2), n_inside), m3)
    b = cv2.multiply(n_cross, cv2.subtract(target.astype(np.float32), source.astype(np.float32)))
    mg = _Multigrid(mask, deg, sides, target.shape[2], config, boundary)
    return _pcg(mg.levels[0], b, mg.vcycle, config.tol, config.max_iter)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_uv(x: np.ndarray, name: str, size: int | None = None) -> int:
    if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[2] != 3 or x.shape[0] != x.shape[1]:
        found = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must be a (U, U, 3) float array (UV image), found {found}")
    if size is not None and x.shape[0] != size:
        raise ValueError(f"{name} must be ({size}, {size}, 3) like the other UV inputs, found {x.shape}; "
                         f"resample the UV images to one size first")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 (or float64) in [0, 1], found dtype {x.dtype}; "
                        f"convert 8-bit images with img.astype(np.float32) / 255")
    return x.shape[0]


def _check_mask(m: np.ndarray | None, name: str, size: int) -> None:
    if m is None:
        return
    if not isinstance(m, np.ndarray) or m.shape != (size, size):
        raise ValueError(f"{name} must be a ({size}, {size}) bool array, found {getattr(m, 'shape', type(m))}")
    if m.dtype != bool:
        raise TypeError(f"{name} must have dtype bool, found {m.dtype}; use mask > 0 to convert")


def poisson_blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray,
                  config: BlendConfig = BlendConfig()) -> np.ndarray:
    """Poisson image blending, Eq. 9: ``source`` (UV_gt) pasted seamlessly into ``target`` (UV_bfm).

    Inside ``Omega = mask`` finds ``f`` with ``Laplace f = Laplace source`` (guidance field
    ``grad source``) and ``f = target`` on the boundary of Omega (see the module docstring for the
    exact discretisation); outside Omega the result is ``target``. Holes, several components and an
    Omega touching the image border (Neumann there) are handled. An empty mask returns ``target``.
    A full mask has no Dirichlet boundary, so ``f`` is only defined up to a constant per channel:
    it is pinned so that ``mean(f) = mean(target)``, i.e. ``f = source + mean(target - source)``.

    Args:
        target: (U, U, C) float in [0, 1], the model texture UV_bfm.
        source: (U, U, C) float in [0, 1], the observed texture UV_gt; only read inside ``mask``.
        mask: (U, U) bool, Omega.
        config: solver settings.

    Returns:
        (U, U, C) float32, not clipped (values may leave [0, 1] slightly where the guidance pushes).
    """
    if target.shape != source.shape or mask.shape != target.shape[:2]:
        raise ValueError(f"poisson_blend: target {target.shape}, source {source.shape} and mask {mask.shape} "
                         f"must share (U, U)")
    out = np.array(target, dtype=np.float32, copy=True)
    if not mask.any():
        return out
    if mask.all():
        offset = (target.astype(np.float64) - source).reshape(-1, target.shape[2]).mean(0)
        return (source + offset).astype(np.float32)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)  # bounding box of Omega and its outer ring
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    crop = np.s_[r0:r1, c0:c1]
    t, s, m = (np.ascontiguousarray(x[crop]) for x in (target, source, mask))
    g = _correction(t, s, m, (r0 == 0, r1 == h, c0 == 0, c1 == w), config)
    out[crop][m] = s[m] + g[m]
    return out


def _mirror_or_flip(mirror_index: np.ndarray | None, size: int) -> np.ndarray:
    """A checked (U*U,) int64 texel mirror index; None = the column flip (u -> 1 - u)."""
    if mirror_index is None:
        return np.arange(size * size, dtype=np.int64).reshape(size, size)[:, ::-1].ravel()
    mirror_index = np.asarray(mirror_index)
    if mirror_index.shape != (size * size,) or mirror_index.dtype.kind not in "iu":
        raise ValueError(f"mirror_index must be a ({size * size},) integer array (flat texel index, -1 = "
                         f"none), found {mirror_index.shape} {mirror_index.dtype}")
    return mirror_index.astype(np.int64, copy=False)


def _gather(x: np.ndarray, mirror_index: np.ndarray) -> np.ndarray:
    """``x`` read at each texel's mirror texel (texel 0 where there is none): (U, U, ...) -> (U, U, ...).

    np.take along the texel axis: the same copy as fancy indexing, ~5x quicker for (U, U, 3) rows."""
    safe = np.where(mirror_index >= 0, mirror_index, 0)
    return np.take(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), safe, axis=0).reshape(x.shape)


def symmetric_fill(uv_gt: np.ndarray, mask: np.ndarray, mirror_index: np.ndarray | None = None,
                   face_mask: np.ndarray | None = None, exclude: np.ndarray | None = None,
                   values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill texels missing in UV_gt from their observed mirror texel (Fig. 5h).

    Args:
        uv_gt: (U, U, 3) float in [0, 1], the unwrapped photo texture.
        mask: (U, U) bool, texels observed in ``uv_gt``.
        mirror_index: (U*U,) int64 flat index of each texel's mirror texel, -1 where it has none.
            None: the default face model's layout, exactly symmetric under a column flip (u -> 1-u).
        face_mask: optional (U, U) bool, texels inside the face layout; observations outside it are
            ignored and coded ``SOURCE_OUTSIDE``.
        exclude: optional (U, U) bool, texels never filled from their mirror (:func:`mirror_exclusion`).
        values: optional (U, U, 3), the value each texel takes when mirrored (e.g. :func:`relit_mirror`);
            None = the mirror texel's colour.

    Returns:
        ``filled``: (U, U, 3) same dtype as ``uv_gt``, observed and mirrored texels set, others unchanged.
        ``filled_mask``: (U, U) bool, observed or mirrored.
        ``source_map``: (U, U) uint8, ``SOURCE_OBSERVED`` / ``SOURCE_MIRRORED`` / ``SOURCE_MODEL`` /
        ``SOURCE_OUTSIDE``.
    """
    size = uv_gt.shape[0]
    observed = mask if face_mask is None else mask & face_mask
    mirror_index = _mirror_or_flip(mirror_index, size)
    mirrored = ~observed & (mirror_index >= 0).reshape(size, size) & _gather(observed, mirror_index)
    if values is None:
        values = _gather(uv_gt, mirror_index)
    if face_mask is not None:
        mirrored &= face_mask
    if exclude is not None:
        mirrored &= ~exclude
    filled = uv_gt.copy()
    filled[mirrored] = values[mirrored]
    source_map = np.full((size, size), SOURCE_MODEL, np.uint8)
    source_map[observed] = SOURCE_OBSERVED
    source_map[mirrored] = SOURCE_MIRRORED
    if face_mask is not None:
        source_map[~face_mask] = SOURCE_OUTSIDE
    return filled, observed | mirrored, source_map


def mirror_exclusion(mirror_index: np.ndarray | None, size: int, normals: np.ndarray | None = None,
                     nose_mask: np.ndarray | None = None, config: BlendConfig = BlendConfig()) -> np.ndarray:
    """Texels whose mirror is unreliable and which are therefore left to the model: (U, U) bool.

    * nose strip: texels of ``nose_mask`` whose mirror texel is closer than ``2 * config.nose_strip * U`` columns
      (both within ``nose_strip`` of the symmetry line): a fit that is a little off doubles the nose there;
    * grazing sources: texels whose mirror texel's normal has ``n_z < config.mirror_min_facing`` (seen
      obliquely, so it holds a smeared, silhouette-contaminated colour).

    mirror_index: (U*U,) int64 or None (column flip); normals: (U, U, 3) camera-frame unit normals or None (no
    grazing cut); nose_mask: (U, U) bool or None (no nose cut).
    """
    mirror_index = _mirror_or_flip(mirror_index, size)
    out = np.zeros((size, size), bool)
    if nose_mask is not None and config.nose_strip > 0:
        cols = np.tile(np.arange(size), size)
        near = np.abs(cols - _gather(cols.reshape(size, size), mirror_index).ravel()) < 2 * config.nose_strip * size
        out |= nose_mask & near.reshape(size, size)
    if normals is not None and config.mirror_min_facing is not None:
        out |= _gather(normals[..., 2], mirror_index) < config.mirror_min_facing
    return out


def relit_mirror(uv_gt: np.ndarray, mask: np.ndarray, normals: np.ndarray, mirror_index: np.ndarray | None,
                 config: ShadingConfig = ShadingConfig(), shading: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the albedo, not the colour (beyond the paper): ``uv_gt[m(t)] * S(n_t) / S(n_m(t))``.

    The lighting ``S`` is fitted on the observed texels (:func:`preprocess.shading.estimate_shading`).

    uv_gt: (U, U, 3) float in [0, 1]; mask: (U, U) bool observed texels; normals: (U, U, 3) camera-frame unit
    normals; mirror_index: (U*U,) int64 or None (column flip); shading: (U, U, 3) float32, ``S`` already estimated
    (:func:`relit_shadings` of a block of photos), or None (estimated here).
    Returns the relit mirror value of every texel (U, U, 3) float32 in [0, 1] (meaningful where the mirror was
    observed) and the shading (U, U, 3) float32.
    """
    size = uv_gt.shape[0]
    mirror_index = _mirror_or_flip(mirror_index, size)
    if shading is None:
        shading = estimate_shading(uv_gt, mask, normals, config)
    ratio = shading / _gather(shading, mirror_index)
    return np.clip(_gather(uv_gt, mirror_index) * ratio, 0.0, 1.0).astype(np.float32), shading


def blend_mirrored(filled: np.ndarray, observed: np.ndarray, mirrored: np.ndarray,
                   config: BlendConfig = BlendConfig()) -> np.ndarray:
    """Eq. 9 on the mirrored texels ("this step is also based on Equation 9"): gradients from the mirror, values
    at the boundary from the observed texels.

    Unknowns are the ``mirrored`` texels, guided by ``filled``'s gradients between them; every edge to an
    ``observed`` texel ``q`` imposes ``f_q = filled_q`` (Dirichlet); edges to other texels impose nothing
    (Neumann), so the model part does not pull on the mirror. A mirrored component that touches no observed
    texel keeps its values. Lighting and misregistration left at the observed | mirrored seam are so spread
    smoothly over the mirrored half instead of pasted.

    filled: (U, U, 3) float (observed and mirrored texels set); observed, mirrored: (U, U) bool, disjoint.
    Returns (U, U, 3) float32: ``filled`` with the mirrored texels replaced, not clipped.
    """
    out = np.array(filled, np.float32, copy=True)
    if not mirrored.any() or not observed.any():
        return out
    count = cv2.filter2D(observed.astype(np.float32), -1, _CROSS, borderType=cv2.BORDER_CONSTANT)
    touch = mirrored & (count > 0)
    n_comp, labels = cv2.connectedComponents(mirrored.astype(np.uint8), connectivity=4)
    anchored = np.zeros(n_comp, bool)
    anchored[np.unique(labels[touch])] = True
    anchored[0] = False
    unknown = anchored[labels] & mirrored
    if not unknown.any():
        return out
    # target_p = mean of p's observed neighbours, so that n_cross * (target_p - source_p) sums f_q - source_p
    pad = np.pad(np.where(observed[..., None], out, 0.0), ((1, 1), (1, 1), (0, 0)))
    total = sum(pad[1 + dy:pad.shape[0] - 1 + dy, 1 + dx:pad.shape[1] - 1 + dx]
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    target = np.where(count[..., None] > 0, total / np.maximum(count, 1.0)[..., None], out).astype(np.float32)
    rows, cols = np.flatnonzero(unknown.any(1)), np.flatnonzero(unknown.any(0))
    h, w = unknown.shape
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    crop = np.s_[r0:r1, c0:c1]
    m = np.ascontiguousarray(unknown[crop])
    g = _correction(np.ascontiguousarray(target[crop]), np.ascontiguousarray(out[crop]), m,
                    (r0 == 0, r1 == h, c0 == 0, c1 == w), config, boundary=np.ascontiguousarray(observed[crop]))
    out[crop][m] += g[m]
    return out


def _eroded(uv_mask: np.ndarray, config: BlendConfig) -> np.ndarray:
    """The observed texels :func:`blend_uv` trusts: ``uv_mask`` eroded by ``config.erode_px``."""
    if config.erode_px <= 0:
        return uv_mask
    kernel = np.ones((2 * config.erode_px + 1,) * 2, np.uint8)
    return cv2.erode(uv_mask.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)


def relit_shadings(uv_gt: np.ndarray, uv_mask: np.ndarray, normals: np.ndarray, face_mask: np.ndarray | None,
                   config: BlendConfig = BlendConfig()) -> np.ndarray | None:
    """The lighting :func:`blend_uv`'s relit fill estimates, for B photos at once (their directional fits solved
    together: :func:`preprocess.shading.estimate_shading_batch`).

    uv_gt: (B, U, U, 3) float in [0, 1]; uv_mask: (B, U, U) bool; normals: (B, U, U, 3); face_mask: (U, U) bool or
    None. Returns (B, U, U, 3) float32, each what ``blend_uv`` computes for its photo (pass it as ``shading``), or
    None when ``config`` has no relit fill.
    """
    if not (config.symmetric_fill and config.fill_mode == "relit"):
        return None
    observed = np.stack([_eroded(m, config) for m in uv_mask])
    if face_mask is not None:
        observed &= face_mask
    return estimate_shading_batch(uv_gt, observed, normals, config.shading)


def blend_uv(uv_gt: np.ndarray, uv_mask: np.ndarray, uv_bfm: np.ndarray, face_mask: np.ndarray | None = None,
             mirror_index: np.ndarray | None = None, config: BlendConfig = BlendConfig(),
             normals: np.ndarray | None = None, nose_mask: np.ndarray | None = None,
             shading: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo ground truth UV_bl: symmetric fill of UV_gt (Fig. 5h), then Poisson blend into UV_bfm (Eq. 9).

    Args:
        uv_gt: (U, U, 3) float32 in [0, 1], unwrapped photo texture (any value where unobserved).
        uv_mask: (U, U) bool, texels observed in ``uv_gt``.
        uv_bfm: (U, U, 3) float32 in [0, 1], the fitted model texture.
        face_mask: optional (U, U) bool, texels inside the face layout; outside it UV_bl = UV_bfm.
        mirror_index: optional (U*U,) int64 texel mirror index (-1 = none); None = column flip.
        config: blending settings.
        normals: (U, U, 3) float unit normals of the fitted shape in the camera frame
            (:func:`preprocess.shading.uv_normals`); needed by ``fill_mode="relit"`` and ``mirror_min_facing``.
        nose_mask: optional (U, U) bool, the layout's nose region (for ``nose_strip``).
        shading: optional (U, U, 3) float32, the relit fill's lighting already estimated for a block of photos
            (:func:`relit_shadings`, the same numbers); None = estimated here when ``fill_mode="relit"``.

    Returns:
        ``uv_bl``: (U, U, 3) float32 in [0, 1].
        ``source_map``: (U, U) uint8, per texel where its content came from (``SOURCE_*`` codes).
    """
    size = _check_uv(uv_gt, "uv_gt")
    _check_uv(uv_bfm, "uv_bfm", size)
    _check_mask(uv_mask, "uv_mask", size)
    _check_mask(face_mask, "face_mask", size)
    _check_mask(nose_mask, "nose_mask", size)
    for name, x in (("uv_gt", uv_gt), ("uv_bfm", uv_bfm)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN/inf; set unobserved texels to 0 and mark them in uv_mask")
    needs_normals = config.symmetric_fill and (config.fill_mode == "relit" or config.mirror_min_facing is not None)
    if needs_normals and (normals is None or normals.shape != (size, size, 3)):
        raise ValueError(f"blend_uv: fill_mode={config.fill_mode!r} / mirror_min_facing={config.mirror_min_facing} "
                         f"need normals ({size}, {size}, 3) (preprocess.shading.uv_normals of the fitted shape), "
                         f"found {getattr(normals, 'shape', None)}; or use BlendConfig.paper_mirror()")
    uv_mask = _eroded(uv_mask, config)
    if config.symmetric_fill:
        observed = uv_mask if face_mask is None else uv_mask & face_mask
        values = None
        if config.fill_mode == "relit":
            values, _ = relit_mirror(uv_gt, observed, normals, mirror_index, config.shading, shading)
        exclude = mirror_exclusion(mirror_index, size, normals if config.mirror_min_facing is not None else None,
                                   nose_mask, config)
        filled, fill_mask, source_map = symmetric_fill(uv_gt, uv_mask, mirror_index, face_mask, exclude, values)
        if config.mirror_blend:
            filled = blend_mirrored(filled, observed, source_map == SOURCE_MIRRORED, config)
    else:
        filled, _, source_map = symmetric_fill(uv_gt, uv_mask, np.full(size * size, -1, np.int64), face_mask)
        fill_mask = source_map == SOURCE_OBSERVED
    if config.mode == "paste":
        uv_bl = poisson_blend(uv_bfm, filled, fill_mask, config)
    else:
        uv_bl = blend_model_into_photo(filled, fill_mask, uv_bfm, face_mask, config)
    if config.pad_px > 0 and face_mask is not None:
        uv_bl = pad_texture(uv_bl, face_mask, config.pad_px)
    return np.clip(uv_bl, 0.0, 1.0, out=uv_bl), source_map


def pad_texture(uv: np.ndarray, layout: np.ndarray, width: int) -> np.ndarray:
    """Extend a UV texture ``width`` texels past its layout, ring by ring, each new texel the mean of its filled
    3 x 3 neighbours; texels further out are 0. uv: (U, U, C) float; layout: (U, U) bool. The layout's texels are
    unchanged."""
    from preprocess.texture import extend_smoothly

    band = cv2.dilate(layout.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool)
    return extend_smoothly(np.where(layout[..., None], uv, 0.0), layout, band, max_rings=width, fast=True)


def blend_model_into_photo(filled: np.ndarray, known: np.ndarray, uv_bfm: np.ndarray, face_mask: np.ndarray | None,
                           config: BlendConfig = BlendConfig()) -> np.ndarray:
    """Eq. 9 with the roles swapped (``BlendConfig.mode = "fill"``): keep the photo texels, blend the model in.

    Unknowns are the layout texels not in ``known``; they follow UV_bfm's gradients, and every edge to a known
    texel ``q`` imposes ``f_q = filled_q`` (the standard Poisson-editing discretisation). Implemented with
    :func:`poisson_blend`, whose crossing edges pull the *inside* texel ``p`` towards ``target_p``: setting
    ``target_p - UV_bfm_p`` to the mean of ``filled_q - UV_bfm_q`` over p's known neighbours makes the two
    discretisations identical. The unknowns extend over the texels outside the layout too (guided by UV_bfm
    there as well), so the layout's rim imposes nothing (Neumann at the image border instead); outside the
    layout the result is UV_bfm.

    filled: (U, U, 3) float in [0, 1] (observed + mirrored texels); known: (U, U) bool; uv_bfm: (U, U, 3);
    face_mask: (U, U) bool layout or None (whole image). Returns (U, U, 3) float32, not clipped.
    """
    layout = np.ones_like(known) if face_mask is None else face_mask
    unknown = ~known
    diff = np.where(known[..., None], filled - uv_bfm, 0.0).astype(np.float32)
    pad_d = np.pad(diff, ((1, 1), (1, 1), (0, 0)))
    pad_k = np.pad(known, 1).astype(np.float32)
    total = sum(pad_d[1 + dy:pad_d.shape[0] - 1 + dy, 1 + dx:pad_d.shape[1] - 1 + dx]
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    count = sum(pad_k[1 + dy:pad_k.shape[0] - 1 + dy, 1 + dx:pad_k.shape[1] - 1 + dx]
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    mean_d = total / np.maximum(count, 1.0)[..., None]
    target = np.where(known[..., None], filled, uv_bfm + np.where(unknown[..., None], mean_d, 0.0))
    out = poisson_blend(target.astype(np.float32), np.asarray(uv_bfm, np.float32), unknown, config)
    return np.where(layout[..., None], out, uv_bfm).astype(np.float32)


def seam_gradient_ratio(uv_bl: np.ndarray, source_map: np.ndarray, a: int = SOURCE_OBSERVED,
               b: int = SOURCE_MIRRORED) -> float:
    """Brightness gradient across the ``a`` | ``b`` boundary over the gradient inside ``a``.

    uv_bl: (U, U, 3) float in [0, 1]; source_map: (U, U) uint8 ``SOURCE_*`` codes. The gradient is the absolute
    difference of the luminance (mean of RGB) between 4-neighbours; the ratio is the mean over neighbour pairs
    with one texel in ``a`` and one in ``b`` over the mean over pairs with both texels in ``a``. NaN when there
    is no such boundary. 1 = the seam is as smooth as the photo's own texture.
    """
    y = uv_bl.astype(np.float64).mean(-1)
    cross, inside = [], []
    for dy, dx in ((0, 1), (1, 0)):
        p, q = (np.s_[: y.shape[0] - dy, : y.shape[1] - dx], np.s_[dy:, dx:])
        g = np.abs(y[p] - y[q])
        sp, sq = source_map[p], source_map[q]
        cross.append(g[((sp == a) & (sq == b)) | ((sp == b) & (sq == a))])
        inside.append(g[(sp == a) & (sq == a)])
    cross, inside = np.concatenate(cross), np.concatenate(inside)
    if cross.size == 0 or inside.size == 0:
        return float("nan")
    return float(cross.mean() / max(inside.mean(), 1e-12))
