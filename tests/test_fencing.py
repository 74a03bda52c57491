"""Fenced writers end to end (issue 12, item 1): a build joined to a running Dask scheduler is killed (``kill -9``) or
interrupted (Ctrl-C) while its tasks run on the workers; a rebuild with another config (``--overwrite``) against the
same scheduler must end with exactly the data of a clean build, whatever the old tasks still write.

The old tasks are made to outlive their client by a worker preload (``tests/stall_worker.py``; the product has no
test hook): on one worker a task is held before it writes, on the other inside ``write_chunk`` after its first
generation check passed, each until the rebuild has completed the same chunk.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tests.daskcluster import ROOT, dask_cluster, spawn, stop, store_group, until

COUNT, CHUNK = 20, 2
FLAGS = ["--src", "synthetic", "--count", str(COUNT), "--chunk", str(CHUNK), "--image-size", "64", "--uv-size", "32",
         "--pca-samples", "8", "--n-tex", "2"]


@pytest.fixture
def cluster(tmp_path):
    """A ``dask scheduler`` and two workers (2 threads each: one may be held by a stalled task) on 127.0.0.1; the
    workers hold back one old task each (``UVTEX_STALL`` = before / inside). Yields (address, stall folder)."""
    stall = tmp_path / "stall"
    stall.mkdir()
    env = [{"UVTEX_STALL": mode, "UVTEX_STALL_DIR": str(stall)} for mode in ("before", "inside")]
    with dask_cluster(tmp_path, env, preload=ROOT / "tests" / "stall_worker.py") as cl:
        yield cl.address, stall


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A clean in-process build with the rebuild's config (erosion 0.05)."""
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    cfg, run = make_config(BuildArgs(out=out, count=COUNT, chunk=CHUNK, image_size=64, uv_size=32, pca_samples=8,
                                     n_tex=2, erosion=0.05))
    assert build_store(cfg, dataclasses.replace(run, workers=0, progress=False)).complete
    return out


@pytest.mark.slow  # a Dask cluster, a build killed half-way and a rebuild: ~1-2 min each on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kill", ["SIGKILL", "SIGINT"])
def test_tasks_of_a_killed_client_cannot_write_into_a_rebuilt_store(cluster, reference, tmp_path, kill):
    from common.store import verify_chunks

    address, stall = cluster
    out = tmp_path / "s.zarr"
    build = [sys.executable, "-m", "preprocess.cli", "build", "--out", str(out), *FLAGS, "--scheduler", address]
    old = spawn([*build, "--erosion", "0.03"], tmp_path / "old.log")
    try:
        until("two chunks of the old build", lambda: (g := store_group(out)) is not None and "generation" in g.attrs
              and g["chunk_done"][...].sum() >= 2, 300, [old])
        (stall / store_group(out).attrs["generation"]).touch()  # from now on each worker holds back one old task
        until("a held task on each worker", lambda: len(list(stall.glob("*-stalled-*"))) == 2, 120, [old])
        os.kill(old.pid, getattr(signal, kill))  # the client only: its running tasks stay on the workers
        assert old.wait(60) == (130 if kill == "SIGINT" else -9), (tmp_path / "old.log").read_text()[-2000:]
    finally:
        stop(old)
    held = {p.name.split("-stalled-")[0]: int(p.name.split("-")[-1]) for p in stall.glob("*-stalled-*")}

    new = spawn([*build, "--erosion", "0.05", "--overwrite"], tmp_path / "new.log")
    try:
        assert new.wait(600) == 0, (tmp_path / "new.log").read_text()[-3000:]
    finally:
        stop(new)
    # the held write inside write_chunk landed after the rebuild wrote that chunk: its final check rewrote it
    assert f"chunk {held['inside']}:" in (tmp_path / "new.log").read_text(), (tmp_path / "new.log").read_text()
    until("the held tasks to end", lambda: all(stall.glob(f"{m}-[wr]*-{c}") for m, c in held.items()), 120)
    ended = {m: sorted(p.name for p in stall.glob(f"{m}-*-{c}") if "stalled" not in p.name) for m, c in held.items()}
    # the race happened: each held task was released only after the rebuild had completed its chunk
    assert ended == {"before": [f"before-refused-first-{held['before']}"],
                     "inside": [f"inside-refused-second-{held['inside']}"]}, ended

    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    assert dict(got.attrs)["config"]["stages"]["uvgt"]["erosion_frac"] == 0.05
    names = sorted(k for k in want.array_keys() if want[k].shape[:1] == (COUNT,))
    assert {"uv_gt", "uv_gt_mask", "face_mask_eroded", "uv_source", "uv_bl"} <= set(names)
    for name in names:
        a, b = got[name][...], want[name][...]
        bad = np.flatnonzero([not np.array_equal(x, y, equal_nan=a.dtype.kind == "f")
                              for x, y in zip(a, b, strict=True)])
        assert bad.size == 0, f"{name}: rows {bad.tolist()} differ from a clean build (held: {held})"
    np.testing.assert_array_equal(got["chunk_done"][...], want["chunk_done"][...])
    np.testing.assert_array_equal(got["chunk_record"][:, :32], want["chunk_record"][:, :32])  # [32:48]: the token
    assert verify_chunks(out) == {}
    check = subprocess.run([sys.executable, "-m", "preprocess.cli", "check", str(out), "--deep"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
