"""Refine a regressed 3DDFA fit against 2D landmarks from an independent detector (optional stage).

The regressor's 62 parameters (:mod:`common.faces.tddfa`, re-expressed in the photo's frame) are the start of a
Levenberg-Marquardt fit of the model's 68 landmarks (3DDFA's sparse basis, :class:`SparseLandmarkModel`) to
detected 2D landmarks ``q_i`` (e.g. dlib's 68-point shape predictor, :mod:`common.faces.dlib68`). The
maximum-a-posteriori objective, with landmark noise ``sigma`` (a fraction of the face size ``d``, the square
root of the detected landmarks' bounding-box area) and a Gaussian prior on the coefficients:

    E(c, R, t, alpha) = sum_i w_i rho(|x_i - q_i|^2 / (sigma d)^2)  +  lambda sum_k ((alpha_k - mu_k) / std_k)^2

with ``x_i = c R P0 X_i(alpha) + t`` the projected landmarks, ``P0`` the regressor's 3x3 camera (kept, so the
refinement starts exactly at the regressor's fit), ``c`` a scale factor, ``R`` a rotation applied in camera space,
``t`` the image-plane translation, ``alpha`` the 40 identity + 10 expression coefficients, ``rho`` Cauchy's
robust loss (iteratively reweighted), and the prior centred on 3DDFA_V2's parameter statistics (``stats``), on
the regressor's own estimate (``regressor``), or absent (``none``: coefficients are then not refined).

The fit is skipped (parameters returned unchanged, ``applied = False``) beyond ``max_yaw`` (2D detectors trained
on 300-W lose the far side of a profile) and when the detector disagrees with the regressor by more than
``max_disagreement`` of the face size (a failed detection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from common.geometry import N_PARAMS, N_POSE, params_to_euler, project_to_image, split_params

CONTOUR = np.arange(17)
"""iBUG indices of the jaw contour (their 2D silhouette convention differs from the 3D-model one)."""


@dataclass(frozen=True)
class RefineConfig:
    """Landmark refinement of a regressed fit (:func:`refine_to_landmarks`)."""

    contour_weight: float = 0.1
    """Weight of the 17 jaw-contour landmarks relative to the 51 inner ones (brows, eyes, nose, mouth): 2D
    detectors follow the silhouette, the model's contour points are fixed vertices (they agree only when frontal),
    so the contour only keeps the jaw from drifting."""
    sigma: float = 0.03
    """Landmark noise, a fraction of the face size (sqrt of the landmarks' bounding-box area)."""
    prior: Literal["stats", "regressor", "none"] = "stats"
    """Gaussian prior on the coefficients: centred on 3DDFA_V2's statistics, on the regressor's estimate, or none
    (pose only)."""
    prior_weight: float = 1.0
    """lambda: weight of the prior (1 = the statistics' own standard deviations)."""
    robust: float = 2.0
    """Cauchy scale of the landmark residuals in units of sigma (0 = plain least squares)."""
    max_yaw: float = 45.0
    """Degrees: faces turned further (by the regressor's estimate) are left as regressed."""
    max_disagreement: float = 0.15
    """Median detector-vs-regressor landmark distance (fraction of face size) above which the fit is skipped."""
    iterations: int = 30
    """Levenberg-Marquardt iterations at most."""
    tolerance: float = 1e-4
    """Stop when an iteration lowers the objective by less than this fraction."""


class RefineResult(NamedTuple):
    """params (N, 62) float32 refined (unchanged where not applied); applied (N,) bool; rms_before / rms_after
    (N,) float32: root-mean-square distance of the 51 inner landmarks to the targets, in pixels."""

    params: np.ndarray
    applied: np.ndarray
    rms_before: np.ndarray
    rms_after: np.ndarray


def _skew_rows(u: np.ndarray) -> np.ndarray:
    """u (K, 3) -> (K, 3, 3): d(delta x u)/d(delta) = -[u]_x, for a small rotation ``delta`` applied to u."""
    z = np.zeros(len(u))
    return -np.stack([np.stack([z, -u[:, 2], u[:, 1]], -1),
                      np.stack([u[:, 2], z, -u[:, 0]], -1),
                      np.stack([-u[:, 1], u[:, 0], z], -1)], 1)


def _rodrigues(w: np.ndarray) -> np.ndarray:
    """Rotation vector (3,) -> (3, 3)."""
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.eye(3)
    k = w / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * kx @ kx


def _refine_one(params: np.ndarray, target: np.ndarray, point_w: np.ndarray, basis: tuple, frame_size: float,
                mu: np.ndarray, std: np.ndarray, fit_coeffs: bool, config: RefineConfig) -> np.ndarray:
    """One face: params (62,) float64 image frame, target (K, 2), point weights (K,), bases of those K -> (62,)."""
    mean, w_id, w_exp = basis  # (K, 3), (K, 3, 40), (K, 3, 10)
    basis_all = np.concatenate([w_id, w_exp], 2)  # (K, 3, 50)
    m0 = params[:12].reshape(3, 4)[:, :3]
    t0 = params[:12].reshape(3, 4)[:, 3]
    wh = target.max(0) - target.min(0)
    scale = config.sigma * float(np.sqrt(max(wh[0] * wh[1], 1e-6)))
    sq_lam = np.sqrt(config.prior_weight)
    sq_w = np.repeat(np.sqrt(point_w), 2)

    def unpack(state):
        c, rot, t, coef = state
        u = (mean + basis_all @ coef) @ (rot @ m0).T  # camera-space landmarks (K, 3)
        xy = np.stack([c * u[:, 0] + t[0], frame_size - (c * u[:, 1] + t[1])], -1)
        return u, xy

    def residuals(state):
        _, xy = unpack(state)
        r_lm = sq_w * ((xy - target) / scale).reshape(-1)
        r_pr = sq_lam * (state[3] - mu) / std if fit_coeffs else np.zeros(0)
        return r_lm, r_pr

    def weights(r_lm):
        if config.robust <= 0:
            return np.ones_like(r_lm)
        d2 = ((r_lm / np.maximum(sq_w, 1e-12)).reshape(-1, 2) ** 2).sum(1) / config.robust ** 2
        return np.repeat(1.0 / np.sqrt(1.0 + d2), 2)  # sqrt of the Cauchy IRLS weight 1 / (1 + d^2)

    def jacobian(state):
        c, rot, _, _ = state
        u, _ = unpack(state)
        k = len(u)
        n = 6 + (basis_all.shape[2] if fit_coeffs else 0)
        j = np.zeros((k, 2, n))
        sign = np.array([1.0, -1.0])  # image y = S - camera y
        j[:, :, 0] = sign * u[:, :2]  # scale factor c
        j[:, :, 1:4] = sign[:, None] * c * _skew_rows(u)[:, :2]  # small rotation in camera space
        j[:, 0, 4], j[:, 1, 5] = 1.0, -1.0  # translation
        if fit_coeffs:
            db = np.einsum("ij,kjn->kin", rot @ m0, basis_all)  # (K, 3, 50)
            j[:, :, 6:] = sign[:, None] * c * db[:, :2]
        j_lm = sq_w[:, None] * j.reshape(2 * k, n) / scale
        j_pr = np.concatenate([np.zeros((n - 6, 6)), sq_lam * np.diag(1.0 / std)], 1) if fit_coeffs else None
        return j_lm, j_pr

    def step(state, delta):
        c, rot, t, coef = state
        coef = coef + delta[6:] if fit_coeffs else coef
        return c + delta[0], _rodrigues(delta[1:4]) @ rot, t + np.r_[delta[4:6], 0.0], coef

    state = (1.0, np.eye(3), t0.copy(), params[N_POSE:].astype(np.float64))
    damping = 1e-3
    for _ in range(config.iterations):
        r_lm, r_pr = residuals(state)
        sw = weights(r_lm)
        cost = float(((sw * r_lm) ** 2).sum() + (r_pr ** 2).sum())
        j_lm, j_pr = jacobian(state)
        jw = sw[:, None] * j_lm
        a = jw.T @ jw
        g = jw.T @ (sw * r_lm)
        if fit_coeffs:
            a = a + j_pr.T @ j_pr
            g = g + j_pr.T @ r_pr
        improved = False
        while damping < 1e8:
            delta = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-9), -g)
            cand = step(state, delta)
            c_lm, c_pr = residuals(cand)
            new_cost = float(((sw * c_lm) ** 2).sum() + (c_pr ** 2).sum())
            if new_cost < cost:
                state, damping, improved = cand, max(damping / 3, 1e-7), True
                break
            damping *= 4
        if not improved or cost - new_cost < config.tolerance * cost:
            break
    c, rot, t, coef = state
    out = params.copy()
    out[:12] = np.concatenate([c * rot @ m0, t[:, None]], 1).reshape(12)
    out[N_POSE:] = coef
    return out


def refine_to_landmarks(params: np.ndarray, targets: np.ndarray, landmark_model, frame_size: float,
                        param_mean: np.ndarray, param_std: np.ndarray, config: RefineConfig = RefineConfig()
                        ) -> RefineResult:
    """Refine pose (and, with a prior, the 50 coefficients) so the model's 68 landmarks meet detected ones.

    params: (N, 62) image-frame parameters (:func:`common.faces.fit.crop_params_to_image`, ``frame_size`` = the
    image height); targets: (N, 68, 2) detected landmarks in the same image's pixels (x right, y down, pixel j
    covers [j, j + 1)), iBUG order; landmark_model: a :class:`common.faces.tddfa.SparseLandmarkModel` (``mean``
    (68, 3), ``id_basis`` (68, 3, 40), ``exp_basis`` (68, 3, 10), ``shape(alpha_id, alpha_exp)``); param_mean,
    param_std: (62,) 3DDFA_V2's parameter statistics. Returns a :class:`RefineResult`.
    """
    params = np.asarray(params, np.float64).reshape(-1, N_PARAMS)
    targets = np.asarray(targets, np.float64)
    if targets.shape != (len(params), 68, 2):
        raise ValueError(f"expected targets ({len(params)}, 68, 2) for {len(params)} faces, found {targets.shape}")
    if config.prior not in ("stats", "regressor", "none"):
        raise ValueError(f"RefineConfig.prior must be 'stats', 'regressor' or 'none', found {config.prior!r}")
    point_w = np.ones(68)
    point_w[CONTOUR] = config.contour_weight
    idx = np.flatnonzero(point_w > 0)
    inner = np.setdiff1d(np.arange(68), CONTOUR)
    model = tuple(np.asarray(getattr(landmark_model, k), np.float64) for k in ("mean", "id_basis", "exp_basis"))
    std = np.asarray(param_std, np.float64)[N_POSE:]
    fit_coeffs = config.prior != "none"
    yaw = params_to_euler(params)[:, 0]
    out = params.copy()
    applied = np.zeros(len(params), bool)

    def project(p):  # (N, 62) -> (N, 68, 2) image pixels
        pose, a_id, a_exp = split_params(p)
        return project_to_image(landmark_model.shape(a_id, a_exp), pose, float(frame_size))[..., :2]

    dist = np.linalg.norm(project(params)[:, inner] - targets[:, inner], axis=2)  # (N, 51)
    wh = targets[:, inner].max(1) - targets[:, inner].min(1)
    size = np.sqrt(np.maximum(wh[:, 0] * wh[:, 1], 1e-6))
    ok = ((np.abs(yaw) <= config.max_yaw) & np.isfinite(targets).all((1, 2))
          & (np.median(dist, 1) <= config.max_disagreement * size))
    for n in np.flatnonzero(ok):
        mu = np.asarray(param_mean, np.float64)[N_POSE:] if config.prior == "stats" else params[n, N_POSE:]
        out[n] = _refine_one(params[n], targets[n, idx], point_w[idx], tuple(m[idx] for m in model), frame_size,
                             mu, std, fit_coeffs, config)
        applied[n] = True
    after = np.linalg.norm(project(out)[:, inner] - targets[:, inner], axis=2)
    rms = lambda d: np.sqrt((d ** 2).mean(1)).astype(np.float32)  # noqa: E731
    return RefineResult(out.astype(np.float32), applied, rms(dist), rms(after))
