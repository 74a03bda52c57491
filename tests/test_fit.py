"""The shape-fitting stage: parameter frames, the 'given' fitter, failures, and tddfa on real photos."""

import numpy as np
import pytest

from common.geometry import make_pose, project_to_image
from preprocess.fit import FitConfig, ShapeFitter, crop_params_to_image, mesh_in_image
from preprocess.tddfa import params_to_image_vertices


def test_crop_params_to_image_matches_3ddfa_similar_transform():
    rng = np.random.default_rng(0)
    pose = make_pose([1.2e-3, 0.9e-3], [0.3, -0.7], [0.1, 0.0], [0.05, -0.1], [[60, 62, 10], [55, 70, -5]])
    params = np.zeros((2, 62), np.float32)
    params[:, :12] = pose.reshape(2, 12)
    verts = rng.normal(scale=6e4, size=(2, 50, 3)).astype(np.float32)
    rois = np.array([[10.5, 20.0, 110.5, 120.0], [-30.0, 5.0, 170.0, 205.0]], np.float32)
    expected = params_to_image_vertices(params, rois, verts)
    image_params = crop_params_to_image(params, rois, frame_size=256.0)
    got = project_to_image(verts, image_params[:, :12].reshape(2, 3, 4), 256.0)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


@pytest.fixture(scope="module")
def procedural():
    from common.procedural import build_procedural_model

    return build_procedural_model()


def test_given_fitter_puts_the_mesh_on_the_synthetic_face(procedural):
    from common.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(image_size=96, uv_size=64, occluder_prob=0.0)
    face = generate(1, cfg, procedural)
    fitter = ShapeFitter(procedural, FitConfig(fitter="given", image_size=96))
    res = fitter.fit_given(face.image, face.params)
    assert res.ok and res.image.shape == (96, 96, 3)
    np.testing.assert_allclose(res.verts_px, mesh_in_image(procedural, face.params[None], 96)[0], atol=1e-5)
    # the projected face-region vertices land on face pixels
    xy = np.floor(res.verts_px[procedural.regions["face"], :2]).astype(int).clip(0, 95)
    assert face.face_mask[xy[:, 1], xy[:, 0]].mean() > 0.5
    assert abs(res.pose[0]) <= cfg.yaw_max_deg + 1e-3


def test_given_fitter_reports_bad_parameters(procedural):
    fitter = ShapeFitter(procedural, FitConfig(fitter="given", image_size=64))
    img = np.zeros((64, 64, 3), np.uint8)
    bad = np.full(62, np.nan, np.float32)
    assert fitter.fit_given(img, bad).reason == "nan"
    far = np.zeros(62, np.float32)
    far[:12] = make_pose(20.0, 0, 0, 0, [[5000, 5000, 0]]).reshape(12)
    assert fitter.fit_given(img, far).reason == "fit_diverged"
    with pytest.raises(ValueError, match="tddfa"):
        ShapeFitter(procedural, FitConfig(fitter="tddfa"))
    with pytest.raises(ValueError, match="unknown fitter"):
        ShapeFitter(procedural, FitConfig(fitter="magic"))
