"""The shape-fitting stage: parameter frames, the 'given' fitter, failures, and tddfa on real photos."""

import numpy as np
import pytest

from common.config import FitConfig
from common.faces.fit import ShapeFitter, crop_params_to_image, mesh_in_image
from common.faces.tddfa import params_to_image_vertices
from common.geometry import make_pose, project_to_image, split_params


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


def test_reframe_params_maps_the_mesh_into_the_crop():
    rng = np.random.default_rng(3)
    params = np.zeros((1, 62), np.float32)
    params[0, :12] = make_pose(1.5, 0.4, -0.1, 0.2, [[200, 150, 7]]).reshape(12)
    verts = rng.normal(scale=30, size=(1, 40, 3)).astype(np.float32)
    photo = project_to_image(verts, params[:, :12].reshape(1, 3, 4), 300.0)
    origin, side, size = np.array([120.0, 60.0]), 180.0, 96
    from common.faces.fit import reframe_params

    crop = project_to_image(verts, reframe_params(params, 300.0, origin, side, size)[:, :12].reshape(1, 3, 4), size)
    k = size / side
    np.testing.assert_allclose(crop[..., :2], k * (photo[..., :2] - origin), atol=1e-3)
    np.testing.assert_allclose(crop[..., 2], k * photo[..., 2], rtol=1e-5, atol=1e-4)


def test_aflw2000_annotations_reproduce_the_official_landmarks(assets):
    """The converted parameters with the public sparse 68-landmark basis land on pt3d_68 (measured 0.86-1.74 px
    mean on 450 px photos; the rest is the truncation of 199/29 coefficients to 40/10)."""
    import scipy.io as sio

    from common.faces.fit import aflw2000_params
    from common.faces.tddfa import SparseLandmarkModel

    sparse = SparseLandmarkModel.from_dir(assets("3ddfa_v1", "c++", "weights"))
    folder = assets("aflw2000")
    errors = []
    for mat_path in sorted(folder.glob("*.mat")):
        mat = sio.loadmat(str(mat_path))
        params = aflw2000_params(mat["Pose_Para"], mat["Shape_Para"], mat["Exp_Para"], 450)[None]
        pose, a_id, a_exp = split_params(params)
        lm = project_to_image(sparse.shape(a_id, a_exp), pose, 450.0)[0, :, :2]
        truth = mat["pt3d_68"][:2].T - 0.5  # 1-based centres -> pixel edges
        errors.append(np.linalg.norm(lm - truth, axis=1).mean())
    assert len(errors) == 4 and max(errors) < 2.5, errors


def test_given_fitter_crops_photos_of_another_size(assets):
    """AFLW2000 photos (450 px) with their annotations through the `given` fitter at 128 px: the dense model's
    68 keypoints land on the official landmarks mapped into the crop."""
    from common.loaders import load_tddfa_dense_public
    from preprocess.sources import AFLW2000Source

    model = load_tddfa_dense_public(assets("3ddfa_v1"), assets("3ddfa_v2"))
    src = AFLW2000Source(str(assets("aflw2000")))
    man = src.manifest()
    fitter = ShapeFitter(model, FitConfig(fitter="given", image_size=128))
    for i in range(len(man)):
        sample = src.load(i, man)
        res = fitter.fit_given(sample.image, sample.given_params)
        assert res.ok and res.image.shape == (128, 128, 3)
        photo = mesh_in_image(model, sample.given_params[None], sample.image.shape[0])[0, :, :2]
        crop = res.verts_px[:, :2]
        # the crop is a scaled, shifted copy of the photo frame: fit x' = a x + b per axis
        a = np.polyfit(photo[:, 0], crop[:, 0], 1)
        b = np.polyfit(photo[:, 1], crop[:, 1], 1)
        assert abs(a[0] - b[0]) < 1e-4 and np.abs(np.polyval(a, photo[:, 0]) - crop[:, 0]).max() < 1e-2
        truth = np.stack([np.polyval(a, sample.landmarks[:, 0]), np.polyval(b, sample.landmarks[:, 1])], 1)
        kp = crop[model.keypoints]
        size = np.sqrt(np.prod(truth.max(0) - truth.min(0)))
        assert np.linalg.norm(kp - truth, axis=1).mean() / size < 0.03


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_folder_photos_with_a_parameter_file_build_with_the_given_fitter(procedural, tmp_path, fmt):
    """User photos + known parameters (NPZ or CSV) through `uvprep build --fitter given`: photos of another size
    than the working one are cropped and re-framed; a photo missing from the file fails with bad_annotation."""
    from common.imageio import write_png
    from common.store import StoreReader
    from common.synthetic import SyntheticConfig, generate
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    photos = tmp_path / "photos"
    faces = [generate(i, SyntheticConfig(image_size=120, uv_size=32, occluder_prob=0.0), procedural) for i in range(3)]
    for i, f in enumerate(faces):
        write_png(photos / f"{i}.png", f.image)
    keys, params = ["0.png", "1.png"], np.stack([faces[0].params, faces[1].params])  # 2.png has no entry
    if fmt == "npz":
        pfile = tmp_path / "params.npz"
        np.savez(pfile, keys=np.array(keys), params=params)
    else:
        pfile = tmp_path / "params.csv"
        lines = ["key," + ",".join(f"p{j}" for j in range(62))]
        lines += [k + "," + ",".join(repr(float(v)) for v in p) for k, p in zip(keys, params, strict=True)]
        pfile.write_text("\n".join(lines))
    args = BuildArgs(out=tmp_path / "s.zarr", src="folder", images=photos, params=pfile, face_model="procedural",
                     image_size=96, uv_size=32, chunk=4, texture_model="model", workers=0)
    cfg, run = make_config(args)
    assert cfg.stages.fit.fitter == "given"
    summary = build_store(cfg, run)
    assert summary.ok == 2 and summary.failed == {"bad_annotation": 1}
    r = StoreReader(tmp_path / "s.zarr")
    s0 = r.sample(0)
    # the stored parameters put the face-region vertices on face-coloured (not background) pixels of the crop
    verts = mesh_in_image(procedural, s0["params"][None], 96)[0]
    inside = ((verts[:, :2] >= 0) & (verts[:, :2] < 96)).all(1)
    assert inside.mean() > 0.99
    assert s0["uv_gt_mask"].mean() > 0.1


def _toy_landmark_model(seed: int = 0):
    """A random 68-landmark model (mean in [-1, 1]^3, bases of 0.05 per unit coefficient) and unit statistics."""
    from common.faces.tddfa import SparseLandmarkModel

    rng = np.random.default_rng(seed)
    model = SparseLandmarkModel(mean=rng.uniform(-1, 1, (68, 3)).astype(np.float32),
                                id_basis=rng.normal(0, 0.05, (68, 3, 40)).astype(np.float32),
                                exp_basis=rng.normal(0, 0.05, (68, 3, 10)).astype(np.float32))
    return model, np.zeros(62, np.float32), np.ones(62, np.float32), rng


def _toy_landmarks(model, params, frame):
    pose, a_id, a_exp = split_params(np.asarray(params, np.float32).reshape(-1, 62))
    return project_to_image(model.shape(a_id, a_exp), pose, float(frame))[..., :2]


def _toy_params(yaw_deg, scale, t, coeffs):
    p = np.zeros((1, 62), np.float32)
    p[0, :12] = make_pose(scale, np.radians(yaw_deg), 0.1, -0.05, np.array([t[0], t[1], 0.0])).reshape(12)
    p[0, 12:] = coeffs
    return p


def test_refinement_recovers_exact_landmarks_from_a_perturbed_fit():
    from common.faces.refine import RefineConfig, refine_to_landmarks

    model, mean, std, rng = _toy_landmark_model()
    truth = _toy_params(12.0, 40.0, (64, 60), rng.normal(0, 0.5, 50))
    start = _toy_params(18.0, 43.0, (66, 57), 0.0)
    targets = _toy_landmarks(model, truth, 128)
    weak_prior = RefineConfig(prior="stats", prior_weight=1e-6, contour_weight=1.0, robust=0.0, iterations=50)
    r = refine_to_landmarks(start, targets, model, 128, mean, std, weak_prior)
    assert r.applied.tolist() == [True] and r.rms_before[0] > 3.0 and r.rms_after[0] < 0.05, r
    np.testing.assert_allclose(_toy_landmarks(model, r.params, 128), targets, atol=0.2)
    pose_only = refine_to_landmarks(start, targets, model, 128, mean, std, RefineConfig(prior="none"))
    assert r.rms_after[0] < pose_only.rms_after[0] < pose_only.rms_before[0]
    np.testing.assert_array_equal(pose_only.params[0, 12:], start[0, 12:])  # no prior: coefficients kept


def test_refinement_ignores_an_outlying_landmark_and_skips_profiles_and_failed_detections():
    from common.faces.refine import RefineConfig, refine_to_landmarks

    model, mean, std, rng = _toy_landmark_model(1)
    truth = _toy_params(5.0, 40.0, (64, 64), 0.0)
    start = _toy_params(8.0, 41.0, (65, 63), 0.0)
    targets = _toy_landmarks(model, truth, 128)
    bad = targets.copy()
    bad[0, 30] += 25.0  # the nose tip off by 25 px (a detector failure on one point)
    kept = np.setdiff1d(np.arange(17, 68), [30])
    errs = {}
    for robust in (0.0, 2.0):
        r = refine_to_landmarks(start, bad, model, 128, mean, std, RefineConfig(prior="none", robust=robust))
        errs[robust] = np.abs(_toy_landmarks(model, r.params, 128)[0, kept] - targets[0, kept]).max()
    assert errs[2.0] < 0.5 < errs[0.0], errs
    profile = _toy_params(60.0, 40.0, (64, 64), 0.0)
    r = refine_to_landmarks(profile, _toy_landmarks(model, profile, 128) + 2.0, model, 128, mean, std)
    np.testing.assert_array_equal(r.params, profile)
    assert not r.applied[0]
    far = targets + 40.0  # the detector found another face
    assert not refine_to_landmarks(start, far, model, 128, mean, std).applied[0]
    with pytest.raises(ValueError, match="68, 2"):
        refine_to_landmarks(start, targets[:, :51], model, 128, mean, std)
