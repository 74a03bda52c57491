"""``uvprep build`` end to end: eager vs Dask, kill and resume, bad inputs, refusals, reader round trip, CLI.

Every store here is tiny (64 px images, 32² UV maps, 8 samples in chunks of 4) and every comparison is
bytewise: a store is a pure function of its recorded config, whatever ran it and however often it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr
from conftest import ROOT, asset_path
from typer.testing import CliRunner

from common.config import FitConfig
from common.store import (
    FAILED,
    OK,
    PENDING,
    Reason,
    StoreLocked,
    StoreMismatch,
    StoreReader,
    acquire_build_lock,
    array_specs,
    completed_chunks,
    manifest_specs,
    read_build_lock,
    read_texture_basis,
)
from preprocess.build import _learn_basis, build_store, prepass_batch
from preprocess.buildcli import make_config
from preprocess.cli import app
from preprocess.config import BuildArgs, BuildConfig, RunOptions, StageConfig, UVGTConfig
from preprocess.executor import Runner
from preprocess.progress import BuildProgress
from preprocess.sources import FolderSource
from preprocess.stages import build_face_model

# The reference build: 2 chunks of 4 samples (the same flags drive the in-process and the CLI builds).
SMALL = {"count": 8, "image_size": 64, "uv_size": 32, "chunk": 4, "pca_samples": 8, "n_tex": 4}


def _cli_flags(out: Path, **kw) -> list[str]:
    flags = {**SMALL, **kw}
    return ["build", "--out", str(out), *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


def _config(out: Path, workers: int = 0, overwrite: bool = False, **kw) -> tuple[BuildConfig, RunOptions]:
    cfg, run = make_config(BuildArgs(out=out, **{**SMALL, **kw}))
    return cfg, dataclasses.replace(run, workers=workers, overwrite=overwrite, progress=False)


def _build(out: Path, workers: int = 0, overwrite: bool = False, **kw):
    return build_store(*_config(out, workers, overwrite, **kw))


def _arrays(out: Path) -> dict[str, bytes]:
    """Every array of the store (texture basis included) as raw bytes; manifest keys joined as UTF-8."""
    group = zarr.open_group(str(out), mode="r")
    res = {}
    for prefix, g in (("", group), ("texture/", group["texture"])):
        for name, a in g.arrays():
            v = a[...]
            if name == "chunk_record":  # the data's SHA-256 only: the writer's generation token differs per run
                v = v[:, :32]
            res[prefix + name] = "\0".join(map(str, v)).encode() if v.dtype.kind in "OTU" else v.tobytes()
    return res


def _assert_same_arrays(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    differ = [k for k in x if x[k] != y[k]]
    assert not differ, f"arrays differ between {a.name} and {b.name}: {differ}"


def _files(out: Path) -> dict[str, str]:
    """sha256 of every file under the store folder (metadata and chunks)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The reference store: eager (workers=0), built once per module, never modified by the tests."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    summary = _build(out)
    assert summary.complete and summary.ok == SMALL["count"]
    return out


# ------------------------------------------------------------------------------------------ end to end
def test_eager_build_end_to_end(store):
    r = StoreReader(store)
    assert r.validate() == []
    assert len(r) == 8 and r.layout.n_chunks == 2 and r.layout.has_truth
    assert r.counts() == {"ok": 8, "failed": 0, "pending": 0, "failed_by_reason": {}, "chunks_done": 2,
                          "n_chunks": 2}
    specs = {**array_specs(r.layout), **manifest_specs(r.layout)}
    for name, spec in specs.items():
        a = r.group[name]
        assert tuple(a.shape) == spec.shape and tuple(a.chunks) == spec.chunks, name
        if name != "manifest_path":
            assert a.dtype == spec.dtype, name
    assert r.group["image"].shape == (8, 64, 64, 3) and r.group["uv_bl"].shape == (8, 32, 32, 3)
    assert r.group["tex_coeff"].shape == (8, 4)
    assert list(r.paths()) == [f"synthetic://0/{i}" for i in range(8)]

    # uv_true is the synthetic world's texture: identical to what the source generates for that sample
    cfg, _ = _config(store)
    truth = cfg.source.load_many([0, 7], cfg.source.manifest())
    b = r.batch([0, 7], ["uv_true", "image", "params"])
    for k, s in enumerate(truth):
        assert np.array_equal(b["uv_true"][k], s.truth["uv_true"])
        assert np.allclose(b["params"][k], s.given_params, atol=1e-5)
    assert b["uv_true"].max() > 0

    # the texture basis the chunks were fitted with is in the store, complete and finite
    t = read_texture_basis(store)
    assert t is not None and t["name"].startswith("pca:")
    assert t["mean"].shape == (32, 32, 3) and t["basis"].shape == (32, 32, 3, 4) and t["valid"].shape == (32, 32)
    assert np.isfinite(t["basis"]).all() and t["valid"].sum() > 100

    # OK samples: every stage wrote something
    ok = r.batch(np.arange(8), ["uv_gt_mask", "uv_bl", "tex_coeff", "face_region", "face_mask_eroded"])
    assert ok["uv_gt_mask"].reshape(8, -1).any(1).all() and ok["face_mask_eroded"].reshape(8, -1).any(1).all()
    assert np.isfinite(ok["tex_coeff"]).all() and (ok["uv_bl"].reshape(8, -1).max(1) > 0).all()
    # the eroded mask lies inside the face region, which is larger by the erosion ring (1 px at 64 px)
    assert not (ok["face_mask_eroded"] & ~ok["face_region"]).any()
    assert (ok["face_region"].sum((1, 2)) > 1.05 * ok["face_mask_eroded"].sum((1, 2))).all()
    assert r.attrs["face_region_source"] == "build: projected mesh & the source's segmentation"


def test_store_describes_itself(store):
    """The trainer renders and cuts crops from the store alone: the model, crop layout and mirror index it holds
    are exactly the build's."""
    from common.uvlayout import crop_layout
    from common.uvtools import texel_mirror_index

    r = StoreReader(store)
    cfg, _ = _config(store)
    model = build_face_model(cfg.stages)
    stored = r.face_model()
    assert stored.fingerprint() == model.fingerprint() == r.attrs["face_model_hash"]
    assert stored.name == model.name and np.array_equal(stored.keypoints, model.keypoints)
    assert all(np.array_equal(stored.regions[k], model.regions[k]) for k in model.regions)
    assert stored.meta["licence"] == model.meta["licence"] and "grid_ij" in r.group["model"].attrs["meta_omitted"]
    assert r.crop_layout().equals(crop_layout(model, 32, cfg.stages.crops))
    assert r.crop_config() == cfg.stages.crops
    assert np.array_equal(r.mirror_index(), texel_mirror_index(model, 32))
    basis = r.texture_basis()
    assert basis.n_components == 4 and basis.size == 32 and basis.name.startswith("pca:")


def test_rerun_skips_every_chunk_and_changes_nothing(store, tmp_path):
    out = _copy(store, tmp_path / "again.zarr")
    before = _files(out)
    summary = _build(out)
    assert summary.complete and summary.skipped_chunks == 2 and summary.done_chunks == 0 and summary.ok == 0
    assert _files(out) == before  # no file rewritten, not even metadata
    assert read_build_lock(out) is None


class _ReversedRunner(Runner):
    """Eager, but hands results back last-first, as Dask's as_completed may."""

    def map(self, fn, arg_list, key):
        yield from reversed(list(super().map(fn, arg_list, key)))


def test_texture_basis_does_not_depend_on_completion_order(store):
    """Regression: pre-pass batches were concatenated in completion order, and the randomised SVD of the PCA
    depends on the row order, so a Dask build got a (slightly) different basis than an eager one."""
    cfg, run = _config(store)  # 2 pre-pass batches of 4 samples; the store's basis came from the in-order pass
    with BuildProgress(enabled=False) as progress:
        b = _learn_basis(str(store), cfg, build_face_model(cfg.stages), _ReversedRunner(run), 8, progress)
    a = read_texture_basis(store)
    assert a["mean"].tobytes() == b.mean.tobytes() and a["valid"].tobytes() == b.valid.tobytes()
    assert a["basis"].astype(np.float16).tobytes() == b.basis.astype(np.float16).tobytes()  # stored as float16


def test_eager_runner_uses_the_worker_thread_count():
    """Regression: eager builds ignored RunOptions.threads and ran torch on every core; besides differing from
    a Dask worker, that made a build on a busy 2-core machine ~8x slower (spinning threads)."""
    import torch

    torch.set_num_threads(2)
    try:
        runner = Runner(RunOptions(out="unused", workers=0, threads=1))
        assert [res for _, res in runner.map(lambda *_: torch.get_num_threads(), [()], "x")] == [1]
        runner.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_dask_result_equals_eager(store, tmp_path):
    out = tmp_path / "dask.zarr"
    summary = _build(out, workers=2)
    assert summary.complete and summary.ok == 8 and summary.done_chunks == 2
    _assert_same_arrays(store, out)


# ------------------------------------------------------------------------------------------ kill, resume
def _poll_done(out: Path) -> np.ndarray | None:
    try:
        return completed_chunks(out)
    except Exception:  # noqa: BLE001 - the store may be half-created while we look
        return None


def test_kill_and_resume_gives_the_clean_build(store, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "preprocess.cli", *_cli_flags(out, workers=0)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    done = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _poll_done(out)
            if done is not None and done.any():
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert done is not None and done.any(), f"no chunk finished before the deadline: {err.decode()[-2000:]}"
    killed_done = completed_chunks(out)
    assert not killed_done.all(), "the build finished before it could be killed; make the chunks smaller"

    # the killed build's lock is left behind: same host, dead (and reaped) pid -> taken over by the next build
    lock = read_build_lock(out)
    assert lock is not None and lock["pid"] == proc.pid
    summary = _build(out)
    assert summary.complete and summary.skipped_chunks == int(killed_done.sum())
    assert summary.done_chunks == 2 - int(killed_done.sum())
    assert read_build_lock(out) is None and StoreReader(out).validate() == []
    _assert_same_arrays(store, out)


# ------------------------------------------------------------------------------------------ bad inputs
def _png(rgb_or_any: np.ndarray) -> bytes:
    img = rgb_or_any
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _synthetic_face(size: int = 96) -> np.ndarray:
    from common.procedural import build_procedural_model
    from common.synthetic import SyntheticConfig, generate

    return generate(3, SyntheticConfig(image_size=size, uv_size=32), build_procedural_model()).image


def _bad_folder(folder: Path) -> dict[str, Reason]:
    """One file of each kind, and the reason each must fail with under the ``given`` fitter without params."""
    from test_sources import _cmyk_jpeg  # the hand-made Adobe CMYK JPEG of the sources tests

    face = _synthetic_face()
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    jpg = jpg.tobytes()
    grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    files = {
        "good.png": (_png(face), Reason.BAD_ANNOTATION),
        "good.jpg": (jpg, Reason.BAD_ANNOTATION),
        "grey.png": (_png(grey), Reason.BAD_ANNOTATION),
        "sixteen_bit.png": (_png(grey.astype(np.uint16) * 257), Reason.BAD_ANNOTATION),
        "rgba.png": (_png(np.dstack([face[..., ::-1], np.full(grey.shape, 200, np.uint8)])), Reason.BAD_ANNOTATION),
        "cmyk.jpg": (_cmyk_jpeg([face[..., 0], face[..., 1], face[..., 2], np.full(grey.shape, 255, np.uint8)]),
                     Reason.BAD_ANNOTATION),
        "truncated.jpg": (jpg[: len(jpg) // 2], Reason.TRUNCATED),
        "truncated.png": (_png(face)[:-40], Reason.TRUNCATED),
        "random.jpg": (np.random.default_rng(0).bytes(4000), Reason.NOT_AN_IMAGE),
        "text.png": (b"not an image, just some text\n", Reason.NOT_AN_IMAGE),
        "tiny.png": (_png(face[:10, :10]), Reason.TOO_SMALL),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: why for name, (_, why) in files.items()}


def _folder_config(folder: Path, texture_model: str = "model") -> BuildConfig:
    stages = StageConfig(face_model="procedural", fit=FitConfig(fitter="given", image_size=64),
                         uvgt=UVGTConfig(uv_size=32), texture_model=texture_model, pca_samples=8)
    return BuildConfig(source=FolderSource(str(folder)), stages=stages, chunk=16)


def test_bad_inputs_never_stop_the_build(tmp_path):
    expected = _bad_folder(tmp_path / "photos")
    out = tmp_path / "bad.zarr"
    summary = build_store(_folder_config(tmp_path / "photos"), RunOptions(out=str(out), progress=False))
    assert summary.complete and summary.ok == 0 and summary.done_chunks == 1
    want = Counter(why.short for why in expected.values())
    assert summary.failed == want == Counter(bad_annotation=6, truncated=2, not_an_image=2, too_small=1)

    r = StoreReader(out)
    assert r.validate() == []
    got = {str(p): Reason(int(c)) for p, c in zip(r.paths(), r.group["reason"][:], strict=True)}
    assert got == expected
    assert (r.status() == FAILED).all() and r.counts()["failed_by_reason"] == dict(want)
    assert {path: why for _, path, why in r.failures()} == {k: v.short for k, v in expected.items()}

    # regression: a PCA pre-pass batch without one usable sample gave no rows but raised (np.stack of nothing),
    # which stopped the whole build even when other batches had enough samples
    x, m = prepass_batch(str(out), np.arange(4), _folder_config(tmp_path / "photos"), 16)
    assert x.shape == m.shape == (0, 16 * 16 * 3) and x.dtype == np.float32 and m.dtype == bool

    # the collection changed: refused, with the number of added / changed files
    (tmp_path / "photos" / "zz_new.png").write_bytes(_png(_synthetic_face()))
    with pytest.raises(StoreMismatch, match=r"1 added, 0 removed, 0 changed"):
        build_store(_folder_config(tmp_path / "photos"), RunOptions(out=str(out), progress=False))
    (tmp_path / "photos" / "zz_new.png").unlink()
    (tmp_path / "photos" / "text.png").write_bytes(b"edited text, longer than before\n")
    with pytest.raises(StoreMismatch, match=r"0 added, 0 removed, 1 changed \(e\.g\. text\.png\)"):
        build_store(_folder_config(tmp_path / "photos"), RunOptions(out=str(out), progress=False))


def test_pca_prepass_without_any_fittable_sample_says_what_to_do(tmp_path):
    """Folder photos need a real fitter; with none fittable there is nothing to learn a PCA basis from."""
    _bad_folder(tmp_path / "photos")
    with pytest.raises(RuntimeError, match="--texture-model model"):
        build_store(_folder_config(tmp_path / "photos", texture_model="pca"),
                    RunOptions(out=str(tmp_path / "pca.zarr"), progress=False))
    assert read_build_lock(tmp_path / "pca.zarr") is None


def test_real_faces_with_tddfa(tmp_path):
    faces, v1, v2 = asset_path("faces"), asset_path("3ddfa_v1"), asset_path("3ddfa_v2")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("JianzhuGuo.jpg", "trump_hillary.jpg"):
        shutil.copy(faces / name, photos / name)
    noise = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    (photos / "noise.png").write_bytes(_png(noise))
    out = tmp_path / "real.zarr"
    cfg, run = make_config(BuildArgs(out=out, src="folder", images=photos, fitter="tddfa", face_model="bfm-public",
                                     bfm_v1_dir=v1, bfm_v2_dir=v2, image_size=96, uv_size=64, chunk=4,
                                     pca_samples=8, n_tex=2, workers=0))
    summary = build_store(cfg, dataclasses.replace(run, progress=False))
    assert summary.complete and summary.ok == 2 and summary.failed == Counter(no_face=1), summary.errors
    r = StoreReader(out)
    assert r.validate() == []
    assert {p: why for _, p, why in r.failures()} == {"noise.png": "no_face"}
    ok = r.batch(r.ok_indices(), ["uv_gt_mask", "pose", "params"])
    assert ok["uv_gt_mask"].reshape(2, -1).sum(1).min() > 100
    assert (np.abs(ok["pose"][:, 0]) < 45).all()  # both photos are near-frontal


# ------------------------------------------------------------------------------------------ refusals
def test_changed_settings_are_refused_naming_the_field(store, tmp_path):
    out = _copy(store, tmp_path / "mismatch.zarr")
    before = _files(out)
    with pytest.raises(StoreMismatch, match=r"config\.stages\.ridge_lambda: store 1\.0, this run 4\.0"):
        _build(out, ridge_lambda=4.0)
    with pytest.raises(StoreMismatch, match=r"layout\.uv_size: store 32, this run 48"):
        _build(out, uv_size=48)
    with pytest.raises(StoreMismatch, match=r"manifest: store 8 entries .* this run 9 entries .*: 1 added"):
        _build(out, count=9)
    assert _files(out) == before and read_build_lock(out) is None

    # --overwrite rebuilds: same geometry, heavier ridge -> smaller coefficients, new config recorded
    summary = _build(out, overwrite=True, ridge_lambda=4.0)
    assert summary.complete and summary.ok == 8 and summary.skipped_chunks == 0
    r, ref = StoreReader(out), StoreReader(store)
    assert r.attrs["config"]["stages"]["ridge_lambda"] == 4.0 and r.validate() == []
    for name in ("image", "uv_gt", "uv_gt_mask", "params"):
        assert np.array_equal(r.group[name][...], ref.group[name][...]), name
    assert np.linalg.norm(r.group["tex_coeff"][...]) < np.linalg.norm(ref.group["tex_coeff"][...])


def test_concurrent_build_is_refused(store, tmp_path):
    out = _copy(store, tmp_path / "locked.zarr")
    with acquire_build_lock(out, owner="another build"):
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            _build(out)
        assert read_build_lock(out)["owner"] == "another build"  # the refused build left the lock alone
    assert read_build_lock(out) is None


# ------------------------------------------------------------------------------------------ reader, CLI
def test_reader_batch_equals_samples(store):
    r = StoreReader(store)
    idx = np.random.default_rng(0).permutation(8)[:6]
    idx = np.append(idx, idx[0])  # repeats allowed
    b = r.batch(idx)
    assert np.array_equal(b["index"], idx)
    for k, i in enumerate(idx):
        s = r.sample(int(i))
        for name in r.names:
            assert np.array_equal(b[name][k], s[name], equal_nan=b[name].dtype.kind == "f"), (name, i)


def test_cli_check_show_info(store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["check", str(store)])
    assert res.exit_code == 0 and "OK" in res.output

    bad = _copy(store, tmp_path / "bad.zarr")
    status = zarr.open_group(str(bad), mode="r+")["status"]
    status[1] = PENDING  # a sample of completed chunk 0 lost its status
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 1 and "chunk_done: chunks 0 are marked done but hold PENDING samples" in res.output

    png = tmp_path / "grid.png"
    res = runner.invoke(app, ["show", str(store), "--index", "0,5,7", "--out", str(png)])
    assert res.exit_code == 0 and png.is_file()
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] >= 3 * 32 and img.std() > 5

    res = runner.invoke(app, ["info", str(store)])
    assert res.exit_code == 0
    assert "8: 8 ok, 0 failed, 0 pending" in res.output and "2 / 2 complete" in res.output
    assert "24113 vertices" in res.output and "uv layout" in res.output and "projected mesh &" in res.output


def test_cli_build_help_and_refusal_exit_code(store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["build", "--help"])
    assert res.exit_code == 0
    for flag in ("--out", "--src", "--chunk", "--workers", "--pca-samples", "--overwrite"):
        assert flag in res.output
    out = _copy(store, tmp_path / "cli.zarr")
    res = runner.invoke(app, _cli_flags(out, workers=0, ridge_lambda=2.0))
    assert res.exit_code == 2 and "ridge_lambda" in res.output
    assert int((StoreReader(out).status() == OK).sum()) == 8


def test_a_stage_that_raises_fails_only_its_sample(monkeypatch):
    """An unexpected exception in a per-sample stage marks that sample stage_error (rows reset), the rest go on."""
    from common.config import FitConfig
    from common.store import FAILED, OK, Reason
    from common.synthetic import SyntheticConfig
    from preprocess import stages
    from preprocess.config import StageConfig, UVGTConfig
    from preprocess.sources import SyntheticSource
    from preprocess.texture import UVTextureBasis

    src = SyntheticSource(count=3, config=SyntheticConfig(image_size=64, uv_size=32, occluder_prob=0.0))
    inputs = src.load_many(range(3), src.manifest())
    cfg = StageConfig(fit=FitConfig(image_size=64), uvgt=UVGTConfig(uv_size=32))
    ctx = stages.StageContext.build(cfg)
    ctx.basis = UVTextureBasis.from_face_model(ctx.model, 32)
    real_blend = stages.blend_uv
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver exploded")
        return real_blend(*args, **kwargs)

    monkeypatch.setattr(stages, "blend_uv", flaky)
    arrays, errors = stages.run_stages(inputs, ctx)
    assert list(arrays["status"]) == [OK, FAILED, OK]
    assert arrays["reason"][1] == Reason.STAGE_ERROR and "solver exploded" in errors[0]
    assert np.isnan(arrays["params"][1]).all() and not arrays["uv_gt_mask"][1].any()
    assert arrays["uv_gt_mask"][0].any() and arrays["uv_gt_mask"][2].any()


def test_a_sample_whose_normals_fail_fails_alone(monkeypatch):
    """The blend stage computes the normals of a block of samples in one call (issue 21); when that call raises, they
    are redone sample by sample, and only the sample that raises again fails."""
    from common.config import FitConfig
    from common.store import FAILED, OK, Reason
    from common.synthetic import SyntheticConfig
    from preprocess import stages
    from preprocess.config import StageConfig, UVGTConfig
    from preprocess.sources import SyntheticSource
    from preprocess.texture import UVTextureBasis

    src = SyntheticSource(count=3, config=SyntheticConfig(image_size=64, uv_size=32, occluder_prob=0.0))
    inputs = src.load_many(range(3), src.manifest())
    cfg = StageConfig(fit=FitConfig(image_size=64), uvgt=UVGTConfig(uv_size=32))
    ctx = stages.StageContext.build(cfg)
    ctx.basis = UVTextureBasis.from_face_model(ctx.model, 32)
    clean, _ = stages.run_stages(inputs, ctx)
    real = stages.uv_normals
    singles = []

    def flaky(model, params, frags):
        if len(params) > 1:
            raise ValueError("params: the pose matrix is a reflection")
        singles.append(1)
        if len(singles) == 2:
            raise ValueError("params: the pose matrix is a reflection")
        return real(model, params, frags)

    monkeypatch.setattr(stages, "uv_normals", flaky)
    arrays, errors = stages.run_stages(inputs, ctx)
    assert list(arrays["status"]) == [OK, FAILED, OK]
    assert arrays["reason"][1] == Reason.STAGE_ERROR and "reflection" in errors[0]
    for k in (0, 2):  # the others are what the batched normals gave
        np.testing.assert_array_equal(arrays["uv_bl"][k], clean["uv_bl"][k])


# ------------------------------------------------------------------------------------------ worker memory
_FAULTS = """
import resource, numpy as np
from preprocess.executor import _heap_allocations_for_arrays

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        np.ones(1 << 18, np.float32).sum()  # 1 MiB: a UV map's size
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
a = faults()
_heap_allocations_for_arrays()
faults()
print(a, faults())
"""


def test_worker_arrays_come_from_the_heap_under_dask_nanny_malloc_settings():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap threshold at 128 KiB:
    every MiB-sized array was mapped and faulted in afresh (20-25 % of a chunk task's CPU). After the worker's first
    task sets the thresholds, the same allocations reuse heap pages."""
    if sys.platform != "linux":
        pytest.skip("glibc malloc thresholds: Linux only")
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before > 200 * 200, f"expected a page fault per page of every array before; found {before}"
    assert after < before / 20, (before, after)


def test_prepass_fits_are_reused_by_the_chunks_and_give_the_same_store(tmp_path, monkeypatch):
    """Photo sources: the chunks read the pre-pass's fits and unwraps back (preprocess.geocache) instead of fitting
    those photos again (issue 21): the store is the same as one built without, including a resumed build; the
    scratch group is gone once the build is complete."""
    import dataclasses

    import zarr

    from common.imageio import write_png
    from common.procedural import build_procedural_model
    from common.synthetic import SyntheticConfig, generate
    from preprocess import build, geocache
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    model = build_procedural_model()
    photos = tmp_path / "photos"
    faces = [generate(i, SyntheticConfig(image_size=96, uv_size=32), model) for i in range(7)]
    for i, f in enumerate(faces):
        write_png(photos / f"{i}.png", f.image)
    keys = [f"{i}.png" for i in range(7) if i != 2]  # 2.png has no parameters: fails in the pre-pass and the chunk
    np.savez(tmp_path / "params.npz", keys=np.array(keys), params=np.stack([faces[int(k[0])].params for k in keys]))
    args = BuildArgs(out=tmp_path / "unused", src="folder", images=photos, params=tmp_path / "params.npz",
                     face_model="procedural", image_size=64, uv_size=32, chunk=4, pca_samples=4, n_tex=3, workers=0)
    cfg, run = make_config(args)
    assert cfg.stages.occlusion is not None  # on for photo sources: its mask is reused too

    def built(name: str, reuse: bool) -> dict:
        out = str(tmp_path / name)
        summary = build.build_store(cfg, dataclasses.replace(run, out=out, progress=False, reuse_prepass=reuse))
        assert summary.complete and summary.ok == 6, summary
        root = zarr.open_group(out, mode="r")
        assert geocache.GROUP not in root
        return {k: np.asarray(a[...]) for k, a in root.arrays() if k not in ("manifest_mtime", "chunk_record")}

    merged = []
    real_merge = build.merge_geometry
    monkeypatch.setattr(build, "merge_geometry", lambda n, ctx, fr, fresh, kr, kept, keys: merged.append(len(kr))
                        or real_merge(n, ctx, fr, fresh, kr, kept, keys))
    without = built("without.zarr", reuse=False)
    assert merged == []
    with_reuse = built("with.zarr", reuse=True)
    assert sorted(merged) == [1, 2]  # pre-pass samples 0, 2 (failed: redone), 4, 6 in chunks [0, 4) and [4, 7)
    assert sorted(with_reuse) == sorted(without)
    for k in without:
        np.testing.assert_array_equal(with_reuse[k], without[k], err_msg=k)

    # a build that stops after the pre-pass keeps the rows for its resumption
    real_chunk = build.process_chunk
    monkeypatch.setattr(build, "process_chunk", lambda out, c, *a, **kw: (_ for _ in ()).throw(RuntimeError("x"))
                        if c == 1 else real_chunk(out, c, *a, **kw))
    out = str(tmp_path / "resumed.zarr")
    first = build.build_store(cfg, dataclasses.replace(run, out=out, progress=False))
    assert not first.complete and geocache.GROUP in zarr.open_group(out, mode="r")
    monkeypatch.setattr(build, "process_chunk", real_chunk)
    merged.clear()
    second = build.build_store(cfg, dataclasses.replace(run, out=out, progress=False))
    assert second.complete and merged == [2]
    root = zarr.open_group(out, mode="r")
    assert geocache.GROUP not in root
    for k in without:
        np.testing.assert_array_equal(np.asarray(root[k][...]), without[k], err_msg=k)
