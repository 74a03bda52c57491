"""A real multi-process Dask cluster on 127.0.0.1 for the tests (``tests/test_fencing.py``,
``tests/test_cluster_faults.py``): a ``dask scheduler`` and ``dask worker`` processes (each worker a nanny and its
worker process), each started in its own process group so that a test can kill one, and everything can be killed
at the end even when the test fails. Plus the small process helpers the tests share."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]


def spawn(args: Sequence[str], log: Path, **env: str) -> subprocess.Popen:
    """A subprocess in its own process group (so it and its children can be killed together), output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(list(args), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and its process group: SIGTERM, then SIGKILL after 10 s. A no-op once it has exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def until(what: str, cond: Callable[[], object], timeout: float, procs: Sequence[subprocess.Popen] = ()) -> None:
    """Poll ``cond`` every 0.1 s; fail the test after ``timeout`` s or as soon as one of ``procs`` has exited."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"waiting for {what}: {dead[0].args[:4]} exited with {dead[0].returncode}")
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout} s")


def store_group(out: Path) -> zarr.Group | None:
    """The store at ``out`` once its creation has written the root attributes; None before."""
    try:
        g = zarr.open_group(str(out), mode="r")
        return g if "schema_version" in g.attrs else None
    except (FileNotFoundError, KeyError, ValueError):
        return None


@dataclass
class DaskCluster:
    """A running scheduler and its workers: ``address``, and the processes (``workers[i]`` is the ``dask worker``
    command of worker i: the nanny, in a process group with its worker process)."""

    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]

    def n_workers(self) -> int:
        """Workers the scheduler knows now."""
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            return len(client.scheduler_info()["workers"])


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, worker_env: Sequence[Mapping[str, str]] = ({}, {}), nthreads: int = 2,
                 preload: Path | None = None) -> Iterator[DaskCluster]:
    """Start ``dask scheduler`` and one ``dask worker`` per ``worker_env`` entry (its extra environment) on
    127.0.0.1, wait until every worker has joined, yield the cluster; stop every process group on exit (also when the
    test failed). Logs: ``tmp_path/scheduler.log``, ``tmp_path/worker-<i>.log``."""
    sched_file = tmp_path / "scheduler.json"
    scheduler = spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                       "--scheduler-file", str(sched_file), "--no-dashboard"], tmp_path / "scheduler.log")
    workers: list[subprocess.Popen] = []
    try:
        until("the scheduler file", sched_file.exists, 60, [scheduler])
        extra = ["--preload", str(preload)] if preload is not None else []
        for i, env in enumerate(worker_env):
            workers.append(spawn([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                  str(sched_file), "--nthreads", str(nthreads), "--nworkers", "1", "--no-dashboard",
                                  "--host", "127.0.0.1", *extra], tmp_path / f"worker-{i}.log", **env))
        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(len(workers), timeout=120)
        yield DaskCluster(address, scheduler, workers)
    finally:
        for p in reversed([scheduler, *workers]):
            stop(p)
