"""How the build's tasks run: eagerly in this process or on Dask workers (local, a scheduler, SLURM).

:class:`Runner` maps a task over argument tuples and yields results as they complete; :class:`BuildProfile` is
what it measures. :func:`set_compute_threads` and :func:`worker_cache` are for the tasks themselves: each sets its
worker's thread counts and keeps its reusable setup (face model, layouts, networks) on the worker. Used by
:func:`preprocess.build.build_store` and ``uvprep upgrade`` (:mod:`preprocess.upgrade`).
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.signals import signal_handlers

if TYPE_CHECKING:
    from preprocess.config import RunOptions


@dataclass
class BuildProfile:
    """Serial and parallel terms of one build, measured (see ``benchmarks/bench_scaling.py``).

    ``phase_wall`` / ``phase_cpu``: seconds of wall time and of this process's CPU time (all its threads; with a
    local cluster its scheduler runs here too) per phase of :func:`preprocess.build.build_store`: ``setup``
    (manifest, face model, layouts, store creation or checks), ``prepass`` (the pre-pass tasks), ``pca`` (learning
    and writing the texture basis here, while no task runs), ``chunks``, ``recheck``, ``close`` (cluster
    shut-down). ``task_cpu`` / ``task_wall`` / ``tasks``: the tasks' own CPU seconds (the thread that ran each: one
    worker thread with ``--threads 1``), wall seconds, and counts, summed per kind (``prepass``, ``chunk``,
    ``check``).
    """

    phase_wall: Counter = field(default_factory=Counter)
    phase_cpu: Counter = field(default_factory=Counter)
    task_cpu: Counter = field(default_factory=Counter)
    task_wall: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall and CPU time of the block to phase ``name``."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phase_wall[name] += time.perf_counter() - t0
            self.phase_cpu[name] += time.process_time() - c0


# -------------------------------------------------------------------------------------------- tasks
def set_compute_threads(torch_threads: int, cv2_threads: int | None = None) -> tuple[int, int]:
    """Set the intra-op threads of torch and OpenCV in this process; returns the previous (torch, cv2) counts.

    A worker with ``--threads T`` must use T cores, not all of them: OpenCV's default pool (one thread per
    core) made one "single-thread" worker use both cores of a 2-core machine and two workers fight over them
    (measured 0.94x for 2 workers vs 1 before, see benchmarks/bench_build.py).
    """
    import cv2
    import torch

    previous = (torch.get_num_threads(), cv2.getNumThreads())
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(torch_threads if cv2_threads is None else cv2_threads)
    return previous


def worker_cache() -> dict | None:
    """The executing Dask worker's own dict for reusable per-task setup; None outside a Dask worker.

    The face model, the UV-layout rasterisations, the crop layout, the mirror index and the fitter's networks
    depend only on the build config, yet cost 0.7 s (procedural) to 3 s (BFM + 3DDFA nets) to build; keeping them
    on the worker object (not in a module global) lets every chunk after the first on a worker skip that.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    if not hasattr(worker, "uvtex_contexts"):
        _heap_allocations_for_arrays()
        worker.uvtex_contexts = {}
    return worker.uvtex_contexts


def _heap_allocations_for_arrays(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> None:
    """Let glibc serve arrays below ``mmap_threshold`` bytes from the heap in this (worker) process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any malloc threshold switches off
    glibc's dynamic mmap threshold, which then stays at its 128 KiB floor: every image, UV map and mask above that is
    mmap'd and unmapped again, page faults and zeroing included. That cost 20-25 % of a chunk task's CPU against the
    same task in-process (``benchmarks/bench_scaling.py``). Memory above ``trim_threshold`` at the heap's top still
    goes back to the system. No-op where ``mallopt`` is not glibc's.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, mmap_threshold)
    mallopt(m_trim_threshold, trim_threshold)


# ------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def _workers_ignore_sigint():
    """Start worker processes with SIGINT ignored (the disposition is inherited): a Ctrl-C in the terminal reaches
    the whole process group, and only this process should handle it (it closes the cluster)."""
    with signal_handlers({signal.SIGINT: signal.SIG_IGN}):
        yield


def _timed(fn, *args):
    """Run ``fn(*args)`` (a task); returns (its result, the thread's CPU seconds, wall seconds)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    result = fn(*args)
    return result, time.thread_time() - c0, time.perf_counter() - t0


class Runner:
    """Maps a function over argument tuples, eagerly or on Dask; yields results as they complete.

    ``run`` (a :class:`preprocess.config.RunOptions`) says where: ``workers`` 0 with no ``scheduler`` or ``slurm``
    runs each task in this process. A task is called as ``fn(*args, None, cache)`` here (threads already set, the
    runner's own cache) and as ``fn(*args, threads)`` on a Dask worker (it then takes :func:`worker_cache`).
    ``profile`` (a :class:`BuildProfile`) collects each finished task's CPU and wall seconds under its ``key``.
    """

    def __init__(self, run: RunOptions, profile: BuildProfile | None = None):
        self.run = run
        self.profile = BuildProfile() if profile is None else profile
        self.cache: dict = {}  # eager mode: reusable per-task setup, kept for this run only
        self.client = None
        self.cluster = None
        self._previous_threads = None
        if run.scheduler is None and run.slurm is None and run.workers == 0:
            # eager: this process is the worker, so it gets the worker's thread count too (restored by close);
            # torch's default (all cores) oversubscribes a busy machine, where its spinning threads run ~8x slower
            self._previous_threads = set_compute_threads(run.threads)
        if run.scheduler is not None or run.slurm is not None or run.workers > 0:
            from dask.distributed import Client, LocalCluster

            if run.slurm is not None:  # SLURM jobs of workers; the scheduler runs here (pipelines/dask_slurm.py)
                from pipelines.dask_slurm import make_slurm_cluster

                self.cluster = make_slurm_cluster(run.slurm, run.threads)
                self.client = Client(self.cluster)
            elif run.scheduler is not None:
                try:
                    self.client = Client(run.scheduler, timeout="10s")
                except (OSError, ValueError) as e:
                    raise RuntimeError(f"cannot reach the Dask scheduler at --scheduler {run.scheduler} ({e}); is "
                                       f"it running (`dask scheduler`), and is the address right?") from None
            else:
                # Dask's scheduler always starts its HTTP server, on 8787 when dashboard_address is None (dask
                # distributed #8136): a random loopback port keeps 8787 free and nothing reachable from outside
                with _workers_ignore_sigint():
                    self.cluster = LocalCluster(n_workers=run.workers, threads_per_worker=run.threads,
                                                processes=True, dashboard_address="127.0.0.1:0")
                self.client = Client(self.cluster)

    def map(self, fn, arg_list, key: str):
        """Yield (args, result or exception) for each args tuple."""
        if self.client is None:
            for args in arg_list:
                try:
                    result = self._count(key, *_timed(fn, *args, None, self.cache))
                except Exception as e:  # noqa: BLE001 - reported per chunk, the build goes on
                    result = e
                yield args, result
            return
        from dask.distributed import as_completed

        tag = uuid.uuid4().hex[:8]
        futures = {self.client.submit(_timed, fn, *args, self.run.threads, key=f"{key}-{i}-{tag}",
                                      retries=self.run.retries, pure=False): args
                   for i, args in enumerate(arg_list)}
        for fut in as_completed(futures):
            try:
                result = self._count(key, *fut.result())
            except Exception as e:  # noqa: BLE001
                result = e
            yield futures[fut], result

    def slots(self) -> int:
        """Tasks that can run at once now: the connected workers' threads (1 in-process; at least 1)."""
        if self.client is None:
            return 1
        return max(1, sum(self.client.nthreads().values()))

    def _count(self, key: str, result, cpu: float, wall: float):
        self.profile.task_cpu[key] += cpu
        self.profile.task_wall[key] += wall
        self.profile.tasks[key] += 1
        return result

    def close(self):
        if self._previous_threads is not None:
            set_compute_threads(*self._previous_threads)
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
