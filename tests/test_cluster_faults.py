"""Fault tolerance at scale, for real (issue 13), on one machine over loopback:

* a Dask worker process killed (``kill -9``; its nanny starts a new one), or a whole "node" lost (the nanny and its
  worker killed together), while ``uvprep build --scheduler`` runs: Dask reschedules the lost tasks and the build
  finishes with arrays identical byte for byte to a clean local build. The kill lands at a known point: a worker
  preload (``tests/hold_worker.py``) holds one chunk write after its data and before its completion record, while
  other chunks are complete and others not yet written;
* the client killed mid-build: the same command again resumes (the chunks complete at the kill are skipped, not
  rewritten) and ends with the same arrays (``tests/test_fencing.py`` covers a killed client followed by a rebuild
  with another config);
* a DDP rank killed (``kill -9``) or frozen (``SIGSTOP``: a node gone from the network) in a two-process CPU
  ``torchrun`` run of ``uvtrain fit``: the job fails within a bounded time (``--dist-timeout`` for the frozen rank),
  and the same command again resumes from the last checkpoint and ends at the last step; and a short ``torchrun``
  run whose ranks see disjoint data and end with identical weights (``tests/ddp_probe.py``).

Every test starts its processes in process groups of their own and kills them all at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.daskcluster import ROOT, dask_cluster, spawn, stop, store_group, until
from tests.test_build import _assert_same_arrays

COUNT, CHUNK = 20, 2
FLAGS = ["--src", "synthetic", "--count", str(COUNT), "--chunk", str(CHUNK), "--image-size", "64", "--uv-size", "32",
         "--pca-samples", "8", "--n-tex", "2"]
HOLD = ROOT / "tests" / "hold_worker.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A clean in-process build with the same flags."""
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    cfg, run = make_config(BuildArgs(out=out, count=COUNT, chunk=CHUNK, image_size=64, uv_size=32, pca_samples=8,
                                     n_tex=2))
    assert build_store(cfg, dataclasses.replace(run, workers=0, progress=False)).complete
    return out


def _build_cmd(out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "preprocess.cli", "build", "--out", str(out), *FLAGS, "--scheduler", address]


def _done(out: Path) -> np.ndarray:
    g = store_group(out)
    return np.zeros(0, bool) if g is None or "generation" not in g.attrs else g["chunk_done"][...] == 1


def _assert_clean(out: Path, reference: Path) -> None:
    from common.store import verify_chunks

    assert _done(out).all()
    _assert_same_arrays(out, reference)
    assert verify_chunks(out) == {}


# ------------------------------------------------------------------------------------------------ Dask
@pytest.mark.slow  # a Dask cluster and a build through it: ~1 min on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.parametrize("lost", ["worker", "node"])
def test_a_worker_or_a_node_lost_mid_build_still_gives_the_clean_build(reference, tmp_path, lost):
    hold = tmp_path / "hold"
    hold.mkdir()
    out = tmp_path / "s.zarr"
    with dask_cluster(tmp_path, [{"UVTEX_HOLD_DIR": str(hold)}] * 2, preload=HOLD) as cluster:
        build = spawn(_build_cmd(out, cluster.address), tmp_path / "build.log")
        try:
            until("a chunk write held half done and two chunks complete",
                  lambda: any(hold.glob("held-*")) and _done(out).sum() >= 2, 300, [build])
            held = next(hold.glob("held-*"))
            chunk, pid = int(held.name.split("-")[1]), int(held.read_text())
            done = _done(out)
            assert not done[chunk] and done.sum() < len(done), done  # mid-build: the held chunk is not complete
            nanny = next(p for p in cluster.workers if p.pid == os.getpgid(pid))  # each worker is its own group
            if lost == "worker":  # the worker process only: its nanny notices and starts a new one
                os.kill(pid, signal.SIGKILL)
            else:  # the node: nanny and worker at once, nothing comes back
                os.killpg(nanny.pid, signal.SIGKILL)
                assert nanny.wait(30) == -signal.SIGKILL
            assert build.wait(600) == 0, (tmp_path / "build.log").read_text()[-3000:]
            if lost == "worker":
                until("the nanny's new worker process", lambda: cluster.n_workers() == 2, 120)
            else:
                assert cluster.n_workers() == 1
        finally:
            stop(build)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list(hold.glob("timeout-*"))  # the held write never went on: its task was redone elsewhere
    _assert_clean(out, reference)


@pytest.mark.slow  # a Dask cluster, a build killed half-way and its rerun: ~1-2 min on 2 cores
@pytest.mark.timeout(900)
def test_a_client_lost_mid_build_is_resumed_by_the_same_command(reference, tmp_path):
    out = tmp_path / "s.zarr"
    with dask_cluster(tmp_path) as cluster:
        cmd = _build_cmd(out, cluster.address)
        old = spawn(cmd, tmp_path / "old.log")
        try:
            until("two complete chunks", lambda: _done(out).sum() >= 2, 300, [old])
            os.kill(old.pid, signal.SIGKILL)  # the client only: tasks it submitted may still run on the workers
            assert old.wait(60) == -signal.SIGKILL
        finally:
            stop(old)
        done_at_kill, old_generation = _done(out), store_group(out).attrs["generation"]
        assert 0 < done_at_kill.sum() < len(done_at_kill), done_at_kill
        new = spawn(cmd, tmp_path / "new.log")  # the same command, no --overwrite
        try:
            assert new.wait(600) == 0, (tmp_path / "new.log").read_text()[-3000:]
        finally:
            stop(new)
    log = (tmp_path / "new.log").read_text()
    skipped = int(re.search(r"chunks already complete \(skipped\)\D*(\d+)", log).group(1))
    assert skipped >= done_at_kill.sum(), log
    g = store_group(out)
    token = {gen: bytes.fromhex(gen)[:16] for gen in (old_generation, g.attrs["generation"])}
    assert g.attrs["generation"] != old_generation
    records = np.asarray(g["chunk_record"][...], np.uint8)
    writer = [bytes(r[32:48]) for r in records]
    # what was complete at the kill was kept, not redone; the rerun wrote the rest
    assert all(writer[c] == token[old_generation] for c in np.flatnonzero(done_at_kill)), writer
    assert set(writer) <= set(token.values()) and token[g.attrs["generation"]] in writer, writer
    _assert_clean(out, reference)


# ------------------------------------------------------------------------------------------------- DDP
def _fit_flags(store: str, run_dir: Path, sampler_steps: int, generator_steps: int) -> list[str]:
    return ["fit", "--store", store, "--run-dir", str(run_dir), "--sampler-steps", str(sampler_steps),
            "--sampler-finetune-steps", "0", "--generator-steps", str(generator_steps), "--batch-size", "2",
            "--image-size", "64", "--sampler-image-size", "48", "--sampler-grid", "16", "--channels", "8",
            "--workers", "0", "--identity", "none", "--log-every", "1", "--no-progress", "--no-tensorboard"]


def _torchrun(*args: str) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) with two CPU processes on this machine. After a rank
    failed, torchrun gives the others 30 s to end before it kills them (its ``--shutdown-timeout`` does not apply
    there)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # not a zombie
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _torchrun_job(cmd: list[str], log: Path, **env: str):
    """Run ``cmd`` (a torchrun command) and yield (its Popen, ``ranks()``: rank -> pid of its trainer processes).
    torchrun starts every rank in a session of its own, so on exit (also when the test failed) torchrun's group is
    stopped and then every rank process seen is killed."""
    job = spawn(cmd, log, OMP_NUM_THREADS="1", **env)
    seen: dict[int, tuple[int, str | None]] = {}

    def ranks() -> dict[int, int]:
        for task in Path(f"/proc/{job.pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for pid in map(int, (task / "children").read_text().split()):
                    env = (kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0"))
                    rank = dict(kv for kv in env if len(kv) == 2).get("RANK")
                    if rank is not None:
                        seen[int(rank)] = (pid, _start_time(pid))
        return {r: pid for r, (pid, _) in seen.items()}

    try:
        yield job, ranks
    finally:
        if job.poll() is None:
            ranks()
        stop(job)
        for pid, started in seen.values():
            if started is not None and _start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _metric_steps(run_dir: Path) -> list[int]:
    import json

    from train.runs import METRICS

    path = run_dir / METRICS
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


@pytest.mark.slow  # two torchrun jobs of two trainer processes each: ~1 min on 2 cores
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_fails_the_torchrun_job_and_the_same_command_resumes(train_store, tmp_path, fault):
    """Rank 1 killed (``kill -9``: its connections close, rank 0 fails at its next collective) or frozen
    (``SIGSTOP``: like a node gone from the network, nothing closes; ``--dist-timeout`` bounds rank 0's wait, else
    it would wait torch's 30 min): torchrun exits non-zero in bounded time and leaves no process behind; the same
    command again resumes from the last checkpoint and ends at the last step."""
    import time

    import torch

    from train.runs import CHECKPOINT

    rd, total = tmp_path / "r", 12
    cmd = _torchrun("-m", "train.cli", *_fit_flags(train_store, rd, total, 0), "--checkpoint-every", "2",
                    "--dist-timeout", "10")
    with _torchrun_job(cmd, tmp_path / "job.log") as (job, ranks):
        until("step 5", lambda: len(_metric_steps(rd)) >= 5, 300, [job])
        pids = ranks()
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        code = job.wait(120)  # bounded: rank 0 must not wait for the lost rank for ever
        waited = time.monotonic() - t0
        left = [pid for pid in pids.values() if _alive(pid)]
    log = (tmp_path / "job.log").read_text()
    assert code != 0 and not left, (code, left, log[-3000:])
    if fault == "frozen":
        assert "Timed out" in log, log[-3000:]
    step = torch.load(rd / CHECKPOINT, weights_only=True)["step"]
    assert 0 < step < total and step % 2 == 0, step
    print(f"{fault}: torchrun exited {code} {waited:.1f} s after rank 1 was lost; last checkpoint at step {step}")

    with _torchrun_job(cmd, tmp_path / "rerun.log") as (rerun, _):
        assert rerun.wait(300) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert torch.load(rd / CHECKPOINT, weights_only=True)["step"] == total
    assert _metric_steps(rd) == list(range(1, total + 1))  # rows after the checkpoint were dropped and redone


@pytest.mark.slow  # a torchrun job of two trainer processes: ~30 s on 2 cores
@pytest.mark.timeout(600)
def test_torchrun_ranks_see_disjoint_data_and_end_with_the_same_weights(train_store, tmp_path):
    import torch

    from train.runs import CHECKPOINT

    rd = tmp_path / "r"
    cmd = _torchrun(str(ROOT / "tests" / "ddp_probe.py"), *_fit_flags(train_store, rd, 3, 2))
    with _torchrun_job(cmd, tmp_path / "job.log", UVTEX_PROBE_OUT=str(tmp_path)) as (job, _):
        assert job.wait(300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["seen"]) == len(r1["seen"]) == 5
    for step, (a, b) in enumerate(zip(r0["seen"], r1["seen"], strict=True)):
        assert len(a) == len(b) == 2 and not set(a) & set(b), (step, a, b)
    ck = torch.load(rd / CHECKPOINT, weights_only=True)
    assert ck["step"] == 5
    saved = {f"{m[0]}.{k}": v for m in ("sampler", "generator") for k, v in ck["models"][m].items()}
    assert set(saved) == set(r0["state"]) == set(r1["state"])
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
