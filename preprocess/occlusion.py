"""Occluders inside the face mask of a real photo: hair, caps, glasses, hands and background at the rim.

The paper reads UV_gt under a face parser's skin mask (Section 3.3). A photo source here has no parser: the
face mask is the eroded projected mesh (:mod:`preprocess.unwrap`), so whatever covers the face inside it
would land in UV_gt, UV_bl and the crops the discriminators take as real. This module rejects those pixels
with no network weights, from what the fit already knows about the photo:

1. **where the skin should be** -- cheeks, nose, chin and forehead, placed on the mesh by the model's 68
   keypoints (:func:`part_labels`) and rasterised with it, so only their visible parts count (:func:`face_cues`);
2. **this photo's skin colour** -- each patch proposes a robust Gaussian of its colour (chroma log R/G, log B/G,
   unchanged by shading, and a loose band of L*); the proposal that accepts the most of the face wins and is
   refitted on the patches that agree with it, so a hand over a cheek or a fringe over the forehead is outvoted;
3. pixels outside that model are rejected, cleaned with morphology (radii proportional to the face size) and
   small-component removal, inside the eroded mesh mask only; eyes, brows and lips are never rejected (they
   are face, and their colour is not skin's).

Pure functions, arrays in, arrays out: :func:`detect_occluders` on one image, :func:`occluders_from_fit` on a
batch of fitted photos (what ``preprocess.stages`` calls). Measured in ``benchmarks/occlusion_quality.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from common.facemodel import FaceModel
from common.render import Fragments, fragments_or_rasterize
from preprocess.config import OcclusionConfig, UVGTConfig
from preprocess.unwrap import UVLayoutCache, erode, erosion_radius, face_pixels, face_weight

# iBUG-68 landmark groups (0-based): what is never rejected, and where the skin model is learned
_BROWS = (tuple(range(17, 22)), tuple(range(22, 27)))
_EYES = (tuple(range(36, 42)), tuple(range(42, 48)))
_LIPS = tuple(range(48, 60))
# skin patches and their prior weight: cheeks (jaw points, mouth corner, nose wing, lower eyelid), the nose
# (bridge top to the nostril base), the chin (jaw below the lower lip); the forehead (above the brows, often under
# a fringe) is trusted less
_PATCHES = {"right_cheek": ((1, 2, 3, 4, 48, 31, 40, 41), 1.0), "left_cheek": ((15, 14, 13, 12, 54, 35, 47, 46), 1.0),
            "nose": ((27, 31, 32, 33, 34, 35), 1.0), "chin": ((6, 7, 8, 9, 10, 56, 57, 58), 0.7)}
_FOREHEAD_WEIGHT = 0.5


@dataclass(frozen=True, eq=False)
class FaceCues:
    """Per-pixel facts from a fitted mesh, for :func:`detect_occluders` (one image; :func:`face_cues` returns a
    batch, ``cues[i]`` is image i).

    patches: (P, S, S) bool, visible skin patches (:data:`PART_NAMES`; empty where hidden), where the skin colour
    is learned; weights: (P,) float32, the prior trust in each patch (the forehead is often under hair);
    protect: (S, S) bool, visible eyes, brows and lips (never rejected). Batched: (B, P, S, S) and (B, S, S).
    """

    patches: np.ndarray
    weights: np.ndarray
    protect: np.ndarray

    def __getitem__(self, i: int) -> FaceCues:
        if self.patches.ndim != 4:
            raise TypeError("FaceCues: indexing needs a batch (patches (B, P, S, S))")
        return FaceCues(self.patches[i], self.weights, self.protect[i])


PART_NAMES = ("right_cheek", "left_cheek", "nose", "chin", "forehead")
"""The skin patches of :func:`part_labels`, in order (then ``protect``)."""


def part_labels(model: FaceModel, config: OcclusionConfig = OcclusionConfig(), grid: int = 512) -> np.ndarray:
    """Per-vertex labels of the skin patches and the protected features: (len(PART_NAMES) + 1, V) bool.

    Rows: the skin patches of :data:`PART_NAMES`, then ``protect`` (eyes, brows, lips, and the model's ``eyes``
    region). Polygons through the model's 68 keypoints are drawn in the frontal (x, y) projection of the mean
    shape (a height field over the front of the face, as in :mod:`common.regions`) on a ``grid``-wide canvas,
    then looked up at every vertex. Margins are fractions of the outer-eye-corner distance D. Depends only on
    the model: compute it once per model.
    """
    if model.keypoints is None:
        raise ValueError(f"part_labels: face model {model.name!r} has no 68 keypoints; the skin patches and the "
                         f"protected features are placed by them")
    xy = np.asarray(model.mean_shape, np.float64)[:, :2] * [1.0, -1.0]  # y down, like an image
    lo = xy.min(0)
    d = float(np.linalg.norm(xy[model.keypoints[36]] - xy[model.keypoints[45]]))
    scale = (grid - 1) / float(np.ptp(xy, 0).max())
    pix = (xy - lo) * scale  # vertices on the canvas
    lm = pix[model.keypoints]
    up = np.array([0.0, -d * scale])  # model +y is up: canvas -y
    brow = lm[17:27]
    fore = np.concatenate([brow + config.forehead_range[0] * up, (brow + config.forehead_range[1] * up)[::-1]])
    h = int(np.ceil(pix[:, 1].max())) + 2
    w = int(np.ceil(pix[:, 0].max())) + 2

    def draw(polys, thick: int = 0, dilate: float = 0.0) -> np.ndarray:
        canvas = np.zeros((h, w), np.uint8)
        for q in polys:
            q = np.round(np.asarray(q) * 8).astype(np.int32)  # 3 fractional bits
            if thick:
                cv2.polylines(canvas, [q], False, 1, thick, cv2.LINE_8, 3)
            else:
                cv2.fillPoly(canvas, [q], 1, cv2.LINE_8, 3)
        r = int(round(dilate * d * scale))
        canvas = cv2.dilate(canvas, _disc(r)) if r > 0 else canvas
        ij = np.clip(np.round(pix).astype(np.int64), 0, [w - 1, h - 1])
        return canvas[ij[:, 1], ij[:, 0]].astype(bool)

    m = config.protect_margin
    protect = draw([lm[list(g)] for g in (*_EYES, _LIPS)], dilate=m)
    protect |= draw([lm[list(g)] for g in _BROWS], thick=max(1, int(round(config.brow_width * d * scale))))
    protect |= np.asarray(model.regions["eyes"], bool)
    parts = [draw([lm[list(g)]]) for g, _ in _PATCHES.values()] + [draw([fore])]
    skin = np.asarray(model.regions["face"], bool) & ~np.asarray(model.regions["mouth"], bool) & ~protect
    return np.stack([*(p & skin for p in parts), protect])


def face_cues(fragments: Fragments, model: FaceModel, labels: np.ndarray | None = None) -> FaceCues:
    """The visible skin patches and protected features of fitted faces, from their rasterisation.

    fragments: the fitted meshes rasterised in the working image (``common.render.rasterize`` with the model's
    triangles, back faces culled), (B, S, S); labels: :func:`part_labels` of the model (computed when None).
    A triangle carries a label when the majority of its vertices do; each pixel takes its visible triangle's
    labels, so hidden parts (the far cheek of a profile) are empty. Returns :class:`FaceCues` with a leading
    batch axis: patches (B, P, S, S), weights (P,), protect (B, S, S).
    """
    labels = part_labels(model) if labels is None else labels
    if labels.shape != (len(PART_NAMES) + 1, model.n_vertices):
        raise ValueError(f"labels: expected ({len(PART_NAMES) + 1}, {model.n_vertices}), found {labels.shape}")
    tris = np.asarray(model.triangles, np.int64)
    tri_lab = torch.from_numpy(labels.T[tris].mean(1) >= 0.5)  # (F, P + 1)
    tri_id = fragments.tri_id
    px = tri_lab[tri_id.clamp(min=0)] & (tri_id >= 0)[..., None]  # (B, S, S, P + 1)
    px = px.permute(0, 3, 1, 2).numpy()
    weights = np.array([*(w for _, w in _PATCHES.values()), _FOREHEAD_WEIGHT], np.float32)
    return FaceCues(patches=px[:, :-1], weights=weights, protect=px[:, -1])


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _robust_gaussian(x: np.ndarray, threshold: float, iterations: int, floor: np.ndarray):
    """Mean (C,) and inverse covariance (C, C) of the samples x (N, C), trimmed: each round refits on the
    samples within ``threshold`` Mahalanobis distance of the last fit (started from median / MAD)."""
    mu = np.median(x, 0)
    sd = np.maximum(1.4826 * np.median(np.abs(x - mu), 0), floor)
    cov = np.diag(sd ** 2)
    for _ in range(iterations):
        d2 = _mahalanobis2(x, mu, np.linalg.inv(cov))
        keep = d2 <= threshold ** 2
        if keep.sum() < max(10, x.shape[1] + 2):
            break
        mu = x[keep].mean(0)
        # eigenvalues floored: a core of almost one colour must not make every other pixel an outlier
        cov = np.cov(x[keep].T).reshape(x.shape[1], x.shape[1]) + np.diag(floor ** 2) * 1e-3
        ev, evec = np.linalg.eigh(cov)
        cov = (evec * np.maximum(ev, floor.min() ** 2)) @ evec.T
    return mu, np.linalg.inv(cov)


def _mahalanobis2(x: np.ndarray, mu: np.ndarray, icov: np.ndarray) -> np.ndarray:
    """(N,) squared Mahalanobis distances of x (N, C) from mu (C,) under icov (C, C): the sum over (c, d) of
    ``d_c icov_cd d_d`` in einsum's order (the same values, ~4x quicker than ``einsum("nc,cd,nd->n")`` for C = 2)."""
    d = x - mu
    out = None
    for i in range(d.shape[1]):
        for j in range(d.shape[1]):
            t = d[:, i] * icov[i, j] * d[:, j]
            out = t if out is None else out + t
    return out


def colour_features(image: np.ndarray, chroma_space: str = "logrgb") -> np.ndarray:
    """(S, S, 3) float32 per-pixel (lightness, chroma 1, chroma 2) of an (S, S, 3) uint8 RGB image.

    Lightness is CIE L* (0..100). Chroma: ``lab`` -- CIE a*, b* (offset by 128); ``logrgb`` -- 100 x
    log(R / G) and 100 x log(B / G) (with an offset of 4/255 against noise in the dark): a multiplicative shading
    of a white light leaves it unchanged, so the shadowed side of a face keeps the colour of the lit side.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0
    if chroma_space == "lab":
        return lab
    if chroma_space != "logrgb":
        raise ValueError(f"chroma_space: expected 'lab' or 'logrgb', found {chroma_space!r}")
    rgb = np.log(image.astype(np.float32) + 4.0)
    lab[..., 1] = 100.0 * (rgb[..., 0] - rgb[..., 1])
    lab[..., 2] = 100.0 * (rgb[..., 2] - rgb[..., 1])
    return lab


def detect_occluders(image: np.ndarray, eroded: np.ndarray, cues: FaceCues,
                     config: OcclusionConfig = OcclusionConfig()) -> np.ndarray:
    """Pixels inside the eroded face mask that are not face: (S, S) bool, a subset of ``eroded``.

    image: (S, S, 3) uint8 RGB, the working image; eroded: (S, S) bool, the eroded projected mesh mask
    (``preprocess.unwrap.UVGT.eroded``); cues: :func:`face_cues` of the same fit (one image: ``cues[i]``).
    ``cues.protect`` pixels are never returned.
    """
    image = np.asarray(image)
    s = image.shape[0]
    if image.shape != (s, s, 3) or image.dtype != np.uint8:
        raise ValueError(f"image: expected (S, S, 3) uint8, found {image.shape} {image.dtype}")
    if cues.patches.shape[1:] != (s, s):
        raise ValueError(f"cues.patches: expected (P, {s}, {s}), found {cues.patches.shape}")
    for name, m in (("eroded", eroded), ("cues.protect", cues.protect)):
        if np.shape(m) != (s, s) or np.asarray(m).dtype != bool:
            raise ValueError(f"{name}: expected ({s}, {s}) bool, found {np.shape(m)} {np.asarray(m).dtype}")
    eroded = np.asarray(eroded, bool)
    area = int(eroded.sum())
    if area == 0:
        return np.zeros((s, s), bool)
    face_size = float(np.sqrt(area))
    cfg = config
    lab = colour_features(image, cfg.chroma_space)
    inside = eroded & ~cues.protect
    reject = np.zeros((s, s), bool)
    core = _skin_core(lab, cues, inside, cfg)
    if core.sum() >= cfg.min_core_pixels:
        reject[inside] = _not_skin(lab[inside], _skin_model(lab, core, cfg), cfg)
    return clean_mask(reject, eroded, cues.protect, face_size, cfg)


def _skin_model(lab: np.ndarray, pixels: np.ndarray, cfg: OcclusionConfig):
    """Robust skin model of the given (S, S) bool pixels: chroma mean, inverse covariance, L* median and spread."""
    ab = lab[..., 1:][pixels]
    mu, icov = _robust_gaussian(ab, cfg.chroma_threshold, cfg.trim_iterations,
                                np.full(2, cfg.min_chroma_spread, np.float32))
    light = lab[..., 0][pixels]
    keep = _mahalanobis2(ab, mu, icov) <= cfg.chroma_threshold ** 2
    med = float(np.median(light[keep] if keep.sum() >= 10 else light))
    sd = max(1.4826 * float(np.median(np.abs(light - med))), cfg.min_lightness_spread)
    return mu, icov, med, sd


def _not_skin(lab_px: np.ndarray, model, cfg: OcclusionConfig) -> np.ndarray:
    """(N,) bool: Lab pixels (N, 3) outside the skin model (chroma too far, or far too dark / bright)."""
    mu, icov, med, sd = model
    li = lab_px[:, 0]
    return ((_mahalanobis2(lab_px[:, 1:], mu, icov) > cfg.chroma_threshold ** 2)
            | (li < med - cfg.dark_threshold * sd) | (li > med + cfg.bright_threshold * sd))


def _skin_core(lab: np.ndarray, cues: FaceCues, inside: np.ndarray, cfg: OcclusionConfig) -> np.ndarray:
    """The skin patches that explain the face best: (S, S) bool.

    Every visible patch (at least ``min_core_pixels / 4`` pixels inside the mask) proposes a skin model
    (:func:`_skin_model`); the proposal that accepts the most pixels of the whole mask (``inside``), scaled by
    the patch's prior weight, wins, and the core is the union of the patches whose median colour lies within
    ``agree_distance`` of the winner's (chroma, and ``lightness_weight`` x L*). A hand over the cheek and nose,
    or a fringe over the forehead, is outvoted by the skin that covers the rest of the face.
    """
    patches = cues.patches & inside
    n = patches.reshape(len(patches), -1).sum(1)
    use = np.flatnonzero(n >= max(1, cfg.min_core_pixels // 4))
    if use.size == 0:
        return np.zeros_like(inside)
    lab_in = lab[inside]
    explained = np.array([(~_not_skin(lab_in, _skin_model(lab, patches[p], cfg), cfg)).sum() for p in use])
    best = int(np.argmax(explained * cues.weights[use]))
    scale = np.array([cfg.lightness_weight, 1.0, 1.0], np.float32)
    med = np.stack([np.median(lab[patches[p]], 0) for p in use]) * scale  # (P', 3): one median per patch
    agree = np.linalg.norm(med - med[best], axis=-1) <= cfg.agree_distance
    return patches[use[agree]].any(0)


def clean_mask(reject: np.ndarray, eroded: np.ndarray, protect: np.ndarray, face_size: float,
               config: OcclusionConfig = OcclusionConfig()) -> np.ndarray:
    """Opening, closing and small-component removal of a raw (S, S) bool rejection map, then ∩ ``eroded`` minus
    ``protect``. Radii and the area floor scale with ``face_size`` (pixels)."""
    m = reject.astype(np.uint8)
    r_open = int(round(config.open_frac * face_size))
    r_close = int(round(config.close_frac * face_size))
    if r_open > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disc(r_open))
    if r_close > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disc(r_close))
    m &= eroded.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    big = stats[:, cv2.CC_STAT_AREA] >= config.min_area_frac * face_size ** 2
    big[0] = False
    return big[labels] & eroded & ~protect


def occluders_from_fit(images: np.ndarray, verts_px: np.ndarray, model: FaceModel, uvgt: UVGTConfig,
                       config: OcclusionConfig = OcclusionConfig(), labels: np.ndarray | None = None,
                       cache: UVLayoutCache | None = None, fragments: Fragments | None = None) -> np.ndarray:
    """Occluders of a batch of fitted photos: (B, S, S) bool, each inside its eroded projected mesh mask.

    images: (B, S, S, 3) uint8 RGB working images; verts_px: (B, V, 3) the fitted meshes in their pixels;
    uvgt: the UV_gt settings (the erosion of the face mask, as :func:`preprocess.unwrap.uv_gt_from_images`
    without a segmentation); labels: :func:`part_labels` of the model (computed when None); cache: the
    model's :class:`~preprocess.unwrap.UVLayoutCache` (for its face weights). The texture basis is not used:
    the build learns it from UV_gt maps read under this mask. fragments: optional
    :func:`preprocess.unwrap.rasterize_fitted` of the same meshes, to reuse.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images: expected (B, S, S, 3) uint8, found {images.shape} {images.dtype}")
    b, s = images.shape[:2]
    verts = torch.as_tensor(np.asarray(verts_px), dtype=torch.float32)
    if verts.shape != (b, model.n_vertices, 3):
        raise ValueError(f"verts_px: expected ({b}, {model.n_vertices}, 3), found {tuple(verts.shape)}")
    tris = torch.from_numpy(np.ascontiguousarray(model.triangles, np.int64))
    frags = fragments_or_rasterize(verts, tris, (s, s), fragments)
    weight = face_weight(model) if cache is None else cache.face_weight
    face = face_pixels(frags, tris, weight)
    cues = face_cues(frags, model, part_labels(model, config) if labels is None else labels)
    out = np.zeros((b, s, s), bool)
    for i in range(b):  # per image: its own skin model (a handful of vectorised steps each)
        eroded = erode(face[i], erosion_radius(face[i], uvgt))
        out[i] = detect_occluders(images[i], eroded, cues[i], config=config)
    return out
