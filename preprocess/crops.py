"""Partial UV crops for the two UV discriminators (Section 3.4).

Frontal faces (|yaw| <= ``frontal_yaw_max``) give a *centre* crop UV_ctr of the frontal face
box with the nostrils masked out (they are dark holes the generator should not imitate).
Profiles (|yaw| >= ``profile_yaw_min``) give a *side* crop UV_sd of the visible cheek, mirrored to
one canonical side (the face's left, model +x) so that all side crops look alike, with the nose
masked out (its profile silhouette is unreliable). Boxes and masks come from the face model's
named UV regions, so the crops have a fixed size per (model, UV size) and stack into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropConfig:
    frontal_yaw_max: float = 10.0
    """|yaw| (degrees) at or below which a face counts as frontal and yields a centre crop."""
    profile_yaw_min: float = 30.0
    """|yaw| (degrees) at or above which a face counts as a profile and yields a side crop."""
    min_coverage: float = 0.6
    """A crop is valid only if at least this fraction of its region (minus the masked part) is observed."""
    margin: int = 2
    """Texels added around each region's bounding box."""


@dataclass(frozen=True, eq=False)
class CropLayout:
    """Where the crops are cut in a UV image of side ``uv_size`` (computed once per face model).

    ctr_box / sd_box: (row0, row1, col0, col1), half-open. ctr_region: (hc, wc) bool, the centre region
    without the nostrils inside the box; sd_region: (hs, ws) bool, the face's left half without the nose.
    """

    uv_size: int
    ctr_box: tuple[int, int, int, int]
    sd_box: tuple[int, int, int, int]
    ctr_region: np.ndarray
    sd_region: np.ndarray


@dataclass(frozen=True, eq=False)
class PartialCrops:
    """uv_ctr: (hc, wc, 3), ctr_mask: (hc, wc) bool, ctr_valid; uv_sd: (hs, ws, 3), sd_mask, sd_valid.

    Image dtype follows the input UV map. Invalid crops are zeros with an all-False mask.
    """

    uv_ctr: np.ndarray
    ctr_mask: np.ndarray
    ctr_valid: bool
    uv_sd: np.ndarray
    sd_mask: np.ndarray
    sd_valid: bool


def _bbox(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty UV region: the face model's regions do not cover any texel at this UV size")
    u = mask.shape[0]
    return (max(int(rows.min()) - margin, 0), min(int(rows.max()) + 1 + margin, u),
            max(int(cols.min()) - margin, 0), min(int(cols.max()) + 1 + margin, u))


def crop_layout_from_regions(regions: dict[str, np.ndarray], config: CropConfig = CropConfig()) -> CropLayout:
    """Crop boxes and masks from UV region masks (name -> (U, U) bool), e.g. ``FaceModel.region_uv_mask``.

    Needs ``centre``, ``nostrils``, ``left``, ``nose`` and ``face``; ``eyes`` (part of the texture the
    discriminators should see, though not of the skin region ``face``) and ``mouth`` (the interior, never
    textured) are used when given.
    """
    u = regions["face"].shape[0]
    textured = regions["face"] | regions.get("eyes", np.zeros_like(regions["face"]))
    textured &= ~regions.get("mouth", np.zeros_like(regions["face"]))
    ctr = regions["centre"] & textured
    side = regions["left"] & textured
    ctr_box, sd_box = _bbox(ctr, config.margin), _bbox(side, config.margin)
    ctr_region = (ctr & ~regions["nostrils"])[ctr_box[0]:ctr_box[1], ctr_box[2]:ctr_box[3]]
    sd_region = (side & ~regions["nose"])[sd_box[0]:sd_box[1], sd_box[2]:sd_box[3]]
    return CropLayout(u, ctr_box, sd_box, ctr_region.copy(), sd_region.copy())


def crop_layout(model, uv_size: int, config: CropConfig = CropConfig()) -> CropLayout:
    """:func:`crop_layout_from_regions` for a :class:`common.facemodel.FaceModel` at ``uv_size``."""
    from common.uvtools import model_uv_fragments

    frags = model_uv_fragments(model, uv_size)
    names = ("face", "centre", "nostrils", "left", "nose", "eyes", "mouth")
    return crop_layout_from_regions({n: model.region_uv_mask(n, uv_size, frags) for n in names}, config)


def mirror_uv(uv: np.ndarray, mirror_index: np.ndarray | None = None) -> np.ndarray:
    """Mirror a UV image (U, U, ...) across the face's symmetry plane: a column flip, or ``mirror_index``.

    mirror_index: (U*U,) int64, texel -> texel holding its mirror point, -1 where none (those become 0).
    """
    if mirror_index is None:
        return uv[:, ::-1].copy()
    u = uv.shape[0]
    flat = uv.reshape(u * u, *uv.shape[2:])
    out = np.zeros_like(flat)
    ok = mirror_index >= 0
    out[ok] = flat[mirror_index[ok]]
    return out.reshape(uv.shape)


def cut_partial_crops(uv_gt: np.ndarray, uv_mask: np.ndarray, yaw_deg: float, layout: CropLayout,
                      config: CropConfig = CropConfig(), mirror_index: np.ndarray | None = None) -> PartialCrops:
    """Cut UV_ctr and UV_sd from one incomplete UV map (Section 3.4).

    uv_gt: (U, U, 3) uint8 or float; uv_mask: (U, U) bool observed texels; yaw_deg: the fitted yaw in
    degrees (positive shows the face's left cheek, see ``common.geometry``). A side crop from a
    negative-yaw profile (right cheek visible) is mirrored onto the canonical left side first.
    """
    u = layout.uv_size
    if uv_gt.shape[:2] != (u, u) or uv_mask.shape != (u, u):
        raise ValueError(f"expected a ({u}, {u}, 3) UV map and ({u}, {u}) mask, found {uv_gt.shape}, {uv_mask.shape}")
    r0, r1, c0, c1 = layout.ctr_box
    ctr_mask = uv_mask[r0:r1, c0:c1] & layout.ctr_region
    ctr_valid = (abs(yaw_deg) <= config.frontal_yaw_max
                 and ctr_mask.sum() >= config.min_coverage * layout.ctr_region.sum())
    uv_ctr = np.where(ctr_mask[..., None], uv_gt[r0:r1, c0:c1], 0).astype(uv_gt.dtype)

    src, msk = (uv_gt, uv_mask) if yaw_deg >= 0 else (mirror_uv(uv_gt, mirror_index), mirror_uv(uv_mask, mirror_index))
    r0, r1, c0, c1 = layout.sd_box
    sd_mask = msk[r0:r1, c0:c1] & layout.sd_region
    sd_valid = (abs(yaw_deg) >= config.profile_yaw_min
                and sd_mask.sum() >= config.min_coverage * layout.sd_region.sum())
    uv_sd = np.where(sd_mask[..., None], src[r0:r1, c0:c1], 0).astype(uv_gt.dtype)
    if not ctr_valid:
        uv_ctr, ctr_mask = np.zeros_like(uv_ctr), np.zeros_like(ctr_mask)
    if not sd_valid:
        uv_sd, sd_mask = np.zeros_like(uv_sd), np.zeros_like(sd_mask)
    return PartialCrops(uv_ctr, ctr_mask, bool(ctr_valid), uv_sd, sd_mask, bool(sd_valid))
