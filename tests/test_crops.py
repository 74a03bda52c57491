"""Partial UV crops (Section 3.4) on hand-made UV regions."""

import numpy as np
import pytest

from common.config import CropConfig
from common.uvlayout import crop_layout_from_regions, mirror_uv
from preprocess.crops import cut_partial_crops

U = 32


def _regions():
    yy, xx = np.mgrid[0:U, 0:U]
    face = ((xx - 15.5) / 14) ** 2 + ((yy - 15.5) / 15) ** 2 <= 1
    centre = (xx >= 9) & (xx <= 22) & (yy >= 6) & (yy <= 26)
    nose = (xx >= 13) & (xx <= 18) & (yy >= 10) & (yy <= 19)
    nostrils = nose & (yy >= 18)
    left = xx >= 16  # the face's left is u > 0.5 in this layout
    return {"face": face, "centre": centre, "nose": nose, "nostrils": nostrils, "left": left}


def _uv():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (U, U, 3), dtype=np.uint8)


def test_frontal_gives_centre_crop_with_nostrils_masked():
    regions = _regions()
    layout = crop_layout_from_regions(regions, CropConfig(margin=0))
    assert layout.ctr_box == (6, 27, 9, 23)
    uv, mask = _uv(), regions["face"].copy()
    crops = cut_partial_crops(uv, mask, yaw_deg=4.0, layout=layout)
    assert crops.ctr_valid and not crops.sd_valid
    nostrils = regions["nostrils"][6:27, 9:23]
    assert not crops.ctr_mask[nostrils].any()
    assert crops.ctr_mask.sum() == (regions["centre"] & ~regions["nostrils"] & regions["face"]).sum()
    np.testing.assert_array_equal(crops.uv_ctr[crops.ctr_mask], uv[6:27, 9:23][crops.ctr_mask])
    assert not crops.uv_sd.any() and not crops.sd_mask.any()


def test_profiles_give_side_crops_on_the_canonical_side():
    regions = _regions()
    layout = crop_layout_from_regions(regions)
    uv = _uv()
    left_seen = regions["face"] & regions["left"]
    pos = cut_partial_crops(uv, left_seen, yaw_deg=70.0, layout=layout)
    assert pos.sd_valid and not pos.ctr_valid
    assert not pos.sd_mask[regions["nose"][slice(*layout.sd_box[:2]), slice(*layout.sd_box[2:])]].any()
    # The mirrored face seen from the other side gives the same crop.
    neg = cut_partial_crops(mirror_uv(uv), mirror_uv(left_seen), yaw_deg=-70.0, layout=layout)
    assert neg.sd_valid
    np.testing.assert_array_equal(neg.uv_sd, pos.uv_sd)
    np.testing.assert_array_equal(neg.sd_mask, pos.sd_mask)
    # An explicit mirror index equal to a column flip gives the same answer.
    idx = np.arange(U * U).reshape(U, U)[:, ::-1].reshape(-1)
    neg2 = cut_partial_crops(mirror_uv(uv), mirror_uv(left_seen), -70.0, layout, mirror_index=idx)
    np.testing.assert_array_equal(neg2.uv_sd, pos.uv_sd)


def test_poor_coverage_and_intermediate_yaw_are_invalid():
    regions = _regions()
    layout = crop_layout_from_regions(regions)
    uv = _uv()
    sparse = regions["face"] & (np.arange(U)[None, :] % 3 == 0)
    assert not cut_partial_crops(uv, sparse, 0.0, layout).ctr_valid
    mid = cut_partial_crops(uv, regions["face"], 20.0, layout)
    assert not mid.ctr_valid and not mid.sd_valid
    with pytest.raises(ValueError, match="expected a"):
        cut_partial_crops(uv[:16], regions["face"], 0.0, layout)


def test_crop_layout_checks_its_masks_against_its_boxes():
    from common.uvlayout import CropLayout

    layout = crop_layout_from_regions(_regions())
    again = CropLayout(layout.uv_size, layout.ctr_box, layout.sd_box, layout.ctr_region.copy(), layout.sd_region.copy())
    assert again.equals(layout) and not again.equals(crop_layout_from_regions(_regions(), CropConfig(margin=0)))
    with pytest.raises(ValueError, match="ctr_region: expected a bool mask the size of ctr_box"):
        CropLayout(U, layout.ctr_box, layout.sd_box, layout.ctr_region[1:], layout.sd_region)
    with pytest.raises(ValueError, match="leaves the 32x32 UV image"):
        CropLayout(U, layout.ctr_box, (0, 3, 30, 34), layout.ctr_region, np.ones((3, 4), bool))
