"""The Zarr training store: schema, chunk writer (order, concurrency), resume checks, build lock, reader, validate."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import zarr

from common import store as S
from common.config import CropConfig
from common.facemodel import REGION_NAMES, FaceModel
from common.store import FAILED, OK, Reason, StoreLayout
from common.uvlayout import CropLayout
from preprocess.upgrade import rename_array


def _tiny_model() -> FaceModel:
    """A unit square of two triangles, mirrored across x = 0, with every named region."""
    verts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32)
    rng = np.random.default_rng(0)
    regions = {name: np.array([k % 2 == 0, True, k % 3 == 0, False]) for k, name in enumerate(REGION_NAMES)}
    return FaceModel(name="tiny", mean_shape=verts, id_basis=rng.normal(size=(4, 3, 2)).astype(np.float32),
                     exp_basis=rng.normal(size=(4, 3, 1)).astype(np.float32),
                     triangles=np.array([[0, 1, 2], [0, 2, 3]], np.int64), uv=(verts[:, :2] + 1) / 2,
                     symmetry=np.array([1, 0, 3, 2], np.int64), regions=regions,
                     meta={"units": "none", "table": np.arange(3), "nested": {"a": [1, 2]}})


MODEL = _tiny_model()
LAYOUT = StoreLayout(n_samples=10, image_size=16, uv_size=8, ctr_shape=(4, 5), sd_shape=(3, 4), n_tex=6, chunk=4,
                     has_truth=True)
ATTRS = {"config": {"image_size": 16, "fit": {"iters": 3, "lr": 0.1}}, "face_model_hash": MODEL.fingerprint(),
         "texture_basis_hash": "9f8e7d", "face_model": "tiny"}
_CROPS = CropLayout(8, (1, 5, 2, 7), (0, 3, 4, 8), np.arange(20).reshape(4, 5) % 3 > 0, np.eye(3, 4, dtype=bool))
_MIRROR = (np.arange(64).reshape(8, 8)[:, ::-1]).reshape(-1).astype(np.int64)
DESCRIBED = {"face_model": MODEL, "crop_layout": _CROPS, "mirror_index": _MIRROR,
             "crop_config": CropConfig(frontal_yaw_max=12.0)}
"""What create_store / open_for_build need besides the layout: the store's model/ and uv_layout/ groups."""
PATHS = [f"{i:05d}/{i:05d}.png" for i in range(10)]
MANIFEST = (PATHS, np.arange(10) * 100 + 7, np.arange(10) * 1.25 + 1.7e9)


def _chunk_arrays(layout: StoreLayout, c: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible values for every array of chunk c (sample start+1 fails with no_face)."""
    start, stop = layout.chunk_bounds(c)
    n = stop - start
    rng = np.random.default_rng([seed, c])
    out = {}
    for name, spec in S.array_specs(layout).items():
        if name in ("chunk_done", "status", "reason"):
            continue
        shape = (n, *spec.shape[1:])
        if spec.dtype == bool:
            out[name] = rng.random(shape) < 0.5
        elif spec.dtype == np.uint8:
            out[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            out[name] = rng.normal(size=shape).astype(np.float32)
    out["pose"] = rng.uniform(-60, 60, (n, 3)).astype(np.float32)
    out["status"] = np.full(n, OK, np.uint8)
    out["reason"] = np.zeros(n, np.uint8)
    if n > 1:
        out["status"][1], out["reason"][1] = FAILED, Reason.NO_FACE
    return out


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store.zarr"
    S.create_store(path, LAYOUT, ATTRS, MANIFEST, **DESCRIBED)
    return path


def test_specs_and_layout_roundtrip():
    specs = S.array_specs(LAYOUT)
    assert specs["image"] == ((10, 16, 16, 3), np.uint8, (4, 16, 16, 3))
    assert specs["uv_ctr_mask"] == ((10, 4, 5), bool, (4, 4, 5))
    assert specs["params"].shape == (10, 62) and specs["tex_coeff"].shape == (10, 6)
    assert specs["chunk_done"] == ((3,), np.uint8, (1,))
    assert "uv_true" in specs and "uv_true" not in S.array_specs(StoreLayout(10, 16, 8, (4, 5), (3, 4), 6))
    assert all(s.chunks[0] == 4 and s.chunks[1:] == s.shape[1:] for k, s in specs.items() if k != "chunk_done")
    assert StoreLayout.from_json(json.loads(json.dumps(LAYOUT.to_json()))) == LAYOUT
    assert LAYOUT.n_chunks == 3 and LAYOUT.chunk_bounds(2) == (8, 10)
    with pytest.raises(ValueError, match="compressor"):
        StoreLayout(10, 16, 8, (4, 5), (3, 4), 6, compressor="gzip")
    with pytest.raises(ValueError, match="n_samples"):
        StoreLayout(0, 16, 8, (4, 5), (3, 4), 6)
    assert Reason.from_short("no_face") is Reason.NO_FACE and "detector" in Reason.NO_FACE.description


def test_one_array_table_gives_the_specs_the_descriptions_and_the_docstring():
    full = StoreLayout(10, 16, 8, (4, 5), (3, 4), 6, chunk=4, has_truth=True, has_occlusion=True, chunk_records=True)
    names = [a.name for a in S.ARRAYS]
    assert [*S.array_specs(full), *S.manifest_specs(full)] == names == list(S.ARRAY_DOCS)
    assert S.ARRAY_DOCS["image"] == "photo at the working resolution, (N, H, W, 3) uint8 RGB"
    table = S.schema_table()
    assert table in S.__doc__ and all(f"\n{n} " in table for n in names)
    assert S.reason_name(Reason.NO_FACE) == "no_face" and S.reason_name(99) == "unknown_99"


def test_create_attrs_and_manifest_roundtrip(tmp_path):
    paths = ["a/ü.png", "b/" + "x" * 300 + ".jpg", "c d/日本.jpeg", "synthetic://0/3"]
    layout = StoreLayout(4, 16, 8, (4, 5), (3, 4), 6, chunk=2)
    man = (paths, [1, 2**40, 3, 0], [0.5, 1.7e9 + 0.123456, 2.0, 0.0])
    S.create_store(tmp_path / "s.zarr", layout, ATTRS, man, **DESCRIBED)
    r = S.StoreReader(tmp_path / "s.zarr")
    assert [str(p) for p in r.paths()] == paths
    assert r.group["manifest_size"][:].tolist() == [1, 2**40, 3, 0]
    assert r.group["manifest_mtime"][:].tolist() == man[2]
    a = r.attrs
    assert a["schema_version"] == S.SCHEMA_VERSION and a["config"] == ATTRS["config"]
    assert a["face_model_hash"] == MODEL.fingerprint()
    assert a["manifest"] == {"count": 4, "sha256": S.manifest_sha256(*man)}
    assert a["created"] and a["package_version"] and r.layout == layout
    assert r.counts() == {"ok": 0, "failed": 0, "pending": 4, "failed_by_reason": {}, "chunks_done": 0, "n_chunks": 2}
    assert r.validate() == []
    assert np.isnan(r.sample(0)["params"]).all()  # float arrays are NaN until written


def test_two_processes_write_chunks_and_read_back(store):
    ctx = mp.get_context("spawn")
    chunks = {c: _chunk_arrays(LAYOUT, c) for c in (0, 2)}
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:  # each worker opens the store from its path
        list(ex.map(S.write_chunk, [str(store)] * 2, list(chunks), list(chunks.values())))
    assert S.completed_chunks(store).tolist() == [True, False, True]
    r = S.StoreReader(str(store))
    assert len(r) == 10
    for c, arrays in chunks.items():
        start, stop = LAYOUT.chunk_bounds(c)
        got = r.batch(np.arange(start, stop))
        for name, value in arrays.items():
            assert np.array_equal(got[name], value), name
    s = r.sample(9)
    assert s["path"] == PATHS[9] and np.array_equal(s["image"], chunks[2]["image"][1])
    assert r.ok_indices().tolist() == [0, 2, 3, 8]
    assert r.counts() == {"ok": 4, "failed": 2, "pending": 4, "failed_by_reason": {"no_face": 2},
                          "chunks_done": 2, "n_chunks": 3}
    assert r.failures() == [(1, PATHS[1], "no_face"), (9, PATHS[9], "no_face")]
    b = r.batch([9, 0, 9], names=["status", "pose"])
    assert b["status"].tolist() == [FAILED, OK, FAILED] and np.array_equal(b["pose"][0], b["pose"][2])
    assert r.validate() == []


def test_chunk_done_written_last(store, monkeypatch):
    order = []
    orig = zarr.Array.__setitem__

    def spy(self, key, value):
        order.append(self.basename)
        return orig(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    S.write_chunk(store, 1, _chunk_arrays(LAYOUT, 1))
    assert order[-3:] == ["reason", "status", "chunk_done"] and order.count("chunk_done") == 1
    assert set(order) == set(S.array_specs(LAYOUT))


def test_write_chunk_rejects_bad_input_before_writing(store):
    good = _chunk_arrays(LAYOUT, 0)
    bad_cases = [
        ({**good, "image": good["image"].astype(np.float32) / 255}, TypeError, "to_uint8"),
        ({**good, "params": good["params"][:, :60]}, ValueError, r"params expected shape \(4, 62\)"),
        ({**good, "face_region": good["face_region"].astype(np.uint8)}, TypeError, "bool"),
        ({**good, "status": np.array([1, 0, 1, 1])}, ValueError, "OK .1. or FAILED"),
        ({**good, "reason": np.zeros(4)}, TypeError, "reason"),
        ({**good, "reason": np.zeros(4, np.uint8)}, ValueError, "failed samples need a reason"),
        ({**good, "uv_nope": good["status"]}, KeyError, "unknown arrays"),
        ({k: v for k, v in good.items() if k != "status"}, KeyError, "status"),
    ]
    for arrays, exc, msg in bad_cases:
        with pytest.raises(exc, match=msg):
            S.write_chunk(store, 0, arrays)
    with pytest.raises(IndexError, match="3 chunks"):
        S.write_chunk(store, 3, good)
    r = S.StoreReader(store)
    assert not S.completed_chunks(store).any() and r.counts()["pending"] == 10
    assert np.isnan(r.group["params"][:]).all()
    last = _chunk_arrays(LAYOUT, 2)  # the short last chunk takes 2 samples
    S.write_chunk(store, 2, {k: last[k] for k in ("status", "reason", "params", "pose", "tex_coeff")})
    assert r.counts()["failed"] == 1 and r.validate() == []


def test_rewrite_resets_arrays_not_given(store):
    S.write_chunk(store, 0, _chunk_arrays(LAYOUT, 0))
    S.write_chunk(store, 0, {"status": np.full(4, FAILED), "reason": np.full(4, Reason.DECODE_ERROR)})
    r = S.StoreReader(store)
    b = r.batch(range(4), ["image", "params", "uv_gt_mask"])
    assert (b["image"] == 0).all() and np.isnan(b["params"]).all() and not b["uv_gt_mask"].any()
    assert r.counts()["failed_by_reason"] == {"decode_error": 4}


def test_url_store(tmp_path):
    url = f"memory://uvtex-test/{tmp_path.name}/store.zarr"  # an fsspec URL, as s3:// or gs:// would be
    S.create_store(url, LAYOUT, ATTRS, MANIFEST, **DESCRIBED)
    S.write_chunk(url, 1, _chunk_arrays(LAYOUT, 1))
    assert S.open_for_build(url, LAYOUT, ATTRS, MANIFEST, **DESCRIBED) is not None
    r = S.StoreReader(url)
    assert r.counts()["ok"] == 3 and r.validate() == [] and S.completed_chunks(url).tolist() == [False, True, False]
    with pytest.raises(FileExistsError):
        S.create_store(url, LAYOUT, ATTRS, MANIFEST, **DESCRIBED)


def test_open_for_build_checks_every_field(store):
    assert isinstance(S.open_for_build(store, LAYOUT, ATTRS, MANIFEST, **DESCRIBED), zarr.Group)
    other = {**ATTRS, "config": {"image_size": 16, "fit": {"iters": 5, "lr": 0.1}}, "face_model_hash": "ffff"}
    paths = PATHS[:9] + ["00099/00099.png"]
    sizes = MANIFEST[1].copy()
    sizes[2] += 1
    with pytest.raises(S.StoreMismatch) as e:
        S.open_for_build(store, LAYOUT, other, (paths, sizes, MANIFEST[2]), **DESCRIBED)
    msg = str(e.value)
    assert "config.fit.iters: store 3, this run 5" in msg
    assert f"face_model_hash: store {MODEL.fingerprint()}, this run ffff" in msg
    assert "manifest: store 10 entries" in msg and "1 added, 1 removed, 1 changed" in msg
    assert "pass --overwrite to rebuild" in msg and "lr" not in msg and "texture_basis_hash" not in msg
    with pytest.raises(S.StoreMismatch, match="layout.uv_size: store 8, this run 16"):
        S.open_for_build(store, StoreLayout(10, 16, 16, (4, 5), (3, 4), 6, chunk=4, has_truth=True), ATTRS, MANIFEST,
                         **DESCRIBED)
    with pytest.raises(S.StoreMismatch, match="texture_basis_hash: store 9f8e7d, this run <absent>"):
        S.open_for_build(store, LAYOUT, {**ATTRS, "texture_basis_hash": "<absent>"}, MANIFEST, **DESCRIBED)


def test_create_refuses_existing_and_overwrite_keeps_lock(store, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.create_store(store, LAYOUT, ATTRS, MANIFEST, **DESCRIBED)
    S.write_chunk(store, 0, _chunk_arrays(LAYOUT, 0))
    with S.acquire_build_lock(store, owner="test") as lock:
        small = StoreLayout(4, 16, 8, (4, 5), (3, 4), 6, chunk=2)
        S.create_store(store, small, ATTRS, (PATHS[:4], [1] * 4, [0.0] * 4), overwrite=True, **DESCRIBED)
        assert os.path.exists(lock.path)
        r = S.StoreReader(store)
        assert r.layout == small and r.counts()["pending"] == 4 and r.validate() == []
    assert not os.path.exists(lock.path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        S.create_store(tmp_path / "photos", LAYOUT, ATTRS, MANIFEST, overwrite=True, **DESCRIBED)
    with pytest.raises(ValueError, match="texture_basis_hash"):
        S.create_store(tmp_path / "new.zarr", LAYOUT, {"config": {}, "face_model_hash": "x"}, MANIFEST, **DESCRIBED)
    with pytest.raises(ValueError, match="manifest has 3 entries"):
        S.create_store(tmp_path / "new.zarr", LAYOUT, ATTRS, (PATHS[:3], [1] * 3, [0.0] * 3), **DESCRIBED)


def test_build_lock(tmp_path):
    path = tmp_path / "store.zarr"
    lock = S.acquire_build_lock(path, owner="build A")
    held = S.read_build_lock(path)
    assert held["pid"] == os.getpid() and held["owner"] == "build A"
    with pytest.raises(S.StoreLocked) as e:
        S.acquire_build_lock(path, owner="build B")
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and held["started"] in msg
    assert lock.path in msg  # says which file to delete
    lock.release()
    assert S.read_build_lock(path) is None

    # stale: the holder's process has exited on this host -> taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
             "token": "old"}
    (path / S.LOCK_NAME).write_text(json.dumps(stale))
    with S.acquire_build_lock(path, owner="build C"):
        assert S.read_build_lock(path)["owner"] == "build C"
        assert sorted(os.listdir(path)) == [S.LOCK_NAME]  # the stale copy is gone

    # another host: cannot check its pid, so refuse
    (path / S.LOCK_NAME).write_text(json.dumps({**stale, "host": "elsewhere-node-7"}))
    with pytest.raises(S.StoreLocked, match="elsewhere-node-7.*delete"):
        S.acquire_build_lock(path)
    # a URL scheme without a trusted exclusive create (s3:// has one: tests/test_s3.py): refused, naming the opt-out
    with pytest.raises(NotImplementedError, match="no exclusive create.*--no-lock"):
        S.acquire_build_lock("gs://bucket/store.zarr")


def test_validate_finds_planted_problems(store):
    for c in range(3):
        S.write_chunk(store, c, _chunk_arrays(LAYOUT, c))
    assert S.StoreReader(store).validate() == []
    g = zarr.open_group(str(store), mode="r+")
    g["params"][2, 5] = np.nan  # OK sample with NaN parameters
    g["status"][8] = S.PENDING  # pending sample inside a chunk marked done
    g["pose"][3, 0] = 120.0  # yaw out of range
    g["reason"][0] = Reason.TRUNCATED  # OK sample with a failure reason
    problems = S.StoreReader(store).validate()
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "params: 1 OK samples have NaN/inf values: 2" in text
    assert "chunk_done: chunks 2 are marked done but hold PENDING samples" in text
    assert "pose: 1 OK samples outside" in text and "reason: OK samples with a failure reason: 0" in text

    g["status"][8] = FAILED
    del g["face_mask_eroded"]
    g.create_array("face_mask_eroded", shape=(10, 16, 16), dtype=np.uint8, chunks=(4, 16, 16))
    problems = S.validate_store(store)
    assert any(p.startswith("face_mask_eroded: expected shape (10, 16, 16) bool") for p in problems), problems
    g.attrs["schema_version"] = 99
    assert "schema version 99" in S.validate_store(store)[0]
    with pytest.raises(S.StoreMismatch, match="newer than this code's 2: .* update uvtex"):
        S.StoreReader(store)
    g.attrs["schema_version"] = 0
    with pytest.raises(S.StoreMismatch, match="--overwrite"):
        S.StoreReader(store)


def test_storage_compresses(store):
    for c in range(3):
        S.write_chunk(store, c, _chunk_arrays(LAYOUT, c))
    info = S.StoreReader(store).storage()
    stored, raw = info["uv_ctr_mask"]
    assert raw == 10 * 4 * 5 and stored > 0
    assert info["image"][1] == 10 * 16 * 16 * 3


# --------------------------------------------------------------------- model/, uv_layout/, texture/ groups
def test_model_uv_layout_and_texture_read_back(store):
    r = S.StoreReader(store)
    m = r.face_model()
    assert m.fingerprint() == MODEL.fingerprint() == r.attrs["face_model_hash"] and r.face_model() is m
    for name in ("mean_shape", "id_basis", "exp_basis", "triangles", "uv", "symmetry"):
        got, want = getattr(m, name), getattr(MODEL, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert {k: v.tolist() for k, v in m.regions.items()} == {k: v.tolist() for k, v in MODEL.regions.items()}
    assert m.name == "tiny" and m.keypoints is None and m.tex_basis is None
    assert m.meta == {"units": "none", "nested": {"a": [1, 2]}}  # the array entry is not JSON-able: named only
    assert r.group["model"].attrs["meta_omitted"] == ["table"] and r.group["model"]["regions"].shape == (8, 4)

    crops = r.crop_layout()
    assert crops.equals(_CROPS) and crops.ctr_box == (1, 5, 2, 7) and crops.sd_region.dtype == bool
    assert r.mirror_index().dtype == np.int64 and np.array_equal(r.mirror_index(), _MIRROR)
    assert r.crop_config() == CropConfig(frontal_yaw_max=12.0)

    assert r.texture_basis() is None  # not written yet
    rng = np.random.default_rng(1)
    mean, basis = rng.random((8, 8, 3), np.float32), rng.normal(size=(8, 8, 3, 2)).astype(np.float32)
    S.write_texture_basis(store, mean, basis, np.ones((8, 8), bool), "test", "fp")
    t = r.texture_basis()
    assert t.name == "test" and np.array_equal(t.mean, mean) and t.basis.dtype == np.float32
    assert np.abs(t.basis - basis).max() < 2e-3  # stored float16
    assert r.validate() == []


def test_create_store_checks_the_model_before_writing(tmp_path):
    out = tmp_path / "new.zarr"
    with pytest.raises(ValueError, match=f"fingerprint {MODEL.fingerprint()}.*face_model_hash ffff"):
        S.create_store(out, LAYOUT, {**ATTRS, "face_model_hash": "ffff"}, MANIFEST, **DESCRIBED)
    small = CropLayout(8, (0, 4, 0, 4), (0, 3, 4, 8), np.ones((4, 4), bool), np.ones((3, 4), bool))
    with pytest.raises(ValueError, match=r"crops \(4, 5\) / \(3, 4\).*found U = 8 and \(4, 4\)"):
        S.create_store(out, LAYOUT, ATTRS, MANIFEST, **{**DESCRIBED, "crop_layout": small})
    with pytest.raises(ValueError, match=r"mirror_index: expected \(64,\)"):
        S.create_store(out, LAYOUT, ATTRS, MANIFEST, **{**DESCRIBED, "mirror_index": _MIRROR[:10]})
    f64 = FaceModel(**{**MODEL.__dict__, "uv": MODEL.uv.astype(np.float64)})
    with pytest.raises(TypeError, match="uv is float64"):
        S.create_store(out, LAYOUT, {**ATTRS, "face_model_hash": f64.fingerprint()}, MANIFEST,
                       **{**DESCRIBED, "face_model": f64})
    assert not out.exists()


def test_resume_compares_the_model_groups(store):
    with pytest.raises(S.StoreMismatch, match="uv_layout/mirror_index: differs"):
        S.open_for_build(store, LAYOUT, ATTRS, MANIFEST, **{**DESCRIBED, "mirror_index": np.roll(_MIRROR, 1)})
    with pytest.raises(S.StoreMismatch, match="uv_layout/crop_config: store .*'frontal_yaw_max': 12.0"):
        S.open_for_build(store, LAYOUT, ATTRS, MANIFEST, **{**DESCRIBED, "crop_config": CropConfig()})
    other = CropLayout(8, (1, 5, 2, 7), (0, 3, 4, 8), np.ones((4, 5), bool), np.eye(3, 4, dtype=bool))
    with pytest.raises(S.StoreMismatch, match="uv_layout/: crop boxes or masks differ"):
        S.open_for_build(store, LAYOUT, ATTRS, MANIFEST, **{**DESCRIBED, "crop_layout": other})


def test_validate_checks_the_model_groups(store):
    g = zarr.open_group(str(store), mode="r+")
    g["model"]["mean_shape"][0, 0] = 5.0
    problems = S.validate_store(store)
    assert len(problems) == 1 and "model: the arrays hash to" in problems[0] and "edited after creation" in problems[0]
    g["model"]["mean_shape"][0, 0] = -1.0
    assert S.validate_store(store) == []
    g["uv_layout"].attrs["face_model"] = "0123"
    assert S.validate_store(store) == [f"uv_layout: computed for face model 0123, the store's face_model_hash is "
                                       f"{MODEL.fingerprint()}"]
    del g["uv_layout"]
    assert "uv_layout: " in S.validate_store(store)[0] and "no uv_layout/ group" in S.validate_store(store)[0]


def test_version_1_store_is_refused_naming_what_is_missing_and_the_fix(store):
    S.write_chunk(store, 0, _chunk_arrays(LAYOUT, 0))
    g = zarr.open_group(str(store), mode="r+")
    eroded = g["face_mask_eroded"][...]
    for name in ("model", "uv_layout", "face_region"):
        del g[name]
    rename_array(g, "face_mask_eroded", "face_mask")  # what a version-1 store looks like
    a = g["face_mask"]
    assert "face_mask_eroded" not in g and np.array_equal(a[...], eroded) and a.chunks == (4, 16, 16)
    assert a.compressors == g["uv_gt_mask"].compressors and a.attrs["description"] == S.ARRAY_DOCS["face_mask_eroded"]
    g.attrs["schema_version"] = 1
    with pytest.raises(S.StoreMismatch) as e:
        S.StoreReader(store)
    msg = str(e.value)
    for part in ("schema version 1", "no model/ group", "no uv_layout/ group", "no face_region array",
                 "face_mask must be renamed face_mask_eroded", f"uvprep upgrade {store}"):
        assert part in msg, (part, msg)
    assert f"uvprep upgrade {store}" in S.validate_store(store)[0]
    with pytest.raises(S.StoreMismatch, match="store 1, this code 2 .upgrade it in place: uvprep upgrade STORE"):
        S.open_for_build(store, LAYOUT, ATTRS, MANIFEST, **DESCRIBED)
    g.attrs["schema_version"] = 3
    with pytest.raises(S.StoreMismatch, match="newer than this code's 2.*update uvtex"):
        S.StoreReader(store)
