"""A synthetic face world with exact ground truth: images, 62-parameter fits and true UV textures.

Each face is drawn deterministically from ``np.random.default_rng([seed, index])``: identity and
expression coefficients, a pose (yaw up to +-90 degrees), ambient + one directional light, a
random albedo (texture basis + high-frequency detail the basis cannot express: skin noise,
freckles, moles, a one-sided mark, stubble) and a cluttered background with optional occluders.

Ground truth follows the paper's UV maps: ``uv_true`` is the texture *as the camera sees it*,
albedo x Lambertian shading baked in, so that rendering the true shape with ``uv_true`` gives
the image's face pixels. The image is rendered ``supersample`` x larger and area-averaged
(anti-aliased silhouettes), composited over the background, then occluders are drawn on top.
Texels outside the UV layout hold an edge extension of the face (so bilinear look-ups at the
rim stay clean); select the face with the model's regions or ``uv_coverage``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from common import render
from common.facemodel import FaceModel
from common.geometry import compose_params, make_pose, project_to_image, vertex_normals
from common.imageio import image_grid, to_uint8
from common.uvtools import model_uv_fragments


@dataclass(frozen=True)
class SyntheticConfig:
    """How synthetic faces are drawn (angles in degrees, colours linear RGB in [0, 1])."""

    image_size: int = 256
    """Side H = W of the square image (and of the 62-parameter frame)."""
    uv_size: int = 256
    """Side U of the UV maps."""
    yaw_max_deg: float = 90.0
    """Yaw is uniform in [-yaw_max, -yaw_min] u [yaw_min, yaw_max]."""
    yaw_min_deg: float = 0.0
    """Smallest |yaw| (e.g. 60 for a set of profiles)."""
    pitch_max_deg: float = 30.0
    """Pitch is uniform in [-pitch_max, pitch_max]."""
    roll_max_deg: float = 15.0
    """Roll is uniform in [-roll_max, roll_max]."""
    fill_min: float = 0.5
    """Smallest size of the face's bounding box (its longer side) relative to the image."""
    fill_max: float = 0.7
    """Largest size of the face's bounding box relative to the image."""
    centre_jitter: float = 0.06
    """Face-centre offset from the image centre, uniform in +-jitter x image size."""
    id_scale: float = 1.0
    """Standard deviation of the identity coefficients."""
    exp_scale: float = 0.6
    """Standard deviation of the expression coefficients (``mouth_open`` is folded to >= 0)."""
    tex_scale: float = 1.0
    """Standard deviation of the texture-basis coefficients."""
    ambient_min: float = 0.3
    """Ambient intensity range (grey level before the tint)."""
    ambient_max: float = 0.6
    """Upper end of the ambient intensity range."""
    diffuse_min: float = 0.35
    """Directional light intensity range."""
    diffuse_max: float = 0.8
    """Upper end of the directional light intensity range."""
    light_tint: float = 0.08
    """Per-channel relative colour jitter of both lights."""
    detail_strength: float = 1.0
    """Scale of the high-frequency detail (0 turns it off: the albedo is then exactly in the basis span)."""
    occluder_prob: float = 0.3
    """Probability that a face gets occluders (one or two hand- or hair-like blobs)."""
    clutter_shapes: int = 12
    """Random shapes drawn on the background."""
    background_noise: float = 0.03
    """Standard deviation of the background's pixel noise."""
    supersample: int = 2
    """Render at this factor and area-average (anti-aliasing)."""
    min_facing: float = 0.2
    """Texels whose surface normal's component towards the camera is below this are not ``uv_visible`` (grazing)."""
    visibility_tol: float = 0.01
    """Depth tolerance of the visibility test, as a fraction of the image size (pixels / image_size)."""
    seed: int = 0
    """Dataset seed; face ``index`` uses ``default_rng([seed, index])``."""


@dataclass(frozen=True, eq=False)
class SyntheticFace:
    """One synthetic face and its exact ground truth.

    * ``image``: (H, W, 3) uint8 RGB.
    * ``params``: (62,) float32, ``[sR|t](12) + alpha_id(40) + alpha_exp(10)``; the frame is the
      whole image (``frame_size = H``), see :mod:`common.geometry`.
    * ``uv_true``: (U, U, 3) float32 in [0, 1], albedo x shading as seen by the camera.
    * ``uv_albedo``: (U, U, 3) float32 in [0, 1], the albedo alone (basis colour + detail).
    * ``uv_visible``: (U, U) bool, texels the camera sees (not grazing, see ``min_facing``) that no occluder covers.
    * ``uv_coverage``: (U, U) bool, texels inside the model's UV layout.
    * ``face_mask``: (H, W) bool, pixels at least half covered by the face and not occluded.
    * ``occluder_mask``: (H, W) bool, pixels touched by an occluder.
    * ``tex_coeff``: (K_tex,) float32 texture-basis coefficients (0-length if the model has none).
    * ``ambient``, ``light_colour``: (3,) float32 RGB intensities; ``light_dir``: (3,) float32 unit
      vector in the camera frame (x right, y up, z towards the camera).
    """

    index: int
    image: np.ndarray
    params: np.ndarray
    uv_true: np.ndarray
    uv_albedo: np.ndarray
    uv_visible: np.ndarray
    uv_coverage: np.ndarray
    face_mask: np.ndarray
    occluder_mask: np.ndarray
    tex_coeff: np.ndarray
    ambient: np.ndarray
    light_dir: np.ndarray
    light_colour: np.ndarray


# ----------------------------------------------------------------------------------- helpers
def layout_raster(model: FaceModel, size: int):
    """UV-space fragments of the model's layout (1, U, U) and the coverage mask (U, U) bool."""
    frags = model_uv_fragments(model, size)
    return frags, (frags.tri_id[0] >= 0).numpy()


def _to_uv(frags, attr: np.ndarray) -> np.ndarray:
    """Per-vertex attributes (V, C) -> UV image (U, U, C) float32 (0 outside the layout)."""
    return render.interpolate(frags, torch.as_tensor(attr, dtype=torch.float32)[None])[0].numpy()


def _extend(img: np.ndarray, cover: np.ndarray, rings: int = 4) -> np.ndarray:
    """Fill texels outside ``cover`` by repeated normalised 3x3 averaging (``rings`` texels), then the mean."""
    img = img * cover[..., None]
    m = cover.astype(np.float32)
    for _ in range(rings):
        num = cv2.blur(img * m[..., None], (3, 3), borderType=cv2.BORDER_REPLICATE)
        den = cv2.blur(m, (3, 3), borderType=cv2.BORDER_REPLICATE)
        grow = (m == 0) & (den > 0)
        img[grow] = num[grow] / den[grow, None]
        m = np.where(grow, 1.0, m).astype(np.float32)
    mean = img[m > 0].mean(0) if (m > 0).any() else np.zeros(img.shape[2], np.float32)
    img[m == 0] = mean
    return img


def _sample_pose(rng: np.random.Generator, cfg: SyntheticConfig, shape: np.ndarray):
    """Random pose (1, 3, 4) with the face's bounding box filling ``fill`` of the image."""
    s_img = cfg.image_size
    sign = rng.choice([-1.0, 1.0])
    yaw = np.radians(sign * rng.uniform(cfg.yaw_min_deg, cfg.yaw_max_deg))
    pitch, roll = np.radians(rng.uniform(-1, 1, 2) * [cfg.pitch_max_deg, cfg.roll_max_deg])
    fill = rng.uniform(cfg.fill_min, cfg.fill_max)
    jitter = rng.uniform(-1, 1, 2) * cfg.centre_jitter * s_img
    unit = make_pose(1.0, yaw, pitch, roll, np.zeros((1, 3)))
    rot = np.einsum("ij,vj->vi", unit[0, :, :3], shape)
    lo, hi = rot[:, :2].min(0), rot[:, :2].max(0)
    scale = fill * s_img / (hi - lo).max()
    centre_img = np.array([s_img / 2 + jitter[0], s_img / 2 + jitter[1]])
    centre_frame = np.array([centre_img[0], s_img - centre_img[1]])
    t = np.concatenate([centre_frame - scale * (lo + hi) / 2, [0.0]])
    return make_pose(scale, yaw, pitch, roll, t[None])


def _sample_light(rng: np.random.Generator, cfg: SyntheticConfig):
    d = np.array([rng.normal(0, 0.7), rng.normal(0.3, 0.4), 1.0])
    d /= np.linalg.norm(d)
    amb = rng.uniform(cfg.ambient_min, cfg.ambient_max) * (1 + cfg.light_tint * rng.uniform(-1, 1, 3))
    col = rng.uniform(cfg.diffuse_min, cfg.diffuse_max) * (1 + cfg.light_tint * rng.uniform(-1, 1, 3))
    return amb.astype(np.float32), d.astype(np.float32), col.astype(np.float32)


def _blobs(rng: np.random.Generator, cover: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """(U, U) float32 sum of ``n`` Gaussian dots of width ``sigma`` texels at random covered texels (peak ~1)."""
    out = np.zeros(cover.shape, np.float32)
    idx = np.flatnonzero(cover)
    if n == 0 or idx.size == 0:
        return out
    pick = rng.choice(idx, size=n)
    np.add.at(out.reshape(-1), pick, rng.uniform(0.4, 1.0, n).astype(np.float32))
    out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out * (2 * np.pi * sigma ** 2)


def _detail(rng: np.random.Generator, cfg: SyntheticConfig, cover: np.ndarray, beard: np.ndarray):
    """High-frequency albedo detail the basis cannot express: multiplicative (U, U, 3) factor."""
    u_sz = cover.shape[0]
    k = u_sz / 256.0
    st = cfg.detail_strength
    fac = np.ones((u_sz, u_sz, 3), np.float32)
    # skin grain
    grain = cv2.GaussianBlur(rng.normal(0, 1, (u_sz, u_sz)).astype(np.float32), (0, 0), 0.7 * k + 0.3)
    fac *= (1 + 0.04 * st * grain)[..., None]
    # freckles and moles (brown: blue absorbs most)
    brown = np.array([0.35, 0.55, 0.7], np.float32)
    freckles = _blobs(rng, cover, int(rng.integers(0, 160) * k * k), 1.0 * k + 0.3)
    fac *= 1 - st * np.clip(0.35 * rng.uniform(0.3, 1.0) * freckles, 0, 0.6)[..., None] * brown
    moles = _blobs(rng, cover, int(rng.integers(0, 4)), 2.2 * k + 0.3)
    fac *= 1 - st * np.clip(0.9 * moles, 0, 0.8)[..., None] * np.array([0.7, 0.8, 0.85], np.float32)
    # one asymmetric mark (birthmark / scar): an elongated blob on one side, redder or paler
    if rng.random() < 0.6 and cover.any():
        ii, jj = np.nonzero(cover)
        c = rng.integers(len(ii))
        yy, xx = np.mgrid[0:u_sz, 0:u_sz].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        a, b = rng.uniform(6, 18) * k, rng.uniform(2, 6) * k
        dx, dy = xx - jj[c], yy - ii[c]
        r2 = ((dx * np.cos(ang) + dy * np.sin(ang)) / a) ** 2 + ((-dx * np.sin(ang) + dy * np.cos(ang)) / b) ** 2
        mark = np.exp(-r2).astype(np.float32)
        tint = np.array([0.02, -0.15, -0.12], np.float32) if rng.random() < 0.6 else np.array([0.12, 0.1, 0.1])
        fac *= 1 + st * mark[..., None] * tint.astype(np.float32)
    # stubble: sparse dark dots in the beard area
    if rng.random() < 0.4:
        dots = (rng.random((u_sz, u_sz)) < rng.uniform(0.08, 0.25)).astype(np.float32)
        dots = cv2.GaussianBlur(dots, (0, 0), 0.5 * k + 0.2)
        fac *= 1 - st * rng.uniform(0.1, 0.3) * (dots * beard)[..., None]
    return fac


def _beard_area(model: FaceModel, size: int) -> np.ndarray:
    """Soft (U, U) weight of the beard area: below the nose base, above the chin bottom (UV rows)."""
    v = 1.0 - (np.arange(size) + 0.5) / size
    if model.keypoints is not None:
        v_top = model.uv[model.keypoints[33], 1] - 0.02
        v_bot = model.uv[model.keypoints[8], 1] - 0.06
    else:
        v_top, v_bot = 0.35, 0.05
    u = (np.arange(size) + 0.5) / size
    w = np.clip((v_top - v) / 0.06, 0, 1) * np.clip((v - v_bot) / 0.04, 0, 1)
    side = np.clip((0.36 - np.abs(u - 0.5)) / 0.08, 0, 1)
    return (w[:, None] * side[None, :]).astype(np.float32)


def _background(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: gradient + random shapes + noise."""
    s = cfg.image_size
    c0, c1 = rng.uniform(0.05, 0.95, (2, 3))
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    t = np.clip(0.5 + (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang), 0, 1)[..., None]
    bg = ((1 - t) * c0 + t * c1).astype(np.float32)
    for _ in range(cfg.clutter_shapes):
        col = tuple(float(c) for c in rng.uniform(0, 1, 3))
        kind = rng.integers(3)
        p = rng.integers(0, s, 4)
        if kind == 0:
            cv2.circle(bg, (int(p[0]), int(p[1])), int(rng.integers(2, max(3, s // 6))), col, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(bg, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), col, -1)
        else:
            cv2.line(bg, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), col, int(rng.integers(1, 4)), cv2.LINE_AA)
    bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(0.5, 2.0))
    bg += rng.normal(0, cfg.background_noise, bg.shape).astype(np.float32)
    return np.clip(bg, 0, 1)


def _occluders(rng: np.random.Generator, cfg: SyntheticConfig, face: np.ndarray):
    """Alpha (H, W) float32 in [0, 1] and colour (H, W, 3) of hand- or hair-like blobs over the face."""
    s = cfg.image_size
    alpha = np.zeros((s, s), np.float32)
    colour = np.zeros((s, s, 3), np.float32)
    pix = np.flatnonzero(face)
    if rng.random() >= cfg.occluder_prob or pix.size == 0:
        return alpha, colour
    for _ in range(int(rng.integers(1, 3))):
        a = np.zeros((s, s), np.float32)
        c = pix[rng.integers(pix.size)]
        cy, cx = divmod(int(c), s)
        if rng.random() < 0.5:  # a hand: palm + fingers, skin-like
            r = int(s * rng.uniform(0.08, 0.14))
            ang = rng.uniform(0, 2 * np.pi)
            cv2.ellipse(a, (cx, cy), (r, int(r * 1.2)), np.degrees(ang), 0, 360, 1.0, -1, cv2.LINE_AA)
            for f in range(4):
                fa = ang + (f - 1.5) * 0.28
                tip = (int(cx + 2.6 * r * np.cos(fa)), int(cy + 2.6 * r * np.sin(fa)))
                cv2.line(a, (cx, cy), tip, 1.0, max(2, int(r * 0.45)), cv2.LINE_AA)
            base = rng.uniform([0.55, 0.35, 0.25], [0.9, 0.7, 0.6])
        else:  # hair: a bundle of thick strands from the top of the image
            x0 = cx + rng.normal(0, s * 0.05, 8)
            for xs in x0:
                pts = np.stack([xs + np.cumsum(rng.normal(0, s * 0.02, 6)), np.linspace(0, cy + s * 0.05, 6)], 1)
                cv2.polylines(a, [pts.astype(np.int32)], False, 1.0, max(2, int(s * 0.025)), cv2.LINE_AA)
            base = rng.uniform([0.02, 0.02, 0.01], [0.5, 0.35, 0.2])
        shade = cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), 2.0)
        col = np.clip(base[None, None] * (1 + 0.25 * shade[..., None]), 0, 1)
        colour = colour * (1 - a[..., None]) + col * a[..., None]
        alpha = np.maximum(alpha, a)
    return np.clip(alpha, 0, 1), colour.astype(np.float32)


# ---------------------------------------------------------------------------------- generator
def _check(cfg: SyntheticConfig, model: FaceModel) -> None:
    if model.n_id > 40 or model.n_exp > 10:
        raise ValueError(f"face model {model.name!r} has {model.n_id} id / {model.n_exp} exp components; the "
                         f"62-parameter convention holds at most 40 / 10")
    if cfg.image_size < 16 or cfg.uv_size < 16 or cfg.supersample < 1:
        raise ValueError(f"SyntheticConfig: image_size and uv_size must be >= 16 and supersample >= 1, found "
                         f"{cfg.image_size}, {cfg.uv_size}, {cfg.supersample}")
    if not 0 <= cfg.yaw_min_deg <= cfg.yaw_max_deg <= 90:
        raise ValueError(f"SyntheticConfig: need 0 <= yaw_min_deg <= yaw_max_deg <= 90, found "
                         f"{cfg.yaw_min_deg}, {cfg.yaw_max_deg}")
    if not 0 < cfg.fill_min <= cfg.fill_max:
        raise ValueError(f"SyntheticConfig: need 0 < fill_min <= fill_max, found {cfg.fill_min}, {cfg.fill_max}")


def generate(index: int, config: SyntheticConfig, model: FaceModel, uv_raster=None) -> SyntheticFace:
    """Draw synthetic face ``index`` (deterministic in ``(config.seed, index)`` and the model).

    Works with any :class:`FaceModel` whose bases are scaled so that N(0, 1) coefficients are
    plausible (the procedural model is); without a texture basis the mean (or grey) albedo is used.
    uv_raster: optional ``(fragments, coverage)`` of the model's UV layout at ``uv_size`` to reuse
    (:func:`generate_batch` computes it once); it does not change the result.
    """
    cfg = config
    _check(cfg, model)
    rng = np.random.default_rng([cfg.seed, int(index)])
    s_img, u_sz, ss = cfg.image_size, cfg.uv_size, cfg.supersample
    tris = torch.as_tensor(model.triangles)

    a_id = (rng.normal(0, cfg.id_scale, model.n_id)).astype(np.float32)
    a_exp = (rng.normal(0, cfg.exp_scale, model.n_exp)).astype(np.float32)
    exp_names = list(model.meta.get("exp_names", []))
    if "mouth_open" in exp_names:
        a_exp[exp_names.index("mouth_open")] = abs(a_exp[exp_names.index("mouth_open")])
    shape = model.shape(a_id[None], a_exp[None])[0]
    pose = _sample_pose(rng, cfg, shape)
    ambient, light_dir, light_col = _sample_light(rng, cfg)

    # albedo: texture basis colour + detail; shading: Lambertian from the posed normals
    tex_coeff = rng.normal(0, cfg.tex_scale, model.n_tex).astype(np.float32)
    if model.tex_mean is not None:
        albedo_v = np.clip(model.texture(tex_coeff[None])[0], 0, 1)
    else:
        albedo_v = np.full((model.n_vertices, 3), 0.6, np.float32)
    frame = np.einsum("ij,vj->vi", pose[0, :, :3], shape) + pose[0, :, 3]
    normals = vertex_normals(torch.as_tensor(frame, dtype=torch.float32)[None], tris)[0].numpy()
    shading_v = ambient + light_col * np.clip(normals @ light_dir, 0, None)[:, None]
    uv_frags, cover = layout_raster(model, u_sz) if uv_raster is None else uv_raster
    if cover.shape != (u_sz, u_sz):
        raise ValueError(f"uv_raster: made for a {cover.shape} UV map, the config asks for {(u_sz, u_sz)}")
    detail = _detail(rng, cfg, cover, _beard_area(model, u_sz))
    uv_albedo = np.clip(_to_uv(uv_frags, albedo_v) * detail, 0, 1)
    uv_true = np.clip(uv_albedo * _to_uv(uv_frags, shading_v), 0, 1)
    uv_albedo = _extend(uv_albedo, cover)
    uv_true = _extend(uv_true, cover)

    # render super-sampled, area-average, composite
    verts_px = torch.as_tensor(project_to_image(shape[None], pose, s_img), dtype=torch.float32)
    hi = verts_px * torch.tensor([ss, ss, 1.0])
    frags = render.rasterize(hi, tris, (s_img * ss, s_img * ss))
    tex = torch.as_tensor(uv_true).permute(2, 0, 1)[None]
    img_hi, mask_hi = render.render_texture(frags, tris, torch.as_tensor(model.uv), tex)
    face_rgb = img_hi[0].reshape(3, s_img, ss, s_img, ss).mean((2, 4)).permute(1, 2, 0).numpy()
    cov = mask_hi[0, 0].reshape(s_img, ss, s_img, ss).mean((1, 3)).numpy()
    bg = _background(rng, cfg)
    img = face_rgb + (1 - cov[..., None]) * bg
    occ_alpha, occ_col = _occluders(rng, cfg, cov >= 0.5)
    img = img * (1 - occ_alpha[..., None]) + occ_col * occ_alpha[..., None]
    occluder = occ_alpha > 0

    # visibility: the renderer's unwrap visibility, minus grazing texels and texels reading any occluder pixel
    occ_hi = cv2.resize(occ_alpha, (s_img * ss, s_img * ss), interpolation=cv2.INTER_NEAREST)
    occ_uv, vis = render.unwrap_to_uv(torch.as_tensor(occ_hi)[None, None], hi, tris, torch.as_tensor(model.uv),
                                      u_sz, depth_tol=cfg.visibility_tol * s_img * ss, fragments=frags,
                                      uv_frags=uv_frags)
    facing = _to_uv(uv_frags, normals[:, 2:3])[..., 0] >= cfg.min_facing
    uv_visible = vis[0, 0].numpy() & (occ_uv[0, 0].numpy() <= 0) & facing

    params = compose_params(pose, a_id[None], a_exp[None])[0].astype(np.float32)
    return SyntheticFace(
        index=int(index), image=to_uint8(img), params=params, uv_true=uv_true.astype(np.float32),
        uv_albedo=uv_albedo.astype(np.float32), uv_visible=uv_visible, uv_coverage=cover,
        face_mask=(cov >= 0.5) & ~occluder, occluder_mask=occluder, tex_coeff=tex_coeff,
        ambient=ambient, light_dir=light_dir, light_colour=light_col,
    )


def generate_batch(indices: Sequence[int], config: SyntheticConfig, model: FaceModel) -> list[SyntheticFace]:
    """:func:`generate` for each index (each face is independent of the others)."""
    uv_raster = layout_raster(model, config.uv_size)
    return [generate(int(i), config, model, uv_raster) for i in indices]


def preview_grid(faces: Sequence[SyntheticFace], pad: int = 4) -> np.ndarray:
    """Contact sheet (h, w, 3) uint8, one row per face: image | true UV | visible UV (grey elsewhere)."""
    rows = []
    for f in faces:
        vis = np.where(f.uv_visible[..., None], f.uv_true, 0.5)
        rows.append([f.image, f.uv_true, vis])
    labels = [[f"#{f.index}", "uv_true", "uv_visible"] for f in faces]
    return image_grid(rows, pad=pad, labels=labels)
