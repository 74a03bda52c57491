"""UV_gt under an eroded face mask (Fig. 4), measured on the synthetic world."""

import numpy as np
import pytest

from common.geometry import project_to_image, split_params
from common.procedural import build_procedural_model
from common.synthetic import SyntheticConfig, generate
from common.uvtools import region_uv_mask
from preprocess.config import UVGTConfig
from preprocess.unwrap import erode, layout_cache, projected_face_region, uv_gt_from_images


@pytest.fixture(scope="module")
def world():
    model = build_procedural_model()
    cfg = SyntheticConfig(image_size=160, uv_size=96, occluder_prob=0.0, yaw_max_deg=45.0)
    faces = [generate(i, cfg, model) for i in range(3)]
    pose, a_id, a_exp = split_params(np.stack([f.params for f in faces]))
    verts = project_to_image(model.shape(a_id, a_exp), pose, cfg.image_size)
    return model, cfg, faces, verts


def _errors(model, faces, verts, erosion_frac):
    cfg = UVGTConfig(uv_size=faces[0].uv_true.shape[0], erosion_frac=erosion_frac)
    res = uv_gt_from_images(np.stack([f.image for f in faces]), verts, model, cfg, cache=layout_cache(model, cfg))
    truth = np.stack([f.uv_true for f in faces])
    return res, np.abs(res.uv - truth)[res.mask].mean() * 255


def test_true_parameters_reproduce_the_true_uv(world):
    model, _, faces, verts = world
    res, err = _errors(model, faces, verts, 0.03)
    # Measured 2.2/255 (bilinear resampling of freckle-scale detail between a 160 px image and a 96 px UV).
    assert err < 3.5
    visible = np.stack([f.uv_visible for f in faces])
    assert res.mask.sum() > 0.5 * visible.sum()
    assert (res.mask & ~visible).sum() < 0.02 * res.mask.sum()
    mouth = region_uv_mask(model, "mouth", faces[0].uv_true.shape[0])
    assert not res.mask[:, mouth].any()


def test_erosion_removes_edge_errors_of_perturbed_fits(world):
    model, _, faces, verts = world
    shifted = verts + np.array([3.0, -2.0, 0.0], np.float32)  # a fit that is off by a few pixels
    _, err_raw = _errors(model, faces, shifted, 0.0)
    res, err_eroded = _errors(model, faces, shifted, 0.05)
    # Measured ~15/255 without erosion and ~11/255 with a 5% erosion on a 192 px probe.
    assert err_eroded < 0.85 * err_raw
    assert res.eroded.sum() < res.face_mask.sum()


def test_grazing_cut_and_bad_input(world):
    model, _, faces, verts = world
    img = faces[0].image[None]
    wide = uv_gt_from_images(img, verts[:1], model, UVGTConfig(uv_size=64, max_view_angle_deg=None))
    narrow = uv_gt_from_images(img, verts[:1], model, UVGTConfig(uv_size=64, max_view_angle_deg=45.0))
    assert narrow.mask.sum() < wide.mask.sum()
    assert not (narrow.mask & ~wide.mask).any()
    with pytest.raises(ValueError, match="NaN"):
        uv_gt_from_images(img, np.full_like(verts[:1], np.nan), model, UVGTConfig(uv_size=32))
    with pytest.raises(ValueError, match="verts_px: expected"):
        uv_gt_from_images(img, verts[:1, :10], model, UVGTConfig(uv_size=32))


def test_projected_face_region_is_the_unsegmented_face_mask(world):
    """``uvprep upgrade`` rebuilds face_region with projected_face_region: the same pixels as UV_gt's face mask
    without a segmentation, which the synthetic world's exact face mask matches up to anti-aliased edges."""
    model, cfg, faces, verts = world
    res = uv_gt_from_images(np.stack([f.image for f in faces]), verts, model, UVGTConfig(uv_size=32))
    region = projected_face_region(verts, model, cfg.image_size)
    assert region.shape == (3, 160, 160) and np.array_equal(region, res.face_mask)
    truth = np.stack([f.face_mask for f in faces])  # no occluders in this world
    assert (region & truth).sum() / (region | truth).sum() > 0.95
    with pytest.raises(ValueError, match="verts_px: expected"):
        projected_face_region(verts[:, :10], model, 160)


def test_erode_disc():
    m = np.zeros((21, 21), bool)
    m[5:16, 5:16] = True
    assert erode(m, 2).sum() == 7 * 7
    assert erode(m, 0).sum() == 121


def test_reused_rasterisation_gives_the_same_uv_gt_and_occluders(world):
    """The build rasterises the fitted meshes once for the occlusion and UV_gt stages (issue 21)."""
    from preprocess.occlusion import occluders_from_fit
    from preprocess.unwrap import rasterize_fitted

    model, cfg, faces, verts = world
    images = np.stack([f.image for f in faces])
    uvgt = UVGTConfig(uv_size=64)
    frags = rasterize_fitted(verts, model, cfg.image_size)
    own, reused = (uv_gt_from_images(images, verts, model, uvgt, fragments=f) for f in (None, frags))
    for name in ("uv", "mask", "face_mask", "eroded"):
        np.testing.assert_array_equal(getattr(own, name), getattr(reused, name), err_msg=name)
    np.testing.assert_array_equal(occluders_from_fit(images, verts, model, uvgt),
                                  occluders_from_fit(images, verts, model, uvgt, fragments=frags))
    with pytest.raises(ValueError, match="fragments"):
        uv_gt_from_images(images[:2], verts[:2], model, uvgt, fragments=frags)
