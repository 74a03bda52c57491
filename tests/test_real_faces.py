"""Real photos end to end: FaceBoxes + 3DDFA_V2 on the public dense BFM, UV_gt, Eq. 8, Eq. 9 and the crops.

Needs ``../shared/assets`` (3DDFA / 3DDFA_V2 files and the example photos); skips with the reason otherwise.

Texture basis: a basis learned from the synthetic world lives in the procedural model's UV layout, not the
BFM's, so it cannot be used here. The tests learn a tiny masked-PCA basis (K = 2, with mirrors) from the
UV_gt of the two test photos themselves: enough to exercise Eq. 8 / Eq. 9 on real data, not a useful
texture model (UV_bfm of one face shows traces of the other, e.g. the glasses).

Measured (U = 128, S = 256, ``mb05_120x120.pth``; the row after each name is what the tests assert):

* JianzhuGuo.jpg: yaw -0.2; face-region coverage 0.64 (left half 0.64, right 0.64); centre crop valid.
* emma.jpg, middle panel (profile looking to the image's left): yaw +56; coverage 0.45 (left/near half 0.86,
  right/far half 0.04); side crop valid.
* Dense keypoints vs the sparse 68-landmark model (same parameters, 3DDFA_V2's own projection path): 3e-5 px
  in the working image; vs the landmarks regressed on the full photo: 0.4 % / 0.4 % of the face-box size.
* UV_bl - UV_gt on observed texels (the harmonic Poisson correction): mean 10.5 / 3.4 (1/255); 8+ texels
  inside Omega still 10.5 / 2.9. On the frontal face Omega is nearly the whole face, and the correction is an
  almost constant shift (mean signed +13.5 / +9.9 / +7.2 in R / G / B) set by how far UV_bfm's rim is from
  the photo's (mean |UV_bfm - UV_gt| on Omega's boundary ring 18 / 14 / 11): the tiny 2-face basis fits the
  rim poorly, and Eq. 9 carries that mismatch over the whole observed face.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import SHARED_ASSETS, asset_path

from common.config import FitConfig
from common.faces.assets import TDDFAAssets
from common.faces.fit import mesh_in_image
from common.faces.tddfa import TDDFARegressor
from common.imageio import read_image, to_uint8
from common.loaders import load_param_stats
from common.uvtools import region_uv_mask
from preprocess.blend import SOURCE_MIRRORED, SOURCE_OBSERVED, blend_uv, symmetric_fill
from preprocess.config import BlendConfig, MaskedPCAConfig, StageConfig, UVGTConfig
from preprocess.shading import uv_normals
from preprocess.sources import SampleInput
from preprocess.stages import StageContext, Timer, run_geometry, run_stages
from preprocess.texture import learn_masked_pca, ridge_texture_fit

U, S = 128, 256
NAMES = ("JianzhuGuo", "emma_profile")


def _photos() -> dict[str, np.ndarray]:
    emma = read_image(asset_path("faces", "emma.jpg"))  # a collage of three photos side by side
    w = emma.shape[1] // 3
    return {"JianzhuGuo": read_image(asset_path("faces", "JianzhuGuo.jpg")),
            "emma_profile": np.ascontiguousarray(emma[:, w:2 * w])}


@pytest.fixture(scope="module")
def real():
    """Fit, unwrap, learn a 2-component basis from the two photos, then the whole stage chain."""
    v1, v2 = asset_path("3ddfa_v1"), asset_path("3ddfa_v2")
    files = TDDFAAssets.from_dir(v2)
    fit = FitConfig(fitter="tddfa", image_size=S, tddfa_weights=asset_path(files.mb05),
                    param_stats=asset_path(files.param_stats), detector_weights=asset_path(files.detector))
    cfg = StageConfig(face_model="bfm-public", bfm_v1_dir=v1, bfm_v2_dir=v2, fit=fit, uvgt=UVGTConfig(uv_size=U))
    ctx = StageContext.build(cfg)
    photos = _photos()
    inputs = [SampleInput(index=i, key=k, image=img) for i, (k, img) in enumerate(photos.items())]
    geo = run_geometry(inputs, ctx, Timer())
    valid = ctx.uv_cache.uv_frags.tri_id[0].numpy() >= 0
    ctx.basis = learn_masked_pca(geo.uv_gt, geo.uv_gt_mask, valid, MaskedPCAConfig(n_components=2, fit_size=64),
                                 mirror_index=ctx.mirror_index, name="pca:test-photos")
    arrays, errors = run_stages(inputs, ctx)
    return {"ctx": ctx, "geo": geo, "arrays": arrays, "errors": errors, "photos": photos, "inputs": inputs}


def test_fits_succeed_with_plausible_yaw(real):
    a = real["arrays"]
    assert real["errors"] == [] and a["status"].tolist() == [1, 1], a["reason"]
    yaw = a["pose"][:, 0]
    assert abs(yaw[0]) < 10  # frontal (measured -0.2)
    assert yaw[1] > 40  # looks towards the image's left: the face's left cheek is seen, positive yaw (measured 56)


def test_dense_keypoints_agree_with_sparse_landmark_model(real):
    """The dense model's 68 keypoint vertices, projected with the fitted image-frame parameters, against the
    exact sparse landmark bases projected by 3DDFA_V2's own path (ROI crop frame -> photo)."""
    ctx, a = real["ctx"], real["arrays"]
    reg = TDDFARegressor.from_paths(ctx.config.fit.tddfa_weights, ctx.config.fit.param_stats,
                                    asset_path("3ddfa_v1", "c++", "weights"))
    dense = mesh_in_image(ctx.model, a["params"], S)[:, ctx.model.keypoints, :2]
    det = ctx.fitter._nets(need_detector=True)[0]
    for k, name in enumerate(NAMES):
        res = ctx.fitter.fit_photo(real["photos"][name], aligned=False)
        # same working crop and box: the sparse model through the ROI frame must land on the dense keypoints
        lm = reg.landmarks(*reg.predict(res.image, res.box[None]))[0, :, :2]
        assert np.abs(lm - dense[k]).max() < 0.01, name  # measured 3e-5 px
        # the whole photo: regress on the detection there, map the dense keypoints back through the crop
        photo = real["photos"][name]
        b = det.detect(photo, select="largest").boxes[0, :4]
        scale = (res.box[2] - res.box[0]) / (b[2] - b[0])
        lm_photo = reg.landmarks(*reg.predict(photo, b[None]))[0, :, :2]
        dense_photo = b[:2] + (dense[k] - res.box[:2]) / scale
        err = np.linalg.norm(lm_photo - dense_photo, axis=1).mean() / np.sqrt(np.prod(b[2:] - b[:2]))
        assert err < 0.02, (name, err)  # measured 0.004 / 0.004 of the face-box size (resampling, not frames)


def test_uv_gt_coverage_frontal_vs_profile(real):
    model, mask = real["ctx"].model, real["arrays"]["uv_gt_mask"]
    face = region_uv_mask(model, "face", U)
    left, right = region_uv_mask(model, "left", U) & face, region_uv_mask(model, "right", U) & face

    def cov(k, region):
        return (mask[k] & region).sum() / region.sum()

    assert 0.5 < cov(0, face) < 0.8  # measured 0.64
    assert 0.8 < cov(0, left) / cov(0, right) < 1.25  # frontal: both halves alike (measured 1.00)
    assert cov(1, face) < cov(0, face) - 0.1  # measured 0.45
    assert cov(1, left) > 0.7 and cov(1, right) < 0.15  # near / far half of the profile (measured 0.86 / 0.04)
    # UV upright, not mirrored: the profile's observed texels lie right of the centre column (u > 0.5 = face's left)
    cols = np.nonzero(mask[1])[1]
    assert np.median(cols) > 0.6 * U


def test_uv_bl_is_uv_gt_plus_a_harmonic_correction(real):
    """Default (fill) mode keeps the photo texels exactly. The paper's paste mode: UV_bl is finite and in [0, 1];
    on Omega (observed + mirrored) it differs from the filled UV_gt by a harmonic correction (discrete Laplacian
    ~ 0 inside Omega, extremes on its boundary: maximum principle)."""
    ctx, geo, a = real["ctx"], real["geo"], real["arrays"]
    coeff = ridge_texture_fit(geo.uv_gt, geo.uv_gt_mask, ctx.basis, lam=ctx.config.ridge_lambda)
    uv_bfm = np.clip(ctx.basis.synthesize(coeff), 0, 1)
    normals = uv_normals(ctx.model, geo.params, ctx.uv_cache.uv_frags)
    nose = region_uv_mask(ctx.model, "nose", U, ctx.uv_cache.uv_frags)
    for k in range(len(NAMES)):
        build, src = blend_uv(geo.uv_gt[k], geo.uv_gt_mask[k], uv_bfm[k], face_mask=ctx.basis.valid,
                              mirror_index=ctx.mirror_index, config=BlendConfig(solver="direct"), normals=normals[k],
                              nose_mask=nose)
        assert np.abs(to_uint8(build).astype(int) - a["uv_bl"][k]).max() <= 2  # the build's (default) multigrid solve
        np.testing.assert_array_equal(src, a["uv_source"][k])
        filled, omega, _ = symmetric_fill(geo.uv_gt[k], geo.uv_gt_mask[k], ctx.mirror_index, ctx.basis.valid)
        kept, _ = blend_uv(geo.uv_gt[k], geo.uv_gt_mask[k], uv_bfm[k], face_mask=ctx.basis.valid,
                           mirror_index=ctx.mirror_index, config=BlendConfig.paper_mirror(solver="direct"))
        np.testing.assert_allclose(kept[omega], np.clip(filled[omega], 0, 1), atol=1e-6)  # fill keeps the photo
        bl, _ = blend_uv(geo.uv_gt[k], geo.uv_gt_mask[k], uv_bfm[k], face_mask=ctx.basis.valid,
                         mirror_index=ctx.mirror_index, config=BlendConfig.paper_mirror(solver="direct", mode="paste"))
        assert np.isfinite(bl).all() and bl.min() >= 0 and bl.max() <= 1
        g = (bl - filled) * omega[..., None]
        lap = 4 * g - cv2.filter2D(g, -1, np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32),
                                   borderType=cv2.BORDER_CONSTANT)
        interior = cv2.erode(omega.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        unclipped = cv2.erode(((bl > 0) & (bl < 1)).all(-1).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert np.abs(lap[interior & unclipped]).max() < 1e-4  # away from texels clipped to [0, 1]
        ring = omega & ~interior
        assert np.abs(g[interior]).max() <= np.abs(g[ring]).max() + 1e-6
        obs = src == SOURCE_OBSERVED
        diff = np.abs(bl - geo.uv_gt[k])[obs].mean() * 255
        deep = obs & cv2.erode(omega.astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool)
        diff_deep = np.abs(bl - geo.uv_gt[k])[deep].mean() * 255
        assert diff < 16 and diff_deep < 16
    assert (a["uv_source"][1] == SOURCE_MIRRORED).mean() > 0.2  # the profile's far half comes from the mirror


def test_partial_crops_follow_the_pose(real):
    a = real["arrays"]
    assert a["ctr_valid"].tolist() == [True, False]
    assert a["sd_valid"].tolist() == [False, True]
    layout = real["ctx"].crop_layout
    assert a["uv_ctr_mask"][0].sum() >= 0.6 * layout.ctr_region.sum()  # CropConfig.min_coverage
    assert a["uv_sd_mask"][1].sum() >= 0.6 * layout.sd_region.sum()


def test_fitted_shape_coefficients_are_within_the_regressor_statistics(real):
    mean, std = load_param_stats(asset_path(TDDFAAssets.from_dir(SHARED_ASSETS / "3ddfa_v2").param_stats))
    z = np.abs(real["arrays"]["params"][:, 12:] - mean[12:]) / std[12:]
    assert np.isfinite(z).all() and z.max() < 5  # measured max 2.6 standard deviations
