"""``uvprep upgrade``: a version-1 store becomes the version-2 store a fresh build writes (face_region aside).

The version-1 store is made by hand from a fresh tiny synthetic build (8 samples, 64 px images, 32² UV maps):
the model/ and uv_layout/ groups and face_region are deleted, face_mask_eroded is renamed back to face_mask and
schema_version is set to 1, which is exactly what ``uvprep build`` wrote before schema version 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from common.store import StoreLocked, StoreMismatch, StoreReader, acquire_build_lock
from preprocess import upgrade as up
from preprocess.build import build_store
from preprocess.buildcli import make_config
from preprocess.cli import app
from preprocess.config import BuildArgs

SMALL = {"count": 8, "image_size": 64, "uv_size": 32, "chunk": 4, "pca_samples": 8, "n_tex": 4}


def _config(out: Path):
    cfg, run = make_config(BuildArgs(out=out, **SMALL))
    return cfg, dataclasses.replace(run, workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A fresh version-2 build, never modified by the tests."""
    out = tmp_path_factory.mktemp("fresh") / "fresh.zarr"
    assert build_store(*_config(out)).ok == SMALL["count"]
    return out


def _make_v1(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")
    for name in ("model", "uv_layout", "face_region"):
        del g[name]
    up.rename_array(g, "face_mask_eroded", "face_mask")
    attrs = dict(g.attrs)
    del attrs["face_region_source"]
    g.attrs.put({**attrs, "schema_version": 1})
    return dst


@pytest.fixture
def v1(fresh, tmp_path) -> Path:
    return _make_v1(fresh, tmp_path / "v1.zarr")


def _upgrade(path: Path, **kw) -> up.UpgradeReport:
    return up.upgrade_store(up.UpgradeOptions(store=str(path), progress=False, **kw))


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample intersection over union of (n, H, W) bool masks."""
    return (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)


def test_upgraded_store_equals_a_fresh_build(fresh, v1):
    with pytest.raises(StoreMismatch, match="uvprep upgrade"):
        StoreReader(v1)
    report = _upgrade(v1)
    assert report.changed and (report.from_version, report.to_version) == (1, 2) and report.problems == []
    assert report.face_region_source == "upgrade: projected mesh only"
    assert any("renamed face_mask -> face_mask_eroded" in s for s in report.steps)

    r, ref = StoreReader(v1), StoreReader(fresh)
    assert r.validate() == []
    assert r.attrs["face_region_source"] == "upgrade: projected mesh only" and r.attrs["upgraded"]["from"] == 1
    assert r.face_model().fingerprint() == ref.face_model().fingerprint() == r.attrs["face_model_hash"]
    assert r.crop_layout().equals(ref.crop_layout()) and r.crop_config() == ref.crop_config()
    assert np.array_equal(r.mirror_index(), ref.mirror_index())
    for name in ref.names:  # every other array is untouched, face_mask_eroded included
        if name != "face_region":
            assert np.array_equal(r.group[name][...], ref.group[name][...], equal_nan=True), name
    assert r.group["face_mask_eroded"].chunks == ref.group["face_mask_eroded"].chunks
    assert "face_mask" not in r.group and "upgrade_chunks_done" not in r.group["face_region"].attrs

    # face_region: the projected mesh alone; the fresh build also cut out the occluders (synthetic segmentation)
    got, want = r.group["face_region"][...], ref.group["face_region"][...]
    assert (got & want).sum() / (got | want).sum() > 0.9 and np.median(_iou(got, want)) > 0.99
    cfg, _ = _config(fresh)
    seg = np.stack([s.truth["face_mask"] for s in cfg.source.load_many(range(8), cfg.source.manifest())])
    occluded = (got & ~seg).sum((1, 2)) > 0.02 * got.sum((1, 2))  # an occluder over the face (a hand, hair)
    assert occluded.any() and (_iou(got, want)[~occluded] > 0.99).all()
    assert _iou(got & seg, want).min() > 0.99  # the rest of the difference is what the segmentation removed
    assert not (want & ~got).any()  # the same stored fits through the same rasteriser: the projection is exact


def test_upgrade_is_idempotent_and_the_build_resumes_on_the_result(v1):
    _upgrade(v1)
    before = _files(v1)
    again = _upgrade(v1)
    assert not again.changed and again.steps == ["already at schema version 2: nothing to do"] and not again.problems
    assert _files(v1) == before
    summary = build_store(*_config(v1))  # same command as the original build: nothing to redo, nothing refused
    assert summary.complete and summary.skipped_chunks == 2 and summary.done_chunks == 0
    assert _files(v1) == before


def test_interrupted_upgrade_finishes_on_rerun(fresh, v1, tmp_path, monkeypatch):
    real = up.face_region_chunk

    def dies_on_chunk_1(out, chunk, *args):
        if chunk == 1:
            raise OSError("node lost")
        return real(out, chunk, *args)

    monkeypatch.setattr(up, "face_region_chunk", dies_on_chunk_1)
    with pytest.raises(RuntimeError, match="chunk 1 failed: node lost.*run the upgrade again"):
        _upgrade(v1)
    g = zarr.open_group(str(v1), mode="r")
    assert g.attrs["schema_version"] == 1 and "face_mask_eroded" in g and "face_mask" not in g
    assert g["face_region"].attrs["upgrade_chunks_done"] == [0]
    monkeypatch.setattr(up, "face_region_chunk", real)
    report = _upgrade(v1)
    assert report.changed and not report.problems
    assert "face_mask_eroded already there" in report.steps and report.steps[0].startswith("kept model/")
    clean = _make_v1(fresh, tmp_path / "clean.zarr")
    _upgrade(clean)
    assert np.array_equal(StoreReader(v1).group["face_region"][...], StoreReader(clean).group["face_region"][...])


def test_refusals(v1, tmp_path):
    with acquire_build_lock(v1, owner="uvprep build"):
        with pytest.raises(StoreLocked, match="uvprep build"):
            _upgrade(v1)
    g = zarr.open_group(str(v1), mode="r+")
    g.attrs["schema_version"] = 3
    with pytest.raises(StoreMismatch, match="schema version 3, newer than this code's 2"):
        _upgrade(v1)
    g.attrs["schema_version"] = 1
    config = g.attrs["config"]
    g.attrs["face_model_hash"] = "0000"
    with pytest.raises(StoreMismatch, match="is not the one the store was built with .face_model_hash 0000"):
        _upgrade(v1)
    bfm = {**config, "stages": {**config["stages"], "face_model": "bfm-public", "bfm_v1_dir": str(tmp_path / "gone"),
                                "bfm_v2_dir": str(tmp_path)}}
    g.attrs["config"] = bfm
    with pytest.raises(FileNotFoundError, match=f"--bfm-v1-dir {tmp_path / 'gone'} is missing.*--bfm-v1-dir DIR"):
        _upgrade(v1)
    with pytest.raises(FileNotFoundError, match="no store at"):
        _upgrade(tmp_path / "nothing.zarr")
    assert not (tmp_path / "nothing.zarr").exists()
    assert zarr.open_group(str(v1), mode="r").attrs["schema_version"] == 1  # nothing was written
    assert "model" not in zarr.open_group(str(v1), mode="r")


def test_cli_upgrade(v1):
    runner = CliRunner()
    for command in ("check", "info"):  # a version-1 store: the other commands say how to upgrade it
        res = runner.invoke(app, [command, str(v1)])
        assert res.exit_code in (1, 2) and "uvprep upgrade" in " ".join(res.output.split()), (command, res.output)
    res = runner.invoke(app, ["upgrade", str(v1), "--workers", "0"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "schema version 1 -> 2" in text and "'upgrade: projected mesh only'" in text and "valid" in text
    res = runner.invoke(app, ["upgrade", str(v1), "--workers", "0"])
    assert res.exit_code == 0 and "nothing to do" in res.output
    zarr.open_group(str(v1), mode="r+").attrs["schema_version"] = 7
    res = runner.invoke(app, ["upgrade", str(v1), "--workers", "0"])
    assert res.exit_code == 2 and "newer" in res.output
