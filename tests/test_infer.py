"""``uvtrain infer``: UV maps equal the networks' output on the same crops, meshes load in trimesh with their
texture, the views, bad photos recorded in failures.csv, one-line CLI errors. A tiny run trained in the test."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.faces.assets import TDDFAAssets
from common.geometry import split_params
from common.imageio import read_image, write_png
from common.store import StoreReader
from train.bundle import BUNDLE_DIR, read_bundle
from train.cli import app
from train.config import InferConfig
from train.infer import infer
from train.runs import RunError, load_trained, predict_uv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


@pytest.fixture(scope="module")
def photos(train_store, tmp_path_factory):
    """Three store images as PNG files with their parameters, a broken file and a face-less grey image."""
    d = tmp_path_factory.mktemp("photos")
    r = StoreReader(train_store)
    keys, params = [], []
    for i in (0, 1, 2):
        s = r.sample(i)
        write_png(d / f"face{i}.png", s["image"])
        keys.append(f"face{i}.png")
        params.append(s["params"])
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    write_png(d / "blank.png", np.full((80, 80, 3), 128, np.uint8))
    np.savez(d.parent / "params.npz", keys=np.array(keys), params=np.stack(params))
    return d


def test_bundle_lets_inference_run_without_the_store(trained, train_store):
    b = read_bundle(trained)
    r = StoreReader(train_store)
    assert (trained / BUNDLE_DIR / "info.json").is_file()
    assert b.face_model.fingerprint() == r.face_model().fingerprint()
    assert (b.uv_size, b.image_size) == (r.layout.uv_size, r.layout.image_size)
    assert b.fit["fitter"] == "given"


def test_infer_writes_textures_meshes_views_and_failures(trained, photos, train_store, tmp_path):
    out = tmp_path / "out"
    sm = infer(InferConfig(checkpoint=trained, images=photos, out=out, params=photos.parent / "params.npz",
                           batch_size=2, view_size=48, progress=False))
    assert (sm.photos, sm.written, sm.meshes, sm.fitter) == (5, 3, 3, "given")
    with open(out / "failures.csv") as f:
        rows = {r["photo"]: r["reason"] for r in csv.DictReader(f)}
    assert rows == {"broken.jpg": "not_an_image", "blank.png": "no_params"}  # uvprep build's reasons
    # The UV map is the networks' output on the stored image (the given fitter keeps a working-size photo as is).
    cfg, sampler, generator, _ = load_trained(trained)
    r = StoreReader(train_store)
    x = torch.from_numpy(r.sample(1)["image"]).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True)
    want = predict_uv(sampler, generator, x, r.layout.uv_size)[1][0].clamp(0, 1).permute(1, 2, 0).numpy()
    got = read_image(out / "face1_uv.png").astype(np.float32) / 255
    assert got.shape == (r.layout.uv_size, r.layout.uv_size, 3)
    assert np.abs(got - want).max() <= 1.01 / 255
    views = read_image(out / "face1_views.png")
    assert views.shape[1] >= 6 * 48  # the photo + 5 yaw angles


def test_obj_loads_in_trimesh_with_its_texture(trained, photos, train_store, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    out = tmp_path / "out"
    infer(InferConfig(checkpoint=trained, images=photos / "face2.png", out=out, params=photos.parent / "params.npz",
                      progress=False))
    model = StoreReader(train_store).face_model()
    mesh = trimesh.load(out / "face2.obj", process=False)  # trimesh drops vertices no triangle uses
    used = np.unique(model.triangles).size
    assert mesh.vertices.shape == (used, 3) and mesh.faces.shape == (model.n_triangles, 3)
    _, a_id, a_exp = split_params(StoreReader(train_store).sample(2)["params"][None])
    verts = model.shape(a_id, a_exp)[0]
    np.testing.assert_allclose(mesh.vertices[mesh.faces], verts[model.triangles], atol=1e-5)
    np.testing.assert_allclose(mesh.visual.uv[mesh.faces], model.uv[model.triangles], atol=1e-6)
    tex = mesh.visual.material.image
    u = StoreReader(train_store).layout.uv_size
    assert tex.size == (u, u)
    np.testing.assert_array_equal(np.asarray(tex.convert("RGB")), read_image(out / "face2_uv.png"))


def test_no_fitter_writes_textures_only_and_detects_faces(trained, photos, tmp_path):
    """Without parameters or 3DDFA weights: FaceBoxes frames the photos, no meshes; the blank image has no face.
    --framing none takes every readable photo as its own frame."""
    from tests.conftest import SHARED_ASSETS, asset_path

    boxes = asset_path(TDDFAAssets.from_dir(SHARED_ASSETS / "3ddfa_v2").detector)
    out = tmp_path / "out"
    sm = infer(InferConfig(checkpoint=trained, images=photos, out=out, detector_weights=boxes, progress=False))
    assert sm.fitter == "none" and sm.detector == "FaceBoxes" and sm.meshes == 0 and not list(out.glob("*.obj"))
    reasons = {p: r for p, r, _ in sm.failures}
    assert reasons["broken.jpg"] == "not_an_image" and reasons["blank.png"] == "no_face"
    assert sm.written == sm.photos - len(sm.failures)
    sm = infer(InferConfig(checkpoint=trained, images=photos, out=tmp_path / "out2", framing="none",
                           progress=False))
    assert sm.written == 4 and sm.meshes == 0


def test_no_detector_is_a_clear_error(trained, photos, tmp_path):
    from common.faces.detect import HaarDetector

    if HaarDetector().available():
        pytest.skip("this OpenCV build ships the Haar cascade, the fallback detector")
    with pytest.raises(RunError, match="no face detector: pass --detector-weights"):
        infer(InferConfig(checkpoint=trained, images=photos, out=tmp_path / "o", progress=False))


def test_infer_errors(trained, photos, tmp_path):
    with pytest.raises(RunError, match="not a uvtrain run directory"):
        infer(InferConfig(checkpoint=tmp_path, images=photos, out=tmp_path / "o", progress=False))
    with pytest.raises(RunError, match="no such file or folder"):
        infer(InferConfig(checkpoint=trained, images=tmp_path / "none", out=tmp_path / "o", progress=False))
    with pytest.raises(ValueError, match="--framing"):
        InferConfig(checkpoint=trained, images=photos, out=tmp_path, framing="guess")
    with pytest.raises(ValueError, match="--fitter given needs --params"):
        InferConfig(checkpoint=trained, images=photos, out=tmp_path, fitter="given")
    cfg = InferConfig(checkpoint=trained, images=photos, out=tmp_path / "o", fitter="tddfa", progress=False)
    with pytest.raises(RunError, match="3DDFA_V2 weights"):
        infer(dataclasses.replace(cfg))


def test_cli_infer_and_one_line_errors(trained, photos, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["infer", "--checkpoint", str(trained / "checkpoint.pt"), "--images",
                              str(photos / "face0.png"), "--out", str(tmp_path / "o"), "--params",
                              str(photos.parent / "params.npz"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "face0.obj").is_file()
    res = runner.invoke(app, ["infer", "--checkpoint", str(tmp_path / "nope"), "--images", str(photos),
                              "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output


@pytest.fixture(scope="module")
def bfm_run(tmp_path_factory):
    """A run trained for a few steps on a store of the four AFLW2000-3D samples (the public BFM, their official
    fits): a run whose face model 3DDFA_V2 can fit."""
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs
    from tests.conftest import asset_path
    from tests.test_train import tiny
    from train.config import RunOptions
    from train.loop import fit

    a = asset_path("aflw2000").parent
    asset_path("3ddfa_v1", "train.configs")
    if TDDFAAssets.from_dir(asset_path("3ddfa_v2")).regressor is None:
        pytest.skip(f"needs {a / '3ddfa_v2'}/weights/mb1_120x120.pth or mb05_120x120.pth")
    d = tmp_path_factory.mktemp("bfm")
    cfg, run = make_config(BuildArgs(out=d / "aflw.zarr", src="aflw2000", images=a / "aflw2000", image_size=128,
                                     uv_size=64, chunk=4, pca_samples=4, n_tex=4, bfm_v1_dir=a / "3ddfa_v1",
                                     bfm_v2_dir=a / "3ddfa_v2", frontal_yaw=30.0))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    assert summary.ok == 4, summary
    train = tiny(str(d / "aflw.zarr"), sampler_steps=1, sampler_finetune_steps=0, generator_steps=1, image_size=64)
    fit(train, RunOptions(run_dir=d / "run", progress=False, tensorboard=False, checkpoint_every=1000))
    return d / "run", a


def test_real_photos_get_meshes_through_3ddfa(bfm_run, tmp_path):
    """--bfm-v2-dir on a BFM run: FaceBoxes frames, 3DDFA_V2 fits, every face gets a mesh and views."""
    trimesh = pytest.importorskip("trimesh")
    run_dir, a = bfm_run
    out = tmp_path / "out"
    sm = infer(InferConfig(checkpoint=run_dir, images=a / "faces", out=out, bfm_v2_dir=a / "3ddfa_v2",
                           view_size=64, progress=False))
    assert (sm.fitter, sm.detector) == ("tddfa", "FaceBoxes")
    assert sm.photos == 3 and sm.meshes == 3 and not sm.failures
    mesh = trimesh.load(out / "emma.obj", process=False)
    assert mesh.visual.uv is not None and mesh.visual.material.image.size == (64, 64)
    ext = mesh.vertices.max(0) - mesh.vertices.min(0)  # in the face model's units (BFM: micrometres)
    mean = read_bundle(run_dir).face_model.mean_shape
    ratio = ext / (mean.max(0) - mean.min(0))
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio  # a plausible face of this model, not a blown-up fit

