"""The training data stream: sharding, epochs, resume positions, lazy == eager, and the precomputed renders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr

from common.store import FAILED, StoreReader
from train.data import DataConfig, IndexStream, NoUsableSamples, StoreStream, make_loader
from train.render import render_lookup

# ------------------------------------------------------------------------------------------ IndexStream


def _streams(indices, n_shards, seed=3, chunk=4, window=2):
    return [IndexStream(indices, chunk, seed, s, n_shards, window) for s in range(n_shards)]


def test_index_stream_shards_are_disjoint_equal_and_cover_the_epoch():
    idx = np.array([0, 1, 2, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23])  # gaps: failed samples
    for n_shards in (1, 2, 3, 4):
        streams = _streams(idx, n_shards)
        for e in range(3):
            parts = [s.epoch(e) for s in streams]
            assert {len(p) for p in parts} == {len(idx) // n_shards}
            flat = np.concatenate(parts)
            assert len(set(flat.tolist())) == len(flat), "a sample seen twice in one epoch"
            assert set(flat.tolist()) <= set(idx.tolist())


def test_index_stream_is_deterministic_changes_per_epoch_and_crosses_epochs():
    idx = np.arange(40)
    a, b = _streams(idx, 2), _streams(idx, 2)
    assert np.array_equal(a[1].epoch(0), b[1].epoch(0))
    assert not np.array_equal(a[0].epoch(0), a[0].epoch(1))
    per = a[0].per_epoch
    taken = a[0].take(per - 3, 7)
    assert np.array_equal(taken, np.concatenate([a[0].epoch(0)[-3:], a[0].epoch(1)[:4]]))


def test_index_stream_reads_few_chunks_per_window():
    """A shard's block is contiguous in the epoch's chunk order, and a window spans `window` chunks."""
    idx = np.arange(64)
    s = IndexStream(idx, chunk=8, seed=0, shard=0, n_shards=2, window=2)
    order = s.epoch(0)
    for w in range(0, len(order), 16):
        assert len(np.unique(order[w:w + 16] // 8)) <= 3


def test_index_stream_refuses_too_few_samples():
    with pytest.raises(NoUsableSamples, match="fewer than the 4 data shards"):
        IndexStream(np.arange(3), 4, 0, 0, 4, 1)


# ------------------------------------------------------------------------------------------ StoreStream
def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_stream_batches_match_eager_reads(train_store):
    cfg = DataConfig(batch_size=3, image_size=64, with_targets=True, seed=1)
    ds = StoreStream(train_store, cfg)
    reader = StoreReader(train_store)
    for b in _take(ds, 3):
        ref = reader.batch(b["index"].numpy(), ["uv_gt", "uv_gt_mask", "uv_bl", "face_region"])
        assert torch.equal(b["uv_gt"], torch.from_numpy(ref["uv_gt"]).permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(b["uv_bl"], torch.from_numpy(ref["uv_bl"]).permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(b["uv_gt_mask"][:, 0].bool(), torch.from_numpy(ref["uv_gt_mask"]))
        assert torch.equal(b["face"][:, 0].bool(), torch.from_numpy(ref["face_region"]))
        assert set(b["index"].tolist()) <= set(reader.ok_indices().tolist())


def test_stream_never_yields_failed_samples(train_store, tmp_path):
    import shutil

    copy = tmp_path / "s.zarr"
    shutil.copytree(train_store, copy)
    g = zarr.open_group(str(copy), mode="r+")
    status = g["status"][:]
    status[[1, 2, 5]] = FAILED
    g["status"][:] = status
    # edited by hand, the chunks no longer match their SHA-256 records: drop the records (a store built without them)
    g.attrs["layout"] = {**g.attrs["layout"], "chunk_records": False}
    ds = StoreStream(str(copy), DataConfig(batch_size=4, image_size=64, with_targets=False))
    seen = np.concatenate([b["index"].numpy() for b in _take(ds, 12)])
    assert not set(seen.tolist()) & {1, 2, 5}
    assert len(ds.ok) == len(status) - 3


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_any_batch(train_store, workers):
    cfg = DataConfig(batch_size=2, image_size=64, with_targets=True, rotate_share=0.5, seed=5)
    full = [b for b, _ in zip(make_loader(StoreStream(train_store, cfg), workers), range(7), strict=False)]
    assert [b["batch"] for b in full] == list(range(7))
    for k in (1, 3, 4):
        resumed = [b for b, _ in zip(make_loader(StoreStream(train_store, cfg, start_batch=k), workers),
                                     range(7 - k), strict=False)]
        for a, b in zip(full[k:], resumed, strict=True):
            assert a["batch"] == b["batch"]
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
            assert torch.equal(a["grid1"], b["grid1"]) and torch.equal(a["ctr_index"], b["ctr_index"])


def test_stream_ranks_see_disjoint_samples_per_epoch(train_store):
    cfg = DataConfig(batch_size=1, image_size=64, with_targets=False)
    per_epoch = len(StoreStream(train_store, cfg).ok) // 2
    seen = [np.concatenate([b["index"].numpy() for b in _take(StoreStream(train_store, cfg, r, 2), per_epoch)])
            for r in (0, 1)]
    assert len(seen[0]) == len(set(seen[0].tolist())) == per_epoch
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_real_crops_come_from_valid_crops_only(train_store):
    reader = StoreReader(train_store)
    ctr_valid, sd_valid = reader.group["ctr_valid"][:], reader.group["sd_valid"][:]
    ds = StoreStream(train_store, DataConfig(batch_size=2, image_size=64))
    for b in _take(ds, 4):
        for key, valid in (("ctr", ctr_valid), ("sd", sd_valid)):
            if f"{key}_real" in b:
                assert valid[b[f"{key}_index"].numpy()].all()
                assert (b[f"{key}_real_mask"].sum((1, 2, 3)) > 0).all()


def test_lookup_renders_the_photo_from_the_true_uv(train_store):
    """The per-pixel UV lookup at the stored pose is right: rendering uv_true through it gives the photo back."""
    reader = StoreReader(train_store)
    ds = StoreStream(train_store, DataConfig(batch_size=4, image_size=64, with_targets=False))
    b = _take(ds, 1)[0]
    uv_true = torch.from_numpy(reader.batch(b["index"].numpy(), ["uv_true"])["uv_true"]).permute(0, 3, 1, 2) / 255
    render = render_lookup(uv_true.float(), b["grid0"], b["cover0"])
    m = b["face"] * b["cover0"]
    err = ((render - b["target"]).abs() * m).sum() / (3 * m.sum())
    assert m.sum() > 200 and err < 0.03, float(err)


def test_rotate_and_render_replaces_only_the_chosen_inputs(train_store):
    cfg = DataConfig(batch_size=4, image_size=64, rotate_share=0.5, seed=2)
    plain = dataclasses.replace(cfg, rotate_share=0.0)
    a, b = _take(StoreStream(train_store, cfg), 3), _take(StoreStream(train_store, plain), 3)
    n_rot = 0
    for x, y in zip(a, b, strict=True):
        r = x["rotated"]
        n_rot += int(r.sum())
        assert torch.equal(x["image"][~r], y["image"][~r]) and torch.equal(x["target"], y["target"])
        if r.any():
            assert not torch.equal(x["image"][r], y["image"][r])
            # a rotate-and-render input has a black background outside the face at the new pose
            assert torch.equal(x["image"][r] * (1 - x["cover1"][r]), torch.zeros_like(x["image"][r]))
    assert 0 < n_rot < 12


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_rotated_params_turn_the_face_in_place(batch):
    """I1's pose: the requested yaw, the same pitch, roll and scale, the face's mean vertex where it was."""
    from common.geometry import compose_params, make_pose, params_to_euler, project_to_image, split_params
    from common.procedural import build_procedural_model
    from train.render import rotated_params

    model = build_procedural_model()
    rng = np.random.default_rng(batch)
    pose = make_pose(rng.uniform(40, 60, batch), np.radians(rng.uniform(-40, 40, batch)),
                     np.radians(rng.uniform(-10, 10, batch)), np.radians(rng.uniform(-10, 10, batch)),
                     np.tile([64.0, 64.0, 0.0], (batch, 1)))
    p = compose_params(pose, rng.normal(size=(batch, 40)).astype(np.float32),
                       rng.normal(size=(batch, 10)).astype(np.float32))
    yaw = rng.uniform(-60, 60, batch)
    q = rotated_params(p, yaw, 128, model)

    def centroid(params):
        pose, a_id, a_exp = split_params(params)
        return project_to_image(model.shape(a_id, a_exp), pose, 128).mean(1)[:, :2]

    np.testing.assert_allclose(centroid(q), centroid(p), atol=1e-2)
    np.testing.assert_allclose(params_to_euler(q)[:, 0], yaw, atol=1e-3)
    np.testing.assert_allclose(params_to_euler(q)[:, 1:], params_to_euler(p)[:, 1:], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(q[:, :3], axis=1), np.linalg.norm(p[:, :3], axis=1), rtol=1e-5)


# ------------------------------------------------------------------------------ damaged chunks (issue 20, item 2)
def _damaged(train_store, tmp_path, array: str, chunk: int) -> str:
    """A copy of the store with one chunk file of ``array`` deleted (``uvprep check`` reports it)."""
    import shutil

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(train_store, copy)
    files = [f for f in (copy / array / "c" / str(chunk)).rglob("*") if f.is_file()] if (
        copy / array / "c" / str(chunk)).is_dir() else [copy / array / "c" / str(chunk)]
    assert files and all(f.is_file() for f in files), files
    for f in files:
        f.unlink()
    return str(copy)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_deleted_image_chunk_stops_the_stream_naming_the_chunk(train_store, tmp_path, workers):
    from common.store import DamagedChunk
    from train.console import one_line

    store = _damaged(train_store, tmp_path, "image", 1)
    ds = StoreStream(store, DataConfig(batch_size=4, image_size=64, with_targets=False, shuffle_window=8))
    with pytest.raises(DamagedChunk) as e:  # every batch of 4 from a window of all chunks reaches chunk 1 soon
        for _ in zip(range(12), make_loader(ds, workers), strict=False):
            pass
    msg = one_line(e.value)
    assert msg.startswith(f"{store}: chunk 1 (samples 4-7) is damaged") and "uvprep build --verify" in msg, msg
    assert "\n" not in msg


def test_a_deleted_status_chunk_is_refused_not_read_as_pending(train_store, tmp_path):
    from common.store import DamagedChunk

    store = _damaged(train_store, tmp_path, "status", 2)
    with pytest.raises(DamagedChunk, match=r"chunk 2 \(samples 8-11\) is marked complete but its status reads PENDING"):
        StoreStream(store, DataConfig(batch_size=4, image_size=64, with_targets=False))


def test_the_reader_verifies_each_chunk_once_and_reads_sound_chunks_as_before(train_store, tmp_path, monkeypatch):
    from common.store import DamagedChunk, chunks

    reader = StoreReader(train_store)
    calls = []
    real = chunks._chunk_problem
    monkeypatch.setattr(chunks, "_chunk_problem", lambda *a: calls.append(a[2]) or real(*a))
    first = reader.batch([5, 1, 6], ["image", "params"])
    again = reader.batch([6, 7], ["image"])
    assert calls == [0, 4], calls  # chunks 0 and 1, once each
    eager = zarr.open_group(train_store, mode="r")
    np.testing.assert_array_equal(first["image"], eager["image"][[5, 1, 6]])
    np.testing.assert_array_equal(again["image"], eager["image"][[6, 7]])
    damaged = StoreReader(_damaged(train_store, tmp_path, "uv_bl", 3))
    damaged.batch([0, 1], ["image"])  # other chunks stay readable
    with pytest.raises(DamagedChunk, match=r"chunk 3 \(samples 12-15\)"):
        damaged.batch([13], ["image"])  # even when the array asked for is intact
