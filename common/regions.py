"""Named per-vertex regions of a face model (:data:`common.facemodel.REGION_NAMES`).

:func:`derive_regions` builds the masks from the mean shape in model space (x = the face's
left, y up, z out of the face), from the 68 iBUG landmarks when the model has them (BFM:
3DDFA's ``keypoints``), else from the geometry alone (nose tip = the most forward vertex and
average facial proportions). Polygons are tested in the frontal (x, y) projection, which is a
height field over the front of the face; the nostrils use vertex normals when triangles are given.

iBUG-68 indices (0-based) used here: jaw 0-16 (8 = chin), brows 17-26, nose bridge 27-30
(30 = tip), nose base 31-35 (33 = subnasale), eyes 36-41 (face's right) and 42-47 (face's
left), outer lips 48-59, inner lips 60-67.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from common.facemodel import REGION_NAMES, estimate_symmetry_plane

_RIGHT_EYE = np.arange(36, 42)
_LEFT_EYE = np.arange(42, 48)
_INNER_LIPS = np.arange(60, 68)
_BROWS = np.arange(17, 27)


@dataclass(frozen=True)
class RegionParams:
    """How the named regions are cut; lengths are fractions of the outer-eye-corner distance ``D``."""

    eye_margin: float = 0.04
    """Dilation of the eye-opening polygons (landmarks 36-41, 42-47)."""
    mouth_margin: float = 0.015
    """Dilation of the inner-lip polygon (landmarks 60-67) that marks the lip gap."""
    nose_margin: float = 0.06
    """Dilation of the nose polygon (bridge top 27, wings beside 31/35, base 31-35)."""
    nose_wing: float = 0.10
    """How far the nose polygon reaches sideways beyond the nostril corners 31 and 35."""
    nostril_margin: float = 0.05
    """Box around the nose base (31-35) searched for nostril vertices."""
    nostril_normal_y: float = -0.3
    """Nostril vertices face down: unit normal y below this (needs triangles)."""
    centre_margin: float = 0.0
    """Extra width of the centre box beyond the outer eye corners (36, 45)."""
    centre_brow_margin: float = 0.08
    """Height of the centre box above the highest brow landmark."""
    midline: float = 0.01
    """Half-width of the strip around the symmetry plane that belongs to neither half."""
    symmetry_plane: float | None = None
    """x of the mirror plane; ``None`` estimates it (:func:`estimate_symmetry_plane`)."""


def derive_regions(mean_shape: np.ndarray, uv: np.ndarray, keypoints: np.ndarray | None = None,
                   params: RegionParams | None = None,
                   triangles: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-vertex masks for every name in :data:`REGION_NAMES`.

    mean_shape: (V, 3) model space; uv: (V, 2) in [0, 1] (only checked for its shape: the masks
    are cut in 3D, and rasterised in UV by ``common.uvtools.region_uv_mask``); keypoints: optional
    (68,) int vertex ids of the iBUG landmarks; triangles: optional (F, 3) (outward winding),
    used for the nostrils' normals. Returns name -> (V,) bool.

    * ``eyes``: inside the (dilated) eye-opening polygons; ``mouth``: inside the inner-lip polygon.
    * ``nose``: the nose from the bridge top to the base, wings included; ``nostrils``: the
      downward-facing underside of the nose around the openings.
    * ``centre``: the box between the outer eye corners from just above the brows to the chin.
    * ``left`` / ``right``: x above / below the mirror plane (outside a thin midline strip).
    * ``face``: skin, i.e. every vertex that is neither eye nor mouth interior.
    """
    p = params or RegionParams()
    v = np.asarray(mean_shape, np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"mean_shape: expected (V, 3), found {v.shape}")
    if np.shape(uv) != (len(v), 2):
        raise ValueError(f"uv: expected ({len(v)}, 2), found {np.shape(uv)}")
    lm = _landmarks(v, keypoints)
    d = float(np.linalg.norm(lm[45] - lm[36]))
    xy = v[:, :2]
    c = estimate_symmetry_plane(v) if p.symmetry_plane is None else p.symmetry_plane

    eyes = (_in_polygon(xy, lm[_RIGHT_EYE, :2], p.eye_margin * d)
            | _in_polygon(xy, lm[_LEFT_EYE, :2], p.eye_margin * d))
    mouth = _in_polygon(xy, lm[_INNER_LIPS, :2], p.mouth_margin * d)
    wing = p.nose_wing * d
    nose_poly = np.stack([lm[27, :2], lm[31, :2] + [-wing, wing], lm[31, :2], lm[32, :2], lm[33, :2],
                          lm[34, :2], lm[35, :2], lm[35, :2] + [wing, wing]])
    nose = _in_polygon(xy, nose_poly, p.nose_margin * d) & (v[:, 2] > lm[[31, 35], 2].min())

    box_lo = lm[31:36].min(0) - p.nostril_margin * d
    box_hi = lm[31:36].max(0) + p.nostril_margin * d
    box_hi[1] = lm[30, 1]  # from the base up to the tip's height
    nostrils = np.all((v[:, :2] >= box_lo[:2]) & (v[:, :2] <= box_hi[:2]), 1) & nose
    if triangles is not None:
        nostrils &= _vertex_normals(v, np.asarray(triangles, np.int64))[:, 1] < p.nostril_normal_y

    x0 = min(lm[36, 0], lm[45, 0]) - p.centre_margin * d
    x1 = max(lm[36, 0], lm[45, 0]) + p.centre_margin * d
    y1 = lm[_BROWS, 1].max() + p.centre_brow_margin * d
    y0 = lm[8, 1]
    centre = (v[:, 0] >= x0) & (v[:, 0] <= x1) & (v[:, 1] >= y0) & (v[:, 1] <= y1)

    strip = p.midline * d
    regions = {
        "face": ~(eyes | mouth),
        "centre": centre,
        "left": v[:, 0] > c + strip,
        "right": v[:, 0] < c - strip,
        "nose": nose,
        "nostrils": nostrils,
        "mouth": mouth,
        "eyes": eyes,
    }
    empty = [k for k in REGION_NAMES if not regions[k].any()]
    if empty:
        raise ValueError(f"derive_regions: regions {empty} came out empty; check the landmarks "
                         f"(keypoints given: {keypoints is not None}) and the model's axes (y up, z out)")
    return regions


def _landmarks(v: np.ndarray, keypoints: np.ndarray | None) -> np.ndarray:
    """(68, 3) landmark positions: the model's own, or a geometric estimate."""
    if keypoints is not None:
        k = np.asarray(keypoints, np.int64).ravel()
        if k.shape != (68,) or k.min() < 0 or k.max() >= len(v):
            raise ValueError(f"keypoints: expected 68 vertex ids in [0, {len(v)}), found shape {k.shape}")
        return v[k]
    return geometric_landmarks(v)


def geometric_landmarks(v: np.ndarray) -> np.ndarray:
    """Rough iBUG-68 positions from geometry alone, for models without landmarks: (68, 3).

    The nose tip is the most forward vertex; the eye-corner distance ``D`` is 0.6 of the
    mesh's width at the tip's height band, and the other features sit at average proportions
    of ``D`` (eyes 0.26 D above the tip, mouth 0.45 D below, chin 1.1 D below). Only the
    landmarks that :func:`derive_regions` reads are meaningful; each point is snapped to the
    surface height (z) of the nearest vertex in (x, y).
    """
    from scipy.spatial import cKDTree

    tip = v[np.argmax(v[:, 2])]
    band = np.abs(v[:, 1] - tip[1]) < 0.05 * np.ptp(v[:, 1])
    d = 0.6 * np.ptp(v[band, 0])

    def ellipse(cx, cy, rx, ry, n):  # starts at -x (iBUG: 36 outer corner, 45 = 42 + 3 at +x)
        a = np.pi + np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([cx + rx * np.cos(a), cy - ry * np.sin(a)], 1)

    lm = np.zeros((68, 2))
    lm[:] = tip[:2]
    eye_y, eye_dx, eye_w = tip[1] + 0.26 * d, 0.31 * d, 0.19 * d
    lm[36:42] = ellipse(tip[0] - eye_dx, eye_y, eye_w, 0.05 * d, 6)
    lm[42:48] = ellipse(tip[0] + eye_dx, eye_y, eye_w, 0.05 * d, 6)
    lm[17:27, 1] = eye_y + 0.2 * d
    lm[27] = [tip[0], eye_y]
    lm[31:36] = np.stack([tip[0] + np.linspace(-0.13, 0.13, 5) * d,
                          tip[1] - np.array([0.10, 0.12, 0.13, 0.12, 0.10]) * d], 1)
    lm[60:68] = ellipse(tip[0], tip[1] - 0.45 * d, 0.2 * d, 0.02 * d, 8)
    lm[8] = [tip[0], tip[1] - 1.1 * d]
    _, nn = cKDTree(v[:, :2]).query(lm)
    return np.concatenate([lm, v[nn, 2:3]], 1)


def _in_polygon(xy: np.ndarray, polygon: np.ndarray, margin: float, res: int = 1024) -> np.ndarray:
    """Points (N, 2) inside the polygon (M, 2) dilated by ``margin``: (N,) bool (rasterised, no loop)."""
    lo = np.minimum(polygon.min(0), xy.min(0)) - margin
    hi = np.maximum(polygon.max(0), xy.max(0)) + margin
    scale = (res - 1) / float((hi - lo).max())
    img = np.zeros((res, res), np.uint8)
    poly = np.round((polygon - lo) * scale * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(img, [poly], 1, lineType=cv2.LINE_8, shift=4)
    r = int(np.ceil(margin * scale))
    if r > 0:
        img = cv2.dilate(img, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    ij = np.clip(np.round((xy - lo) * scale).astype(np.int64), 0, res - 1)
    return img[ij[:, 1], ij[:, 0]].astype(bool)


def _vertex_normals(v: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) of an outward-wound mesh."""
    fn = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, tri[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
