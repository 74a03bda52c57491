"""Lighting of a photo, estimated from its observed texels and the fitted shape's normals (beyond the paper).

UV_gt holds albedo x shading as the camera saw it. The symmetric fill of Eq. 9 (Fig. 5h) copies a texel's colour
to its mirror texel, which faces the light differently: copied verbatim, the lit side lands on the side facing
away from the light (on the synthetic world +37.6/255 too bright, docs/method/blend.md). The relit fill instead
divides the observed colour by the shading at its own normal and multiplies by the shading at the mirror
texel's normal. Only the *ratio* of shadings enters, so the albedo's overall level is never needed and is
absorbed into the fitted lighting: ``colour ~ shading(n)`` is fitted over all observed texels, robustly (skin
dominates; brows, eyes, lips and shadows are down-weighted).

Two lighting models, both low-order and fitted by robust least squares:

* ``directional`` (default): ``shading(n) = ambient + diffuse * max(0, n . l)`` per channel, one grey direction
  ``l`` (initialised from the first-order SH fit, refined by Huber-robust variable projection). The clamp is
  what lets it extrapolate to normals the photo never saw (the far cheek, facing away from the camera).
* ``sh9`` / ``sh4``: second- / first-order real spherical harmonics per channel (9 / 4 coefficients), IRLS with
  Huber weights and a ridge on the second-order band. They fit the observed half well but extrapolate poorly
  (a quadratic in ``n`` has no clamp); measured in ``benchmarks/blend_quality.py``.

Normals are in the camera frame of :mod:`common.geometry` (x right, y up, z towards the camera), so ``n_z`` is
the cosine of the view angle of the (orthographic) camera.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from common.facemodel import FaceModel
from common.geometry import split_params
from common.render import Fragments
from preprocess.config import ShadingConfig

# ----------------------------------------------------------------------------------------------
# Normals in UV space
# ----------------------------------------------------------------------------------------------


def _norm3(x: np.ndarray) -> np.ndarray:
    """``np.linalg.norm(x, axis=-1, keepdims=True)`` of (..., 3) vectors, the same values (the same sums in the same
    order) ~10x quicker than numpy's reduction over a 3-wide axis."""
    return np.sqrt((x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1]) + x[..., 2] * x[..., 2])[..., None]


def uv_normals(model: FaceModel, params: np.ndarray, uv_frags: Fragments) -> np.ndarray:
    """Unit normals of the fitted shapes in the camera frame, rasterised into the UV layout.

    Args:
        model: the face model the parameters belong to.
        params: (B, 62) fitted parameters (:mod:`common.geometry`); only the rotation and the shape matter.
        uv_frags: :func:`common.uvtools.model_uv_fragments` of the model at the UV size U.

    Returns:
        (B, U, U, 3) float32 unit normals (x right, y up, z towards the camera), interpolated from the
        area-weighted vertex normals; 0 outside the layout.
    """
    params = np.asarray(params, np.float64)
    if params.ndim != 2 or params.shape[1] != 62 or not np.isfinite(params).all():
        raise ValueError(f"params: expected finite (B, 62) fitted parameters, found {params.shape}")
    pose, a_id, a_exp = split_params(params)
    if np.linalg.det(pose[:, :, :3]).min() < 0:
        raise ValueError("params: the pose matrix is a reflection (det < 0); normals would point inwards")
    shape = model.shape(a_id[:, :model.n_id].astype(np.float32), a_exp[:, :model.n_exp].astype(np.float32))
    frame = np.einsum("bij,bvj->bvi", pose[:, :, :3].astype(np.float32), shape)  # sR V: the y-up camera frame
    tris = np.asarray(model.triangles, np.int64)
    b, nv, nf = len(frame), model.n_vertices, len(tris)
    v0, v1, v2 = (frame[:, tris[:, k]] for k in range(3))
    face_n = np.cross(v1 - v0, v2 - v0)  # (B, F, 3), area-weighted, outward (common.geometry.vertex_normals)
    # vertex normal = sum of its faces' normals: one sparse (V, F) product for every sample and axis at once
    incidence = sp.csr_matrix((np.ones(3 * nf), (tris.T.ravel(), np.tile(np.arange(nf), 3))), shape=(nv, nf))
    vn = (incidence @ face_n.transpose(1, 0, 2).reshape(nf, 3 * b).astype(np.float64)).astype(np.float32)
    vn = vn.reshape(nv, b, 3).transpose(1, 0, 2)
    vn /= np.maximum(_norm3(vn), 1e-12)
    tri = uv_frags.tri_id[0].numpy().ravel()  # (U * U,): one layout for every sample
    covered = np.flatnonzero(tri >= 0)
    bary = uv_frags.bary[0].numpy().reshape(-1, 3)[covered]
    # barycentric interpolation of the covered texels as one sparse (N, V) product (3 vertices a row)
    interp = sp.csr_matrix((bary.ravel().astype(np.float32), tris[tri[covered]].ravel(),
                            np.arange(0, 3 * covered.size + 1, 3)), shape=(covered.size, nv))
    vals = (interp @ vn.transpose(1, 0, 2).reshape(nv, 3 * b)).reshape(-1, b, 3).transpose(1, 0, 2)  # (B, N, 3)
    norm = _norm3(vals)
    img = np.zeros((b, tri.size, 3), np.float32)
    img[:, covered] = np.divide(vals, norm, out=np.zeros_like(vals), where=norm > 1e-6)
    return img.reshape(b, *uv_frags.tri_id.shape[1:], 3)


# ----------------------------------------------------------------------------------------------
# Lighting models
# ----------------------------------------------------------------------------------------------


def sh_basis(normals: np.ndarray, order: int) -> np.ndarray:
    """Real spherical harmonics up to ``order`` (1: 4 functions, 2: 9), unnormalised: (..., 3) -> (..., K).

    ``[1, x, y, z]`` then ``[xy, xz, yz, x^2 - y^2, 3z^2 - 1]`` (the constants of the normalised basis are
    absorbed into the fitted coefficients).
    """
    x, y, z = (normals[..., k].astype(np.float64) for k in range(3))
    funcs = [np.ones_like(x), x, y, z]
    if order >= 2:
        funcs += [x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]
    return np.stack(funcs, -1)


def _huber_weights(residual: np.ndarray, k: float) -> np.ndarray:
    """IRLS weights ``min(1, k s / |r|)`` of (N,) residuals, ``s`` the robust (MAD) scale."""
    s = 1.4826 * np.median(np.abs(residual)) + 1e-6
    return np.minimum(1.0, k * s / np.maximum(np.abs(residual), 1e-12))


def fit_sh_lighting(colour: np.ndarray, normals: np.ndarray, order: int = 2,
                    config: ShadingConfig = ShadingConfig()) -> np.ndarray:
    """Robust SH lighting ``colour ~ sh_basis(n) @ L`` per channel (IRLS, Huber weights on the grey residual).

    colour: (N, C) float in [0, 1]; normals: (N, 3) unit. Returns L: (K, C) float64, K = 4 (order 1) or 9.
    """
    a = sh_basis(normals, order)
    c = colour.astype(np.float64)
    reg = np.zeros(a.shape[1])
    reg[4:] = config.sh_ridge * len(c)
    w = np.ones(len(c))
    coeff = np.zeros((a.shape[1], c.shape[1]))
    for _ in range(config.irls_iters):
        aw = a * w[:, None]
        coeff = np.linalg.solve(aw.T @ a + np.diag(reg) + 1e-9 * np.eye(a.shape[1]), aw.T @ c)
        w = _huber_weights((a @ coeff - c).mean(1), config.huber)
    return coeff


def _directional_fit(lam: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted per-channel least squares ``c ~ ambient + diffuse * lam``: (2, C) coefficients, weighted cost."""
    a = np.stack([np.ones_like(lam), lam], 1)
    aw = a * w[:, None]
    coef = np.linalg.solve(aw.T @ a + 1e-9 * np.eye(2), aw.T @ c)
    return coef, float((w[:, None] * (a @ coef - c) ** 2).sum())


def _huber_rho(z: np.ndarray) -> np.ndarray:
    """least_squares' ``loss="huber"`` as a callable: (3, m) rho, rho', rho'' of z = (f / f_scale)^2 (m,).

    The same values, bit for bit, as scipy's built-in (the same expressions on the same elements), indexing the few
    outliers once instead of through six boolean masks: the built-in was a fifth of the lighting fit's time."""
    out = np.empty((3, z.size))
    out[0], out[1], out[2] = z, 1.0, 0.0
    far = np.flatnonzero(~(z <= 1))  # (NaN as the built-in)
    zf = z[far]
    out[0, far] = 2 * zf**0.5 - 1
    out[1, far] = zf**-0.5
    out[2, far] = -0.5 * zf**-1.5
    return out


class _DirectionalProblem:
    """The variable-projection residual of :func:`fit_directional_lighting` and its analytic Jacobian.

    For a light direction ``p`` (3,) (any length: ``l = p / |p|``), ``lam = max(0, n . l)``, ``A = [1, lam]`` and the
    per-channel ``coef = M^-1 A^T W c`` (``M = A^T W A``, ``W = sw^2``) in closed form; the residual is
    ``sw (A coef - c)`` flattened (N * C,). The Jacobian differentiates through ``lam`` and ``coef``: one evaluation
    in place of the four of 2-point differences (least_squares' default), and exact. The last evaluation is kept,
    since least_squares asks for the residual and the Jacobian at the same ``p``.

    n: (N, 3) unit normals; c: (N, C) colours; sw: (N,) square roots of the robust row weights; all float64.
    """

    def __init__(self, n: np.ndarray, c: np.ndarray, sw: np.ndarray):
        self.n, self.c, self.sw, self.w = n, c, sw, sw ** 2
        self._p: np.ndarray | None = None

    def _evaluate(self, p: np.ndarray) -> None:
        if self._p is not None and np.array_equal(self._p, p):
            return
        self.norm = max(np.linalg.norm(p), 1e-12)
        self.t = self.n @ (p / self.norm)
        lam = np.maximum(self.t, 0.0)
        self.a = np.stack([np.ones_like(lam), lam], 1)
        self.aw = self.a * self.w[:, None]
        self.m = self.aw.T @ self.a + 1e-9 * np.eye(2)
        self.coef = np.linalg.solve(self.m, self.aw.T @ self.c)
        self.e = self.a @ self.coef - self.c
        self._p = p.copy()

    def residual(self, p: np.ndarray) -> np.ndarray:
        """(N * C,) float64."""
        self._evaluate(p)
        return (self.sw[:, None] * self.e).ravel()

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """d residual / d p: (N * C, 3) float64."""
        self._evaluate(p)
        u = p / self.norm
        dlam = np.where((self.t > 0)[:, None], (self.n - self.t[:, None] * u) / self.norm, 0.0)  # (N, 3)
        coef = self.coef
        q = self.aw.T @ dlam  # (2, 3): A^T W dlam_i
        rhs = -q.T[:, :, None] * coef[1][None, None, :]  # (3, 2, C): -A^T W dA_i coef
        rhs[:, 1, :] -= dlam.T @ (self.w[:, None] * self.e)  # - dA_i^T W e
        dcoef = np.linalg.solve(self.m[None], rhs)  # (3, 2, C)
        # d e[n, ch] / d p_i = dlam[n, i] coef[1, ch] + dcoef[i, 0, ch] + lam[n] dcoef[i, 1, ch], laid out (N, C, 3)
        de = dlam[:, None, :] * coef[1][None, :, None] + dcoef[:, 0].T + self.a[:, 1, None, None] * dcoef[:, 1].T
        return (self.sw[:, None, None] * de).reshape(-1, 3)


def fit_directional_lighting(colour: np.ndarray, normals: np.ndarray,
                             config: ShadingConfig = ShadingConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Robust ambient + clamped-Lambertian light: ``colour ~ ambient + diffuse * max(0, n . l)`` per channel.

    The direction ``l`` (grey, shared by the channels) starts from the first-order SH fit and is refined by
    Huber-robust variable projection (``ambient``, ``diffuse`` solved in closed form for each ``l``).

    colour: (N, C) float in [0, 1]; normals: (N, 3) unit.
    Returns ``coef``: (2, C) float64 (row 0 ambient, row 1 diffuse) and ``direction``: (3,) unit float64.
    """
    from scipy.optimize import least_squares

    c = colour.astype(np.float64)
    n = normals.astype(np.float64)
    first = fit_sh_lighting(c, n, 1, config).mean(1)[1:4]
    starts = [first / max(np.linalg.norm(first), 1e-9), np.array([0.0, 0.0, 1.0])]
    sw = np.sqrt(_huber_weights(c.mean(1) - np.median(c.mean(1)), 4 * config.huber))

    problem = _DirectionalProblem(n, c, sw)

    scale = 1.4826 * np.median(np.abs(c - np.median(c, 0))) + 1e-3
    best = None
    for p0 in starts:
        r = least_squares(problem.residual, p0, jac=problem.jacobian, loss=_huber_rho, f_scale=config.huber * scale / 2,
                          max_nfev=60)
        if best is None or r.cost < best.cost:
            best = r
    direction = best.x / max(np.linalg.norm(best.x), 1e-12)
    coef, _ = _directional_fit(np.maximum(n @ direction, 0.0), c, sw ** 2)
    return coef, direction


def estimate_shading(uv_gt: np.ndarray, mask: np.ndarray, normals: np.ndarray,
                     config: ShadingConfig = ShadingConfig()) -> np.ndarray:
    """Shading of the photo's lighting at every texel's normal, fitted on the observed texels.

    Args:
        uv_gt: (U, U, C) float in [0, 1], the unwrapped photo texture.
        mask: (U, U) bool, texels observed in ``uv_gt`` (the fit uses these).
        normals: (U, U, 3) float unit camera-frame normals (:func:`uv_normals`), 0 outside the layout.
        config: lighting model and fit settings.

    Returns:
        (U, U, C) float32, positive everywhere (floored at ``min_shading`` x its median over the observed
        texels), in the units of ``uv_gt`` (the albedo's level is absorbed: only ratios are meaningful).
        Constant 1 when fewer than ``min_texels`` texels are observed.
    """
    if normals.shape != uv_gt.shape[:2] + (3,):
        raise ValueError(f"normals must be {uv_gt.shape[:2] + (3,)} (one camera-frame normal per texel), "
                         f"found {normals.shape}")
    a = np.abs(normals)
    sel = np.flatnonzero(mask.ravel() & ((a[..., 0] + a[..., 1]) + a[..., 2] > 0).ravel())  # sum(-1), ~10x quicker
    ch = uv_gt.shape[2]
    if sel.size < config.min_texels:
        return np.ones(uv_gt.shape, np.float32)
    sel = sel[:: max(1, -(-sel.size // config.max_fit_texels))]
    colour, nrm = uv_gt.reshape(-1, ch)[sel], normals.reshape(-1, 3)[sel]
    if config.model == "directional":
        coef, direction = fit_directional_lighting(colour, nrm, config)
        lam = np.maximum(normals.astype(np.float64) @ direction, 0.0)
        shading = coef[0] + lam[..., None] * coef[1]
    else:
        order = 2 if config.model == "sh9" else 1
        shading = sh_basis(normals, order) @ fit_sh_lighting(colour, nrm, order, config)
    fitted = shading.reshape(-1, ch)[sel]
    flat = np.median(np.abs(colour - np.median(colour, 0)))  # residual of a constant shading
    lit = np.median(np.abs(colour - fitted * np.median(colour / np.maximum(fitted, 1e-6), 0)))
    if lit > (1 - config.min_gain) * flat:
        return np.ones(uv_gt.shape, np.float32)
    floor = config.min_shading * np.maximum(np.median(shading.reshape(-1, ch)[sel], 0), 1e-3)
    return np.maximum(shading, floor).astype(np.float32)
