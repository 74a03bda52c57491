"""Partial UV crops for the two UV discriminators (Section 3.4).

Frontal faces (|yaw| <= ``frontal_yaw_max``) give a *centre* crop UV_ctr of the frontal face
box with the nostrils masked out (they are dark holes the generator should not imitate).
Profiles (|yaw| >= ``profile_yaw_min``) give a *side* crop UV_sd of the visible cheek, mirrored to
one canonical side (the face's left, model +x) so that all side crops look alike, with the nose
masked out (its profile silhouette is unreliable). Where the crops are cut (:class:`CropLayout`,
:func:`crop_layout`) lives in :mod:`common.uvlayout`, which the trainer shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import CropConfig
from common.uvlayout import CropLayout, mirror_uv


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
