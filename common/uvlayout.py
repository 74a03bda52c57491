"""Where the partial UV crops are cut (Section 3.4) and how a UV image is mirrored.

Both sides need this: ``uvprep build`` cuts the crops the UV discriminators see, and the trainer cuts
the same crops from generated UV maps. A :class:`CropLayout` depends only on (face model, U, config):
it is computed once by :func:`crop_layout`, stored in the store's ``uv_layout/`` group and read back
with ``common.store.StoreReader.crop_layout``.

Centre crop: the box around the ``centre`` region with the nostrils masked out (dark holes the
generator should not imitate). Side crop: the box around the face's ``left`` half (model +x) with the
nose masked out (its profile silhouette is unreliable). Boxes and masks come from the face model's
named UV regions, so the crops have a fixed size per (model, UV size) and stack into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import CropConfig


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

    def __post_init__(self) -> None:
        for name in ("ctr", "sd"):
            box, region = getattr(self, f"{name}_box"), getattr(self, f"{name}_region")
            if len(box) != 4 or region.shape != (box[1] - box[0], box[3] - box[2]) or region.dtype != bool:
                raise ValueError(f"CropLayout.{name}_region: expected a bool mask the size of {name}_box {box}, "
                                 f"found {region.shape} {region.dtype}")
            if min(box) < 0 or max(box) > self.uv_size:
                raise ValueError(f"CropLayout.{name}_box {box} leaves the {self.uv_size}x{self.uv_size} UV image")

    def equals(self, other: CropLayout) -> bool:
        """Same size, boxes and region masks."""
        return (self.uv_size == other.uv_size and tuple(self.ctr_box) == tuple(other.ctr_box)
                and tuple(self.sd_box) == tuple(other.sd_box) and np.array_equal(self.ctr_region, other.ctr_region)
                and np.array_equal(self.sd_region, other.sd_region))


def _bbox(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty UV region: the face model's regions do not cover any texel at this UV size")
    u = mask.shape[0]
    return (max(int(rows.min()) - margin, 0), min(int(rows.max()) + 1 + margin, u),
            max(int(cols.min()) - margin, 0), min(int(cols.max()) + 1 + margin, u))


def crop_layout_from_regions(regions: dict[str, np.ndarray], config: CropConfig = CropConfig()) -> CropLayout:
    """Crop boxes and masks from UV region masks (name -> (U, U) bool), e.g. ``common.uvtools.region_uv_mask``.

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


def crop_layout(model, uv_size: int, config: CropConfig = CropConfig(), frags=None) -> CropLayout:
    """:func:`crop_layout_from_regions` for a :class:`common.facemodel.FaceModel` at ``uv_size``.

    frags: a reusable ``common.uvtools.model_uv_fragments(model, uv_size)`` result.
    """
    from common.uvtools import model_uv_fragments, region_uv_mask  # torch: imported only where the layout is computed

    frags = model_uv_fragments(model, uv_size) if frags is None else frags
    names = ("face", "centre", "nostrils", "left", "nose", "eyes", "mouth")
    return crop_layout_from_regions({n: region_uv_mask(model, n, uv_size, frags) for n in names}, config)


def mirror_uv(uv: np.ndarray, mirror_index: np.ndarray | None = None) -> np.ndarray:
    """Mirror a UV image (U, U, ...) across the face's symmetry plane: a column flip, or ``mirror_index``.

    mirror_index: (U*U,) int64, texel -> texel holding its mirror point, -1 where none (those become 0);
    see ``common.uvtools.texel_mirror_index``.
    """
    if mirror_index is None:
        return uv[:, ::-1].copy()
    u = uv.shape[0]
    flat = uv.reshape(u * u, *uv.shape[2:])
    out = np.zeros_like(flat)
    ok = mirror_index >= 0
    out[ok] = flat[mirror_index[ok]]
    return out.reshape(uv.shape)
