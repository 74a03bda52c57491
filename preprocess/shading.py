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
    rot = pose[:, :, :3].astype(np.float32)
    tris = np.asarray(model.triangles, np.int64)
    b, nv, nf = len(shape), model.n_vertices, len(tris)
    # sR V, the y-up camera frame, one (V, B) array per axis: einsum("bij,bvj->bvi")'s sums in its order (the same
    # values), and every later step reads contiguous rows of B values instead of 3-wide strided ones (~3x quicker)
    xyz = np.ascontiguousarray(shape.transpose(2, 1, 0))
    corner = [[((rot[:, i, 0] * xyz[0] + rot[:, i, 1] * xyz[1]) + rot[:, i, 2] * xyz[2])[tris[:, k]] for k in range(3)]
              for i in range(3)]  # corner[i][k]: axis i of the triangles' corner k, (F, B)
    e1 = [corner[i][1] - corner[i][0] for i in range(3)]
    e2 = [corner[i][2] - corner[i][0] for i in range(3)]
    face_n = np.empty((nf, b, 3))  # e1 x e2 as np.cross computes it: area-weighted, outward (geometry.vertex_normals)
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        face_n[:, :, i] = e1[j] * e2[k] - e1[k] * e2[j]
    # vertex normal = sum of its faces' normals: one sparse (V, F) product for every sample and axis at once
    incidence = sp.csr_matrix((np.ones(3 * nf), (tris.T.ravel(), np.tile(np.arange(nf), 3))), shape=(nv, nf))
    vn = (incidence @ face_n.reshape(nf, 3 * b)).astype(np.float32)
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


class _DirectionalBatch:
    """K variable-projection problems of :func:`fit_directional_lighting`, padded to one length N (pad rows weigh 0).

    For a unit light direction ``u``: ``lam = max(0, n . u)``, ``A = [1, lam]``, the per-channel
    ``coef = M^-1 A^T W c`` (``M = A^T W A + 1e-9 I``, ``W = sw^2``) in closed form and the residual
    ``f = sw (A coef - c)``, with the Huber cost ``0.5 s^2 sum rho((f / s)^2)`` (least_squares' ``loss="huber"``,
    ``f_scale = s``). The derivatives are taken in the tangent plane of the sphere at ``u`` (the residual depends on
    the direction only), through ``lam`` and ``coef``, and assembled as 2 x 2 normal equations without forming the
    (N * C, 2) Jacobian.

    n: (K, 3, N) unit normals; c: (K, C, N) colours; sw: (K, N) square roots of the robust row weights (0 on the
    padding); f_scale: (K,); all float64. A problem's numbers do not depend on the others in the batch.
    """

    def __init__(self, n: np.ndarray, c: np.ndarray, sw: np.ndarray, f_scale: np.ndarray):
        self.n, self.c, self.sw, self.w, self.fs = n, c, sw, sw * sw, f_scale
        self.w_sum = self.w.sum(1) + 1e-9
        self._rows: np.ndarray | None = None

    def _take(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The problems ``rows``' arrays (gathered once per change of the active set)."""
        if self._rows is None or not np.array_equal(rows, self._rows):
            self._rows = rows.copy()
            self._sub = tuple(x[rows] for x in (self.n, self.c, self.sw, self.w, self.fs, self.w_sum))
        return self._sub

    def evaluate(self, rows: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """The problems ``rows`` at unit directions ``u`` (k, 3): their cost (k,) and what the derivatives reuse."""
        n, c, sw, w, fs, w_sum = self._take(rows)
        t = np.matmul(u[:, None, :], n)[:, 0]  # (k, N)
        lam = np.maximum(t, 0.0)
        wl = w * lam
        m01, m11 = wl.sum(1), (wl * lam).sum(1) + 1e-9
        r0, r1 = np.matmul(c, w[..., None])[..., 0], np.matmul(c, wl[..., None])[..., 0]  # (k, C)
        det = w_sum * m11 - m01 * m01
        coef0 = (m11[:, None] * r0 - m01[:, None] * r1) / det[:, None]
        coef1 = (w_sum[:, None] * r1 - m01[:, None] * r0) / det[:, None]
        e = coef0[..., None] + lam[:, None, :] * coef1[..., None] - c  # (k, C, N)
        a = np.abs(sw[:, None, :] * e)
        a *= (1.0 / fs)[:, None, None]  # |f| / f_scale
        flat, over = a.reshape(len(u), -1), np.maximum(a - 1.0, 0.0).reshape(len(u), -1)
        # rho(a^2) = a^2 within the Huber threshold, 2a - 1 beyond it: a^2 - (a - 1)^2 in both cases
        cost = 0.5 * fs**2 * (np.einsum("kj,kj->k", flat, flat) - np.einsum("kj,kj->k", over, over))
        return {"sub": self._sub, "rows": rows, "t": t, "lam": lam, "m01": m01, "m11": m11, "det": det,
                "coef1": coef1, "e": e, "a": a, "cost": cost}

    def normal_equations(self, ev: dict[str, np.ndarray], sel: np.ndarray, tangent: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Gauss-Newton matrix (k, 2, 2) and gradient (k, 2) of the cost at ``ev``'s problems ``sel`` (bool) in the
        tangent coordinates ``tangent`` (k, 3, 2). As least_squares with a robust loss: the gradient is exact, the
        matrix counts the residuals within the Huber threshold (the loss is linear beyond it)."""
        rows = slice(None) if sel.all() else sel
        n, w, w_sum = (ev["sub"][k][rows] for k in (0, 3, 5))
        t, lam, m01, m11, det, b, e, a = (ev[k][rows] for k in ("t", "lam", "m01", "m11", "det", "coef1", "e", "a"))
        dlam = np.matmul(tangent.transpose(0, 2, 1), n) * (t > 0)[:, None, :]  # (k, 2, N)
        # d coef = M^-1 (-(A^T W dA) coef - dA^T W e), dA = [0, dlam]: (k, 2, C) for each of the two rows of A
        we = w[:, None, :] * e  # (k, C, N)
        q0, q1 = np.matmul(dlam, w[..., None]), np.matmul(dlam, (w * lam)[..., None])  # (k, 2, 1)
        rhs0 = -q0 * b[:, None, :]
        rhs1 = -q1 * b[:, None, :] - np.matmul(dlam, we.transpose(0, 2, 1))
        d0 = (m11[:, None, None] * rhs0 - m01[:, None, None] * rhs1) / det[:, None, None]
        d1 = (w_sum[:, None, None] * rhs1 - m01[:, None, None] * rhs0) / det[:, None, None]
        # de[ch, i] / d x_j = dlam[j, i] b[ch] + d0[j, ch] + lam[i] d1[j, ch]; residual f = sw e
        v = we / np.maximum(a, 1.0)  # (k, C, N): sw f Huber's d rho / d z (= min(1, f_scale / |f|))
        vb = np.matmul(b[:, None, :], v)[:, 0]  # (k, N): sum_ch b v
        v0, v1 = v.sum(2), np.matmul(v, lam[..., None])[..., 0]  # (k, C): sum_i v, sum_i lam v
        g = (np.matmul(dlam, vb[..., None])[..., 0] + np.einsum("kjc,kc->kj", d0, v0)
             + np.einsum("kjc,kc->kj", d1, v1))
        om = np.where(a <= 1.0, w[:, None, :], 0.0)  # (k, C, N)
        omb = om * b[..., None]
        p = np.matmul(b[:, None, :], omb)[:, 0]  # (k, N): sum_ch omega b^2
        h = np.matmul(dlam * p[:, None, :], dlam.transpose(0, 2, 1))
        gb0 = np.matmul(dlam, omb.transpose(0, 2, 1))  # (k, 2, C)
        gb1 = np.matmul(dlam * lam[:, None, :], omb.transpose(0, 2, 1))
        cross = np.einsum("kjc,klc->kjl", gb0, d0) + np.einsum("kjc,klc->kjl", gb1, d1)
        h += cross + cross.transpose(0, 2, 1)
        o0, o1, o2 = om.sum(2), np.matmul(om, lam[..., None])[..., 0], np.matmul(om, (lam * lam)[..., None])[..., 0]
        h += (np.einsum("kc,kjc,klc->kjl", o0, d0, d0) + np.einsum("kc,kjc,klc->kjl", o2, d1, d1)
              + np.einsum("kc,kjc,klc->kjl", o1, d0, d1) + np.einsum("kc,kjc,klc->kjl", o1, d1, d0))
        return h, g


def _tangent(u: np.ndarray) -> np.ndarray:
    """(k, 3, 2) orthonormal bases of the planes perpendicular to the unit vectors u (k, 3)."""
    axis = np.eye(3)[np.argmin(np.abs(u), 1)]
    t1 = axis - (axis * u).sum(1, keepdims=True) * u
    t1 /= np.sqrt((t1 * t1).sum(1, keepdims=True))
    return np.stack([t1, np.cross(u, t1)], 2)


def _trust_region_step(suf: np.ndarray, s: np.ndarray, v: np.ndarray, delta: np.ndarray, alpha: np.ndarray,
                       rtol: float = 0.01, max_iter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """scipy's ``solve_lsq_trust_region`` (More's Levenberg-Marquardt parameter search) for k problems at once, in
    its rank-deficient branch (the residual depends on ``p / |p|`` only, so ``J p = 0``).

    suf: (k, 3) ``s * U^T f``; s: (k, 3) singular values, descending; v: (k, 3, 3) right singular vectors (columns);
    delta: (k,) trust radii; alpha: (k,) the previous LM parameters (0: none). Returns steps (k, 3) and parameters.
    """
    upper = np.sqrt((suf * suf).sum(1)) / delta
    lower = np.zeros_like(upper)
    alpha = np.where(alpha == 0, 0.001 * upper, alpha)
    going = np.ones(len(s), bool)
    s2 = s * s
    for _ in range(max_iter):
        alpha = np.where(going & ((alpha < lower) | (alpha > upper)), np.maximum(0.001 * upper, np.sqrt(lower * upper)),
                         alpha)
        denom = s2 + alpha[:, None]
        p_norm = np.sqrt(((suf / denom) ** 2).sum(1))
        phi = p_norm - delta
        ratio = phi / (-(suf**2 / denom**3).sum(1) / p_norm)
        upper = np.where(going & (phi < 0), alpha, upper)
        lower = np.where(going, np.maximum(lower, alpha - ratio), lower)
        alpha = np.where(going, alpha - (phi + delta) * ratio / delta, alpha)
        going &= ~(np.abs(phi) < rtol * delta)
        if not going.any():
            break
    p = -np.matmul(v, (suf / (s2 + alpha[:, None]))[..., None])[..., 0]
    return p * (delta / np.sqrt((p * p).sum(1)))[:, None], alpha


def _trust_region_reflective(problem: _DirectionalBatch, x0: np.ndarray, max_nfev: int = 100, ftol: float = 1e-10,
                             xtol: float = 1e-10, gtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Minimise every problem's Huber cost over ``p`` (any length: ``u = p / |p|``) from ``x0`` (K, 3), a step of
    all problems at a time: scipy's ``least_squares(method="trf", loss="huber")`` without bounds (the fit's solver
    until issue 21), step for step on the tangent-plane normal equations instead of an SVD of the (N * C, 3)
    Jacobian, with 100x tighter tolerances than scipy's defaults (and 100 evaluations, not 60).

    The Jacobian has the null direction ``p``; scipy's SVD puts rounding noise there, which moves ``|p|`` and so the
    path; here that component is exactly 0. The optimum is the same to ~1e-3 degrees where the cost has one; where
    the clamp's kinks leave several within a fraction of a degree, the two solvers may settle in different ones.
    Returns ``p`` (K, 3) and the costs (K,).
    """
    k = len(x0)
    x = x0.copy()

    def derivatives(ev: dict[str, np.ndarray], sel: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, ...]:
        """p-space gradient (k, 3) and the SVD of the Jacobian (s, V, s U^T f) from the tangent-plane equations."""
        xn = np.sqrt((xs * xs).sum(1))
        u = xs / xn[:, None]
        tangent = _tangent(u)
        h, g = problem.normal_equations(ev, sel, tangent)
        lam, q = np.linalg.eigh(h)
        q = q[:, :, ::-1]
        v = np.concatenate([np.matmul(tangent, q), u[..., None]], 2)
        s = np.concatenate([np.sqrt(np.maximum(lam[:, ::-1], 0.0)) / xn[:, None], np.zeros((len(xs), 1))], 1)
        suf = np.concatenate([np.matmul(q.transpose(0, 2, 1), g[..., None])[..., 0] / xn[:, None],
                              np.zeros((len(xs), 1))], 1)
        return np.matmul(tangent, g[..., None])[..., 0] / xn[:, None], s, v, suf

    def unit(p: np.ndarray) -> np.ndarray:
        return p / np.maximum(np.sqrt((p * p).sum(1)), 1e-12)[:, None]

    ev = problem.evaluate(np.arange(k), unit(x))
    cost = ev["cost"]
    g, s, v, suf = derivatives(ev, np.ones(k, bool), x)
    delta = np.sqrt((x0 * x0).sum(1))
    delta[delta == 0] = 1.0
    alpha, nfev = np.zeros(k), np.ones(k, int)
    active = (np.abs(g).max(1) >= gtol) & (nfev < max_nfev)
    while active.any():
        a = np.flatnonzero(active)
        step, alpha[a] = _trust_region_step(suf[a], s[a], v[a], delta[a], alpha[a])
        js = s[a] * np.matmul(v[a].transpose(0, 2, 1), step[..., None])[..., 0]  # |J step|^2 = sum (s V^T step)^2
        predicted = -(0.5 * (js * js).sum(1) + (g[a] * step).sum(1))
        x_new = x[a] + step
        ev = problem.evaluate(a, unit(x_new))
        nfev[a] += 1
        step_norm = np.sqrt((step * step).sum(1))
        finite = np.isfinite(ev["cost"])
        actual = cost[a] - ev["cost"]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(predicted > 0, actual / predicted, np.where((predicted == 0) & (actual == 0), 1.0, 0.0))
        d_old = delta[a]
        d_new = np.where(ratio < 0.25, 0.25 * step_norm,
                         np.where((ratio > 0.75) & (step_norm > 0.95 * d_old), 2.0 * d_old, d_old))
        x_norm = np.sqrt((x[a] * x[a]).sum(1))
        done = finite & (((actual < ftol * cost[a]) & (ratio > 0.25)) | (step_norm < xtol * (xtol + x_norm)))
        go_on = finite & ~done
        alpha[a[go_on]] *= d_old[go_on] / d_new[go_on]
        delta[a[go_on]] = d_new[go_on]
        delta[a[~finite]] = 0.25 * step_norm[~finite]
        accept = finite & (actual > 0)
        if accept.any():
            ia = a[accept]
            x[ia], cost[ia] = x_new[accept], ev["cost"][accept]
            g[ia], s[ia], v[ia], suf[ia] = derivatives(ev, accept, x[ia])
        active[a[done | (np.abs(g[a]).max(1) < gtol) | (nfev[a] >= max_nfev)]] = False
    return x, cost


def _directional_starts(c: np.ndarray, n: np.ndarray, config: ShadingConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """One problem of :func:`fit_directional_lighting`: its two starting directions (2, 3) (the first-order SH fit's
    and the camera's), the square roots of the robust row weights (N,) and the Huber scale."""
    first = fit_sh_lighting(c, n, 1, config).mean(1)[1:4]
    starts = np.stack([first / max(np.linalg.norm(first), 1e-9), np.array([0.0, 0.0, 1.0])])
    sw = np.sqrt(_huber_weights(c.mean(1) - np.median(c.mean(1)), 4 * config.huber))
    scale = 1.4826 * np.median(np.abs(c - np.median(c, 0))) + 1e-3
    return starts, sw, config.huber * scale / 2


def fit_directional_lighting_batch(colours: list[np.ndarray], normals: list[np.ndarray],
                                   config: ShadingConfig = ShadingConfig()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_directional_lighting` of B problems at once (one Levenberg-Marquardt iteration for all).

    colours: B arrays (N_b, C) float in [0, 1]; normals: B arrays (N_b, 3) unit. Returns ``coef`` (B, 2, C) and
    ``direction`` (B, 3), float64. Each problem's result is the same (bit for bit) alone or in any batch as long as
    no problem has more than ``config.max_fit_texels`` rows (the padded length).
    """
    b = len(colours)
    ch = colours[0].shape[1] if b else 3
    size = max([config.max_fit_texels] + [len(c) for c in colours])
    nn, cc = np.zeros((2 * b, 3, size)), np.zeros((2 * b, ch, size))
    sw, f_scale, u0 = np.zeros((2 * b, size)), np.zeros(2 * b), np.zeros((2 * b, 3))
    data = []
    for i, (colour, nrm) in enumerate(zip(colours, normals, strict=True)):
        c, n = colour.astype(np.float64), nrm.astype(np.float64)
        starts, w, fs = _directional_starts(c, n, config)
        data.append((c, n, w))
        for j in range(2):  # problem 2i + j: sample i from start j
            nn[2 * i + j, :, :len(n)], cc[2 * i + j, :, :len(n)], sw[2 * i + j, :len(n)] = n.T, c.T, w
            f_scale[2 * i + j], u0[2 * i + j] = fs, starts[j]
    p, cost = _trust_region_reflective(_DirectionalBatch(nn, cc, sw, f_scale), u0)
    u = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    coef, direction = np.zeros((b, 2, ch)), np.zeros((b, 3))
    for i, (c, n, w) in enumerate(data):
        direction[i] = u[2 * i + 1] if cost[2 * i + 1] < cost[2 * i] else u[2 * i]
        coef[i], _ = _directional_fit(np.maximum(n @ direction[i], 0.0), c, w ** 2)
    return coef, direction


def fit_directional_lighting(colour: np.ndarray, normals: np.ndarray,
                             config: ShadingConfig = ShadingConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Robust ambient + clamped-Lambertian light: ``colour ~ ambient + diffuse * max(0, n . l)`` per channel.

    The direction ``l`` (grey, shared by the channels) starts from the first-order SH fit and from the camera's
    direction, and is refined by Huber-robust variable projection (``ambient``, ``diffuse`` solved in closed form
    for each ``l``; the lower cost of the two starts wins).

    colour: (N, C) float in [0, 1]; normals: (N, 3) unit.
    Returns ``coef``: (2, C) float64 (row 0 ambient, row 1 diffuse) and ``direction``: (3,) unit float64.
    """
    coef, direction = fit_directional_lighting_batch([colour], [normals], config)
    return coef[0], direction[0]


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
    return estimate_shading_batch(uv_gt[None], mask[None], normals[None], config)[0]


def estimate_shading_batch(uv_gt: np.ndarray, mask: np.ndarray, normals: np.ndarray,
                           config: ShadingConfig = ShadingConfig()) -> np.ndarray:
    """:func:`estimate_shading` of B photos, the directional lights fitted together (the same numbers, bit for bit,
    as one photo at a time): uv_gt (B, U, U, C), mask (B, U, U) bool, normals (B, U, U, 3) -> (B, U, U, C) float32."""
    if normals.shape != uv_gt.shape[:3] + (3,) or mask.shape != uv_gt.shape[:3]:
        raise ValueError(f"estimate_shading_batch: uv_gt {uv_gt.shape}, mask {mask.shape} and normals "
                         f"{normals.shape} must be (B, U, U, C), (B, U, U) and (B, U, U, 3)")
    ch = uv_gt.shape[3]
    out = np.ones(uv_gt.shape, np.float32)
    picked = []
    for i in range(len(uv_gt)):
        a = np.abs(normals[i])
        nonzero = (a[..., 0] + a[..., 1]) + a[..., 2] > 0  # sum(-1), ~10x quicker
        sel = np.flatnonzero(mask[i].ravel() & nonzero.ravel())
        if sel.size >= config.min_texels:
            sel = sel[:: max(1, -(-sel.size // config.max_fit_texels))]
            picked.append((i, sel, uv_gt[i].reshape(-1, ch)[sel], normals[i].reshape(-1, 3)[sel]))
    if config.model == "directional" and picked:
        coefs, directions = fit_directional_lighting_batch([c for _, _, c, _ in picked], [n for *_, n in picked],
                                                           config)
    for j, (i, sel, colour, nrm) in enumerate(picked):
        if config.model == "directional":
            lam = np.maximum(normals[i].astype(np.float64) @ directions[j], 0.0)
            shading = coefs[j][0] + lam[..., None] * coefs[j][1]
        else:
            order = 2 if config.model == "sh9" else 1
            shading = sh_basis(normals[i], order) @ fit_sh_lighting(colour, nrm, order, config)
        fitted = shading.reshape(-1, ch)[sel]
        flat = np.median(np.abs(colour - np.median(colour, 0)))  # residual of a constant shading
        lit = np.median(np.abs(colour - fitted * np.median(colour / np.maximum(fitted, 1e-6), 0)))
        if lit > (1 - config.min_gain) * flat:
            continue
        floor = config.min_shading * np.maximum(np.median(shading.reshape(-1, ch)[sel], 0), 1e-3)
        out[i] = np.maximum(shading, floor)
    return out
