"""A procedural, licence-free face model: the project's embedded default.

The surface is a regular ``n x n`` grid in UV space cropped to a rounded outline. Vertex
``(row i, col j)`` sits at ``u = 0.5 + (j - c) h``, ``v = 0.5 + (i - c) h`` (``c = n // 2``, the
step ``h`` a dyadic fraction so that ``1 - u`` is exact in float32). The grid wraps around a
half-cylinder (``x = sin(theta)``, ``z = depth (cos(theta) - 1)``, ``theta`` proportional to
``u - 0.5``) with ``y`` proportional to ``v - 0.5``, and facial features are added as a smooth
height field in ``z``: brow ridge, eye sockets with eyeballs and lids, a nose (bridge, tip,
alae, nostril openings), cheeks, lips around a recessed mouth line, chin.

Everything is exactly mirror-symmetric: column ``j`` mirrors column ``n - 1 - j``, so
``symmetry`` is exact, ``uv[symmetry] == (1 - u, v)`` bit for bit, the triangulation is
mirrored too, and the mean shape satisfies ``mean[sym] == mean * (-1, 1, 1)`` to float
precision. Units: the face is about 2.0 across (``x`` in [-1, 1]).

The identity basis (40) holds named smooth deformations (face width / length / depth, nose,
eyes, brows, jaw, lips, chin, cheeks) followed by low-frequency symmetric fields and then
antisymmetric ones; each group is orthogonalised in order and scaled so that a coefficient of
1 moves the most-affected vertex by the component's amplitude. ``meta['id_names']`` and
``meta['id_symmetric']`` describe them. The expression basis (10) holds named, non-orthogonal
deformations (``meta['exp_names']``); the texture basis a skin-colour model (``meta['tex_names']``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from common.facemodel import FaceModel


@dataclass(frozen=True)
class ProceduralConfig:
    """Parameters of the procedural face model (lengths in model units; the face is ~2.0 across)."""

    grid: int = 171
    """Grid side ``n`` (odd, so a centre column lies on the symmetry plane); ~0.85 n^2 vertices survive the crop."""
    crop_power: float = 2.4
    """Exponent of the superellipse outline ``|2u-1|^p + |2v-1|^p <= 1`` that crops the grid."""
    seed: int = 0
    """Seed for the random smooth components of the bases (identity, texture)."""
    n_id: int = 40
    """Identity components (K_id)."""
    n_exp: int = 10
    """Expression components (K_exp)."""
    n_tex: int = 16
    """Texture components (K_tex)."""
    n_id_antisymmetric: int = 8
    """How many of the identity components are antisymmetric (the last ones)."""
    width: float = 2.0
    """Face width at the widest (cheek) level."""
    height: float = 2.6
    """Height covered by the grid (chin-to-forehead plus margins)."""
    depth: float = 1.0
    """Depth of the half-cylinder the face wraps around (how far the sides recede)."""
    wrap_deg: float = 80.0
    """Angle the grid's extreme columns wrap around to (degrees from the front)."""
    eye_x: float = 0.42
    """Eye centre distance from the midline."""
    eye_y: float = 0.22
    """Eye centre height."""
    eye_half_width: float = 0.17
    """Half width of the eye opening."""
    eye_half_height: float = 0.065
    """Half height of the eye opening."""
    brow_y: float = 0.43
    """Height of the brows."""
    nose_top_y: float = 0.32
    """Height of the nasion (top of the nose bridge)."""
    nose_tip_y: float = -0.2
    """Height of the nose tip."""
    nose_base_y: float = -0.32
    """Height of the nose base (subnasale)."""
    nose_tip_height: float = 0.31
    """Protrusion of the nose tip above the base surface."""
    mouth_y: float = -0.6
    """Height of the mouth line at the midline."""
    mouth_half_width: float = 0.29
    """Half width of the mouth."""
    chin_y: float = -0.93
    """Height of the chin's most prominent point."""


# ----------------------------------------------------------------------------- small helpers
def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _dyadic_step(c: int) -> float:
    """Largest multiple of 2^-16 with ``c * step <= 0.5``: grid UVs and their mirrors are exact in float32."""
    return float(np.floor(0.5 * 65536 / c) / 65536)


@dataclass(frozen=True)
class _Grid:
    """The cropped grid: per-vertex (i, j), uv, base coordinates and the triangulation."""

    ij: np.ndarray  # (V, 2) int64 row, col
    uv: np.ndarray  # (V, 2) float64
    theta: np.ndarray  # (V,) wrap angle, radians
    x: np.ndarray  # (V,) base x (before features)
    y: np.ndarray  # (V,)
    triangles: np.ndarray  # (F, 3) int64, CCW seen from +z
    symmetry: np.ndarray  # (V,) int64


def _build_grid(cfg: ProceduralConfig) -> _Grid:
    n = cfg.grid
    if n < 21 or n % 2 == 0:
        raise ValueError(f"ProceduralConfig.grid must be an odd number >= 21, found {n}")
    c = n // 2
    h = _dyadic_step(c)
    k = np.arange(n) - c
    rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    un = (cc - c) / c  # normalised in [-1, 1], exactly antisymmetric
    vn = (rr - c) / c
    keep = np.abs(un) ** cfg.crop_power + np.abs(vn) ** cfg.crop_power <= 1.0 + 1e-9
    index = np.full((n, n), -1, np.int64)
    index[keep] = np.arange(int(keep.sum()))
    ij = np.stack([rr[keep], cc[keep]], 1).astype(np.int64)
    u = 0.5 + k[ij[:, 1]] * h
    v = 0.5 + k[ij[:, 0]] * h
    theta = np.radians(cfg.wrap_deg) * un[keep]
    y = 0.5 * cfg.height * vn[keep]
    # jaw taper and a slightly narrower forehead top
    wscale = (1.0 - 0.22 * _smoothstep(-0.25, -1.15, y)) * (1.0 - 0.08 * _smoothstep(0.7, 1.3, y))
    x = 0.5 * cfg.width * wscale * np.sin(theta)

    # quads (i, j) -> a=(i, j) b=(i, j+1) c=(i+1, j+1) d=(i+1, j); rows grow with v (up), cols with u (x)
    a = index[:-1, :-1]
    b = index[:-1, 1:]
    cq = index[1:, 1:]
    d = index[1:, :-1]
    left = (np.arange(n - 1) < c)[None, :].repeat(n - 1, 0)  # quads left of the midline (x < 0)
    t1 = np.where(left[..., None], np.stack([a, b, cq], -1), np.stack([a, b, d], -1))
    t2 = np.where(left[..., None], np.stack([a, cq, d], -1), np.stack([b, cq, d], -1))
    tris = np.concatenate([t1.reshape(-1, 3), t2.reshape(-1, 3)])
    tris = tris[(tris >= 0).all(1)]
    sym = index[ij[:, 0], n - 1 - ij[:, 1]]
    return _Grid(ij=ij, uv=np.stack([u, v], 1), theta=theta, x=x, y=y, triangles=tris, symmetry=sym)


# ------------------------------------------------------------------------------- the features
def _nose(cfg: ProceduralConfig, x, y):
    """Nose height field (V,): bridge + tip + alae, and the nostril dents (V,) separately."""
    top, tip, base = cfg.nose_top_y, cfg.nose_tip_y, cfg.nose_base_y
    ys = np.array([top + 0.1, top, top - 0.15, 0.5 * (top + tip), tip + 0.08, tip, tip - 0.05,
                   base + 0.01, base - 0.04])
    hs = cfg.nose_tip_height * np.array([0.0, 0.12, 0.3, 0.55, 0.8, 0.92, 0.85, 0.35, 0.0])
    ws = np.array([0.085, 0.07, 0.072, 0.085, 0.105, 0.12, 0.125, 0.14, 0.155])
    order = np.argsort(ys)
    inside = (y > ys.min()) & (y < ys.max())
    yc = np.clip(y, ys.min(), ys.max())
    hgt = np.where(inside, PchipInterpolator(ys[order], hs[order])(yc), 0.0)
    hw = PchipInterpolator(ys[order], ws[order])(yc)
    ridge = hgt * np.exp(-0.5 * (x / hw) ** 2)
    ax = np.abs(x)
    bulb = 0.045 * _gauss(x, y, 0.0, tip, 0.085, 0.065)
    alae = 0.1 * _gauss(ax, y, 0.14, base + 0.045, 0.05, 0.04)
    nostril = -0.08 * _gauss(ax, y, 0.065, base + 0.005, 0.028, 0.014)
    return ridge + bulb + alae, nostril


def _eye_coords(cfg: ProceduralConfig, x, y):
    """Normalised distance to the eye opening's almond (1 on the lid margin), (V,)."""
    ax = np.abs(x)
    dx = (ax - cfg.eye_x) / cfg.eye_half_width
    # almond: the upper lid arches higher than the lower, the outer corner sits slightly higher
    dy = (y - cfg.eye_y - 0.012 * dx) / cfg.eye_half_height
    dy = np.where(dy > 0, dy / 1.15, dy / 0.9)
    return np.sqrt(dx ** 2 + dy ** 2)


def _mouth_line(cfg: ProceduralConfig, x):
    """Height of the mouth line (V,) and the lip-width profile in [0, 1] (V,)."""
    s = np.clip(np.abs(x) / cfg.mouth_half_width, 0.0, 1.0)
    return cfg.mouth_y + 0.03 * s ** 2, np.clip(1.0 - s ** 2, 0.0, 1.0) ** 0.6


def _features(cfg: ProceduralConfig, x, y):
    """Named height fields (each (V,), model units) that sum to the face's relief."""
    ax = np.abs(x)
    f: dict[str, np.ndarray] = {}
    f["forehead"] = 0.05 * _gauss(x, y, 0.0, 0.85, 0.5, 0.3) - 0.55 * np.maximum(y - 0.55, 0.0) ** 2
    f["brow"] = (0.07 * _gauss(ax, y, 0.33, cfg.brow_y + 0.02, 0.24, 0.075)
                 + 0.035 * _gauss(x, y, 0.0, cfg.brow_y - 0.03, 0.12, 0.08))
    f["socket"] = (-0.13 * _gauss(ax, y, cfg.eye_x - 0.02, cfg.eye_y + 0.01, 0.17, 0.1)
                   - 0.04 * _gauss(ax, y, cfg.eye_x - 0.15, cfg.eye_y + 0.05, 0.06, 0.06))
    de = _eye_coords(cfg, x, y)
    r2 = ((ax - cfg.eye_x) ** 2 + (y - cfg.eye_y) ** 2) / (1.1 * cfg.eye_half_width) ** 2
    ball = 0.07 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    f["eyes"] = (ball * _smoothstep(1.15, 0.9, de)
                 + 0.035 * np.exp(-(((de - 1.12) / 0.22) ** 2)) * _smoothstep(2.2, 1.5, de))
    nose, nostril = _nose(cfg, x, y)
    f["nose"] = nose
    f["nostril"] = nostril
    f["cheeks"] = (0.08 * _gauss(ax, y, 0.48, -0.15, 0.2, 0.2)
                   + 0.045 * _gauss(ax, y, 0.62, 0.05, 0.15, 0.08))
    # nasolabial fold: a shallow crease from the ala towards the mouth corner
    p0, p1 = np.array([0.2, cfg.nose_base_y + 0.05]), np.array([cfg.mouth_half_width + 0.08, cfg.mouth_y - 0.05])
    d = p1 - p0
    t = np.clip(((ax - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
    dist = np.hypot(ax - p0[0] - t * d[0], y - p0[1] - t * d[1])
    f["fold"] = -0.02 * np.exp(-((dist / 0.03) ** 2))
    ym, lw = _mouth_line(cfg, x)
    f["muzzle"] = 0.07 * _gauss(x, y, 0.0, cfg.mouth_y, 0.33, 0.2)
    f["lips"] = lw * (0.065 * np.exp(-0.5 * ((y - ym - 0.04) / 0.026) ** 2)
                      + 0.075 * np.exp(-0.5 * ((y - ym + 0.05) / 0.03) ** 2))
    f["philtrum"] = -0.012 * _gauss(x, y, 0.0, 0.5 * (cfg.mouth_y + cfg.nose_base_y), 0.025, 0.08)
    f["mouth"] = -0.07 * _mouth_interior_weight(cfg, x, y)
    f["chin"] = (0.08 * _gauss(x, y, 0.0, cfg.chin_y, 0.2, 0.11)
                 - 0.03 * _gauss(x, y, 0.0, cfg.mouth_y - 0.17, 0.18, 0.04)
                 - 1.2 * np.maximum(cfg.chin_y - 0.07 - y, 0.0) ** 2)
    return f


def _mouth_interior_weight(cfg: ProceduralConfig, x, y):
    """Soft mouth-interior indicator in [0, 1] (V,): a thin band along the mouth line between the lips."""
    ym, lw = _mouth_line(cfg, x)
    half = 0.022 * lw + 1e-6
    return _smoothstep(1.0, 0.5, np.abs(y - ym) / half) * (lw > 0)


# ------------------------------------------------------------------------------------ regions
def _regions(cfg: ProceduralConfig, g: _Grid, feats) -> dict[str, np.ndarray]:
    x, y = g.x, g.y
    ax = np.abs(x)
    eyes = _eye_coords(cfg, x, y) < 1.0
    mouth = _mouth_interior_weight(cfg, x, y) > 0.3
    nostrils = (((ax - 0.065) / 0.04) ** 2 + ((y - cfg.nose_base_y - 0.005) / 0.022) ** 2) < 1.0
    nose = (((feats["nose"] > 0.025) & (y > cfg.nose_base_y - 0.06) & (y < cfg.nose_top_y + 0.02))
            | nostrils)
    outer_eye = cfg.eye_x + cfg.eye_half_width
    centre = (ax <= outer_eye) & (y <= cfg.brow_y + 0.1) & (y >= cfg.chin_y - 0.08)
    rim = np.abs(g.theta) > np.radians(cfg.wrap_deg) * 0.97
    face = ~eyes & ~mouth & ~rim
    return {"face": face, "centre": centre, "left": x >= 0, "right": x <= 0, "nose": nose,
            "nostrils": nostrils, "mouth": mouth, "eyes": eyes}


# ---------------------------------------------------------------------------------- landmarks
def _landmark_targets(cfg: ProceduralConfig) -> np.ndarray:
    """(68, 2) target (x, y) of the iBUG landmarks; right side (x < 0) given, left mirrored."""
    p = np.zeros((68, 2))
    phi = np.linspace(np.pi, 1.5 * np.pi, 9)
    p[0:9] = np.stack([0.8 * np.cos(phi), 0.22 + (0.22 - cfg.chin_y - 0.07) * np.sin(phi)], 1)
    p[17:22] = np.stack([np.linspace(-0.68, -0.14, 5),
                         cfg.brow_y + np.array([-0.04, 0.0, 0.02, 0.015, 0.0])], 1)
    p[27:31] = np.stack([np.zeros(4), np.linspace(cfg.eye_y, cfg.nose_tip_y, 4)], 1)
    p[31:34] = [[-0.13, cfg.nose_base_y + 0.03], [-0.065, cfg.nose_base_y + 0.005], [0.0, cfg.nose_base_y]]
    ex, ey, ew, eh = cfg.eye_x, cfg.eye_y, cfg.eye_half_width, cfg.eye_half_height
    p[36:42] = [[-ex - ew, ey + 0.012], [-ex - 0.35 * ew, ey + 1.1 * eh], [-ex + 0.35 * ew, ey + 1.1 * eh],
                [-ex + ew, ey - 0.012], [-ex + 0.35 * ew, ey - 0.85 * eh], [-ex - 0.35 * ew, ey - 0.85 * eh]]
    my, mw = cfg.mouth_y, cfg.mouth_half_width
    p[48:52] = [[-mw, my + 0.03], [-0.6 * mw, my + 0.06], [-0.25 * mw, my + 0.085], [0.0, my + 0.075]]
    p[57:60] = [[0.0, my - 0.1], [-0.3 * mw, my - 0.095], [-0.65 * mw, my - 0.07]]
    p[60:63] = [[-0.92 * mw, my + 0.025], [-0.35 * mw, my + 0.02], [0.0, my + 0.02]]
    p[66:68] = [[0.0, my - 0.02], [-0.35 * mw, my - 0.02]]
    return p


# indices of the landmarks given on the right (or centre) and their mirror partners (iBUG order)
_LM_MIRROR = (
    [(k, 16 - k) for k in range(9)]
    + [(17 + k, 26 - k) for k in range(5)]
    + [(k, k) for k in range(27, 31)]
    + [(31, 35), (32, 34), (33, 33)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (51, 51), (57, 57), (58, 56), (59, 55)]
    + [(60, 64), (61, 63), (62, 62), (66, 66), (67, 65)]
)


def _keypoints(cfg: ProceduralConfig, g: _Grid) -> np.ndarray:
    targets = _landmark_targets(cfg)
    src = np.array([a for a, _ in _LM_MIRROR])
    dst = np.array([b for _, b in _LM_MIRROR])
    front = np.abs(g.theta) < np.radians(cfg.wrap_deg) * 0.9
    cand = np.flatnonzero(front & (g.x <= 0))
    d2 = (g.x[cand][None] - targets[src, 0:1]) ** 2 + (g.y[cand][None] - targets[src, 1:2]) ** 2
    kp = np.zeros(68, np.int64)
    kp[src] = cand[d2.argmin(1)]
    kp[dst] = g.symmetry[kp[src]]
    return kp


# ----------------------------------------------------------------------------------- the bases
def _mirror(field: np.ndarray, sym: np.ndarray) -> np.ndarray:
    """Mirror a displacement field (V, 3, ...) across x = 0: (M d)[i] = diag(-1, 1, 1) d[sym[i]]."""
    out = field[sym].copy()
    out[:, 0] *= -1
    return out


def _orthogonalise(fields: list[np.ndarray], amps: np.ndarray, sym: np.ndarray, parity: int) -> np.ndarray:
    """Gram-Schmidt in order (Cholesky QR, twice), exact (anti)symmetrisation, per-component max-norm scaling."""
    q = np.stack([f.reshape(-1) for f in fields], 1)
    for _ in range(2):  # CholQR2: Q = A L^-T with A^T A = L L^T keeps each component's orientation
        # einsum, not BLAS: a threaded (V*3, K) GEMM thrashes on busy machines; these are tiny anyway
        inv = np.linalg.inv(np.linalg.cholesky(np.einsum("ik,il->kl", q, q)))
        q = np.einsum("ik,lk->il", q, inv)
    b = q.reshape(-1, 3, len(fields))
    b = 0.5 * (b + parity * _mirror(b, sym))
    peak = np.linalg.norm(b, axis=1).max(0)
    return b * (amps / peak)[None, None]


def _vec(dx=0.0, dy=0.0, dz=0.0, like=None):
    return np.stack(np.broadcast_arrays(dx, dy, dz, like)[:3], 1)


def _smooth_random_field(rng: np.random.Generator, xn: np.ndarray, yn: np.ndarray, k: int,
                         symmetric: bool) -> np.ndarray:
    """A random low-frequency displacement of component ``k % 3`` (x, y, z): (V, 3).

    xn, yn: (V,) vertex positions normalised to [-1, 1]. Symmetric fields (the mirrored face deforms the same
    way) are odd in x for dx and even for dy / dz; antisymmetric ones the other way round. Draws
    (fx, fy), then the phase, from ``rng``.
    """
    fx, fy = rng.uniform(0.5, 2.0, 2)
    ph = rng.uniform(0, 2 * np.pi)
    even = np.cos(np.pi * fx * xn) * np.cos(np.pi * fy * yn + ph)
    odd = np.sin(np.pi * fx * xn) * np.cos(np.pi * fy * yn + ph)
    along_x, across = (odd, even) if symmetric else (even, odd)
    zero = np.zeros_like(xn)
    comp = k % 3
    return _vec(along_x if comp == 0 else zero, across if comp == 1 else zero, across if comp == 2 else zero, xn)


def _id_fields(cfg: ProceduralConfig, g: _Grid, z: np.ndarray, feats, rng: np.random.Generator):
    """Named + random smooth identity displacement fields: (sym_fields, sym_amps, names), same for antisym."""
    x, y = g.x, g.y
    ax = np.abs(x)
    sx = np.tanh(x / 0.08)  # smooth sign of x
    zero = np.zeros_like(x)
    eyes_w = _gauss(ax, y, cfg.eye_x, cfg.eye_y, 0.17, 0.13)
    nose_w = _gauss(x, y, 0.0, cfg.nose_tip_y - 0.05, 0.22, 0.14)
    mouth_w = _gauss(x, y, 0.0, cfg.mouth_y, 0.36, 0.13)
    lower = _smoothstep(-0.3, -1.0, y)
    named = {
        "face_width": (_vec(x, zero, zero, x), 0.09),
        "face_length": (_vec(zero, y, zero, x), 0.09),
        "face_depth": (_vec(zero, zero, z - z.mean(), x), 0.08),
        "nose_length": (_vec(zero, -nose_w * _smoothstep(cfg.nose_top_y, cfg.nose_tip_y, y), zero, x), 0.05),
        "nose_width": (_vec(x * nose_w, zero, zero, x), 0.04),
        "nose_height": (_vec(zero, zero, feats["nose"], x), 0.07),
        "nose_bridge": (_vec(zero, zero, feats["nose"] * _smoothstep(cfg.nose_tip_y, 0.1, y), x), 0.05),
        "eye_spacing": (_vec(sx * eyes_w, zero, zero, x), 0.04),
        "eye_height": (_vec(zero, eyes_w, zero, x), 0.035),
        "eye_size": (_vec(sx * (ax - cfg.eye_x) * eyes_w, (y - cfg.eye_y) * eyes_w, zero, x), 0.03),
        "eye_depth": (_vec(zero, zero, feats["socket"] + feats["eyes"], x), 0.04),
        "brow_height": (_vec(zero, _gauss(ax, y, 0.35, cfg.brow_y, 0.25, 0.1), zero, x), 0.04),
        "brow_ridge": (_vec(zero, zero, feats["brow"], x), 0.04),
        "jaw_width": (_vec(x * lower, zero, zero, x), 0.07),
        "chin_height": (_vec(zero, -_smoothstep(-0.75, -1.15, y), zero, x), 0.05),
        "chin_protrusion": (_vec(zero, zero, _gauss(x, y, 0.0, cfg.chin_y, 0.25, 0.15), x), 0.05),
        "lip_size": (_vec(zero, zero, feats["lips"], x), 0.035),
        "mouth_width": (_vec(x * mouth_w, zero, zero, x), 0.04),
        "mouth_height": (_vec(zero, mouth_w, zero, x), 0.04),
        "cheek_fullness": (_vec(zero, zero, feats["cheeks"], x), 0.05),
        "forehead_slope": (_vec(zero, zero, -np.maximum(y - 0.4, 0.0) ** 2, x), 0.06),
    }
    names = list(named)
    sym_fields = [f for f, _ in named.values()]
    sym_amps = [a for _, a in named.values()]
    n_anti = cfg.n_id_antisymmetric
    n_sym = cfg.n_id - n_anti
    # low-frequency symmetric fields: even in x for dy/dz, odd in x for dx
    xn, yn = x / (0.5 * cfg.width), y / (0.5 * cfg.height)
    k = 0
    while len(sym_fields) < n_sym:
        sym_fields.append(_smooth_random_field(rng, xn, yn, k, symmetric=True))
        sym_amps.append(0.02)
        names.append(f"smooth_sym_{k}")
        k += 1
    anti = {
        "nose_deviation": (_vec(nose_w, zero, zero, x), 0.03),
        "jaw_shift": (_vec(lower, zero, zero, x), 0.04),
        "eye_height_difference": (_vec(zero, sx * eyes_w, zero, x), 0.02),
        "mouth_tilt": (_vec(zero, x * mouth_w, zero, x), 0.025),
        "cheek_asymmetry": (_vec(zero, zero, sx * feats["cheeks"], x), 0.03),
    }
    anti_names = list(anti)
    anti_fields = [f for f, _ in anti.values()]
    anti_amps = [a for _, a in anti.values()]
    k = 0
    while len(anti_fields) < n_anti:
        anti_fields.append(_smooth_random_field(rng, xn, yn, k, symmetric=False))
        anti_amps.append(0.012)
        anti_names.append(f"smooth_anti_{k}")
        k += 1
    if len(sym_fields) > n_sym or len(anti_fields) > n_anti:
        raise ValueError(f"ProceduralConfig: n_id={cfg.n_id} with {n_anti} antisymmetric components is too few "
                         f"for the {len(named)} named symmetric and {len(anti)} named antisymmetric components")
    return (sym_fields, np.array(sym_amps), names), (anti_fields, np.array(anti_amps), anti_names)


def _exp_basis(cfg: ProceduralConfig, g: _Grid, feats) -> tuple[np.ndarray, list[str]]:
    """(V, 3, K_exp) named expression deformations; a coefficient of 1 is a moderate expression."""
    x, y = g.x, g.y
    ax = np.abs(x)
    sx = np.tanh(x / 0.08)
    zero = np.zeros_like(x)
    ym, lw = _mouth_line(cfg, x)
    # the jaw: everything below the mouth line, a sharp split between the lips, soft on the cheeks
    soft = 0.006 + 0.12 * _smoothstep(cfg.mouth_half_width * 0.9, cfg.mouth_half_width * 1.6, ax)
    jaw = 1.0 / (1.0 + np.exp((y - ym) / soft)) * _smoothstep(0.95, 0.55, ax)
    corner = _gauss(ax, y, cfg.mouth_half_width, cfg.mouth_y + 0.02, 0.12, 0.09)
    brow = _gauss(ax, y, 0.35, cfg.brow_y, 0.3, 0.14)
    brow_in = _gauss(ax, y, 0.15, cfg.brow_y - 0.03, 0.15, 0.1)
    upper_lid = _gauss(ax, y, cfg.eye_x, cfg.eye_y + 0.06, 0.2, 0.06)
    cheek = _gauss(ax, y, 0.45, -0.4, 0.18, 0.17)
    lips = _gauss(x, y, 0.0, cfg.mouth_y, 0.3, 0.09)
    left = _smoothstep(-0.05, 0.05, x)
    fields = {
        "mouth_open": _vec(zero, -0.16 * jaw, -0.04 * jaw, x),
        "smile": _vec(0.04 * sx * corner, 0.05 * corner, 0.02 * _gauss(ax, y, 0.45, -0.2, 0.2, 0.15), x),
        "frown": _vec(zero, -0.04 * corner, -0.01 * corner, x),
        "brows_up": _vec(zero, 0.05 * brow, zero, x),
        "brows_down": _vec(-0.025 * sx * brow_in, -0.035 * brow_in, 0.01 * brow_in, x),
        "eyes_close": _vec(zero, -0.045 * upper_lid, 0.02 * upper_lid, x),
        "cheek_puff": _vec(0.03 * sx * cheek, zero, 0.07 * cheek, x),
        "lip_pucker": _vec(-0.25 * x * lips, zero, 0.06 * lips, x),
        "jaw_sideways": _vec(0.07 * _smoothstep(-0.4, -0.9, y) * _smoothstep(1.0, 0.5, ax), zero, zero, x),
        "smirk_left": _vec(0.04 * corner * left, 0.05 * corner * left, zero, x),
    }
    names = list(fields)[: cfg.n_exp]
    if len(names) < cfg.n_exp:
        raise ValueError(f"ProceduralConfig.n_exp={cfg.n_exp}: at most {len(fields)} expressions are defined")
    return np.stack([fields[k] for k in names], 2), names


def _texture(cfg: ProceduralConfig, g: _Grid, feats, rng: np.random.Generator):
    """Per-vertex mean albedo (V, 3) in [0, 1], basis (V, 3, K_tex) and component names."""
    x, y = g.x, g.y
    ax = np.abs(x)
    skin = np.array([0.78, 0.57, 0.47])
    mean = np.broadcast_to(skin, (len(x), 3)).copy()
    cheeks = _gauss(ax, y, 0.45, -0.1, 0.18, 0.15)
    mean += cheeks[:, None] * np.array([0.04, -0.02, -0.02])
    ym, lw = _mouth_line(cfg, x)
    lips = np.clip(lw * (np.exp(-0.5 * ((y - ym - 0.035) / 0.03) ** 2)
                         + np.exp(-0.5 * ((y - ym + 0.045) / 0.035) ** 2)), 0.0, 1.0) ** 1.5
    mean = mean * (1 - lips[:, None]) + lips[:, None] * np.array([0.62, 0.3, 0.3])
    brow_line = cfg.brow_y + 0.02 - 0.25 * (ax - 0.38) ** 2
    brows = (_smoothstep(0.03, 0.015, np.abs(y - brow_line)) * _smoothstep(0.09, 0.14, ax)
             * _smoothstep(0.8, 0.66, ax))
    mean = mean * (1 - 0.65 * brows[:, None]) + 0.65 * brows[:, None] * np.array([0.25, 0.17, 0.12])
    de = _eye_coords(cfg, x, y)
    r = np.hypot(ax - cfg.eye_x, y - cfg.eye_y)
    sclera = _smoothstep(1.0, 0.85, de)
    iris = _smoothstep(0.062, 0.055, r) * sclera
    pupil = _smoothstep(0.028, 0.022, r) * sclera
    lashes = np.exp(-(((de - 1.0) / 0.12) ** 2)) * (y > cfg.eye_y)
    mean = mean * (1 - sclera[:, None]) + sclera[:, None] * np.array([0.88, 0.85, 0.8])
    mean = mean * (1 - iris[:, None]) + iris[:, None] * np.array([0.33, 0.22, 0.14])
    mean = mean * (1 - pupil[:, None]) + pupil[:, None] * 0.04
    mean = mean * (1 - 0.7 * lashes[:, None]) + 0.7 * lashes[:, None] * 0.12
    nostr = np.clip(-feats["nostril"] / 0.06, 0.0, 1.0)
    mean = mean * (1 - nostr[:, None]) + nostr[:, None] * np.array([0.28, 0.15, 0.13])
    mouth = _mouth_interior_weight(cfg, x, y)
    mean = mean * (1 - mouth[:, None]) + mouth[:, None] * np.array([0.25, 0.07, 0.07])
    skin_w = (1 - sclera) * (1 - mouth)
    beard = (_smoothstep(-0.35, -0.55, y) + _gauss(x, y, 0.0, cfg.mouth_y + 0.12, 0.3, 0.05)) * (1 - lips)
    beard = np.clip(beard, 0, 1) * _smoothstep(0.85, 0.6, ax) * skin_w
    comps = {
        "tone": skin_w[:, None] * np.array([0.1, 0.09, 0.08]),
        "redness": skin_w[:, None] * np.array([0.04, -0.015, -0.015]),
        "olive": skin_w[:, None] * np.array([0.01, 0.025, -0.03]),
        "lip_colour": lips[:, None] * np.array([0.07, -0.03, -0.01]),
        "brow_darkness": brows[:, None] * np.array([-0.08, -0.06, -0.05]),
        "beard_shadow": beard[:, None] * np.array([-0.07, -0.06, -0.045]),
        "blush": cheeks[:, None] * np.array([0.05, -0.01, -0.01]),
        "iris_colour": (iris - pupil)[:, None] * np.array([-0.06, 0.02, 0.12]),
        "under_eye": (_gauss(ax, y, cfg.eye_x, cfg.eye_y - 0.1, 0.12, 0.04) * skin_w)[:, None]
        * np.array([-0.04, -0.04, -0.02]),
        "vertical_gradient": (y / cfg.height * skin_w)[:, None] * np.array([0.04, 0.03, 0.03]),
        "side_gradient": (x / cfg.width * skin_w)[:, None] * np.array([0.03, 0.025, 0.02]),
    }
    names = list(comps)
    fields = list(comps.values())
    xn, yn = x / (0.5 * cfg.width), y / (0.5 * cfg.height)
    k = 0
    while len(fields) < cfg.n_tex:
        fx, fy = rng.uniform(0.5, 2.5, 2)
        ph = rng.uniform(0, 2 * np.pi, 2)
        col = rng.normal(0.0, 1.0, 3)
        col = 0.02 * col / np.linalg.norm(col)
        f = np.cos(np.pi * fx * xn + ph[0]) * np.cos(np.pi * fy * yn + ph[1]) * skin_w
        fields.append(f[:, None] * col)
        names.append(f"smooth_{k}")
        k += 1
    basis = np.stack(fields[: cfg.n_tex], 2)
    return np.clip(mean, 0.0, 1.0), basis, names[: cfg.n_tex]


# ------------------------------------------------------------------------------------ builder
def build_procedural_model(config: ProceduralConfig = ProceduralConfig()) -> FaceModel:
    """Build the procedural face model (deterministic in ``config``; ~25k vertices in ~0.3 s).

    Returns a :class:`~common.facemodel.FaceModel` named ``"procedural"`` with ``n_id``
    identity, ``n_exp`` expression and ``n_tex`` texture components, all 8 regions, 68 iBUG
    keypoints, and ``meta`` recording the config, units and component names.
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    g = _build_grid(cfg)
    feats = _features(cfg, g.x, g.y)
    wrap = np.radians(cfg.wrap_deg)
    fade = _smoothstep(0.85 * wrap, 0.65 * wrap, np.abs(g.theta))
    z = (cfg.depth * (np.cos(g.theta) - 1.0) + sum(feats.values()) * fade)
    mean = np.stack([g.x, g.y, z], 1)
    mean = 0.5 * (mean + _mirror(mean, g.symmetry))  # exact symmetry (float rounding of sin)
    mean[g.ij[:, 1] == cfg.grid // 2, 0] = 0.0
    feats_faded = {k: v * fade for k, v in feats.items()}
    (sf, sa, sn), (af, aa, an) = _id_fields(cfg, g, mean[:, 2], feats_faded, rng)
    id_basis = np.concatenate([_orthogonalise(sf, sa, g.symmetry, +1),
                               _orthogonalise(af, aa, g.symmetry, -1)], 2)
    exp_basis, exp_names = _exp_basis(cfg, g, feats_faded)
    tex_mean, tex_basis, tex_names = _texture(cfg, g, feats, rng)
    regions = _regions(cfg, g, feats_faded)
    u = g.uv.astype(np.float32)
    meta = {
        "source": "common.procedural.build_procedural_model",
        "config": asdict(cfg),
        "units": "model units; the face is ~2.0 across (x in [-1, 1]), ~1 unit ~ 7 cm",
        "grid_ij": g.ij,
        "id_names": sn + an,
        "id_symmetric": [True] * len(sn) + [False] * len(an),
        "exp_names": exp_names,
        "tex_names": tex_names,
        "licence": "procedural, no third-party data",
    }
    return FaceModel(
        name="procedural",
        mean_shape=mean.astype(np.float32),
        id_basis=id_basis.astype(np.float32),
        exp_basis=exp_basis.astype(np.float32),
        triangles=g.triangles.astype(np.int64),
        uv=u,
        symmetry=g.symmetry.astype(np.int64),
        regions=regions,
        tex_mean=tex_mean.astype(np.float32),
        tex_basis=tex_basis.astype(np.float32),
        keypoints=_keypoints(cfg, g),
        meta=meta,
    )
