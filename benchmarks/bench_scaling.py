"""Benchmark: ``uvprep build`` throughput in-process vs on Dask (local cluster and a real scheduler, 1 and 2 workers),
where the serial time goes, and a model of the speed-up at 64 and 512 workers (and of an FFHQ build).

One synthetic store (``--samples`` faces at ``--image-size``, the default PCA texture basis learned from all of them)
is built five ways, on the same inputs, in this order:

* ``eager``     -- ``--workers 0``: every task in this process;
* ``local W``   -- ``--workers W`` (W = 1, 2): ``build_store`` starts a local cluster and closes it, as the CLI does;
* ``sched W``   -- ``--scheduler ADDRESS`` against a ``dask scheduler`` and W ``dask worker`` processes (one thread
  each) started beforehand on 127.0.0.1 and warmed with one import, as on a cluster.

Per build: wall time (min / median over ``--repeats``), CPU seconds of this process (the client; with a local
cluster its scheduler too), of the scheduler process and of every worker process (psutil), and the build's own
profile (:class:`preprocess.executor.BuildProfile`: this process's phases, every task's CPU). A CPU-only control
(pure-Python tasks, nothing shared) on the same 2-worker cluster shows what the cores give two processes right now:
on a busy machine every wall-clock ratio is bounded by it, the CPU-time terms below are not.

The model (fitted on the ``sched 1`` build's measured terms):

    T(W) = T_serial + T_setup + ceil(P_tasks(W) / W) * t_pre(W) + ceil(C / W) * (t_chunk + t_check) + n_tasks * t_sched

T_serial: this process's setup (manifest, face model, layouts, store creation) + the PCA and the basis write (no task
runs meanwhile); T_setup: one worker's setup (imports + face model, fitter, layout caches, measured here once);
P pre-pass maps in P_tasks(W) batches (``preprocess.build._learn_basis``: about 4 per worker thread) of t_pre each;
C chunks of t_chunk (CPU per sample x chunk) and their re-read t_check; t_sched the scheduler's CPU per task (serial in
its event loop). Speed-up S(W) = T(1) / T(W). The FFHQ line scales the per-sample costs measured at 256² on a
``--probe`` build (the synthetic source at the FFHQ working size: its "decode" renders the face, an FFHQ build decodes a
1024² PNG and runs the 3DDFA_V2 fitter instead) to 70 000 samples with 1024 pre-pass maps (PCA time linear in maps).

    python benchmarks/bench_scaling.py                  # quick: 64 samples at 64², ~2 min on 2 quiet cores
    python benchmarks/bench_scaling.py --samples 256    # the issue's target (>= 1.8x on 2 workers), < 10 min

Absolute times depend on the machine and on whatever else runs on its cores; compare the ratios and CPU terms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_build import Table, _spin, _warm  # noqa: E402 - one table format, one CPU-only control


@dataclass
class Run:
    """One build: wall seconds, CPU seconds per process (client, scheduler, workers), the build's profile."""

    wall: float
    cpu: dict[str, float]
    profile: object
    summary: object


@dataclass
class Mode:
    name: str
    runs: list[Run] = field(default_factory=list)

    def walls(self) -> list[float]:
        return [r.wall for r in self.runs]


def make_cfg(n: int, size: int, chunk: int, n_tex: int, pca_samples: int | None = None):
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, _ = make_config(BuildArgs(out=Path("unused"), count=n, image_size=size, uv_size=size, chunk=chunk,
                                   n_tex=n_tex, pca_samples=pca_samples or n, workers=0))
    return cfg


def _cpu(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds of each named group of processes."""
    out = {}
    for name, group in procs.items():
        out[name] = 0.0
        for p in group:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[name] += t.user + t.system
    return out


def build_once(cfg, out: Path, procs: dict[str, list[psutil.Process]], **run_kw) -> Run:
    """One build from scratch; CPU seconds of this process and of ``procs`` (a running cluster's) over it. A local
    cluster's workers come and go with the build: their tasks' CPU is in the build's profile."""
    from preprocess.build import build_store
    from preprocess.config import RunOptions

    shutil.rmtree(out, ignore_errors=True)
    c0, p0, t0 = _cpu(procs), time.process_time(), time.perf_counter()
    summary = build_store(cfg, RunOptions(out=str(out), progress=False, **run_kw))
    wall = time.perf_counter() - t0
    cpu = {"client": time.process_time() - p0}
    c1 = _cpu(procs)
    cpu.update({k: c1[k] - c0[k] for k in c1 if k in c0})
    if not summary.complete:
        raise RuntimeError(f"build of {out} failed: {summary.failed_chunks}")
    return Run(wall, cpu, summary.profile, summary)


@contextlib.contextmanager
def dask_cluster(tmp: Path, workers: int):
    """``dask scheduler`` + ``workers`` one-thread ``dask worker`` processes on 127.0.0.1; yields (address, processes
    by name: scheduler, worker0, ...). Stopped on exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sfile = tmp / f"scheduler-{workers}.json"
    spawned = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--scheduler-file", str(sfile), "--no-dashboard"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        t0 = time.time()
        while not sfile.exists():
            if time.time() - t0 > 60:
                raise RuntimeError("the dask scheduler did not start within 60 s")
            time.sleep(0.1)
        spawned += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                      str(sfile), "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--host",
                                      "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                    for _ in range(workers)]
        address = json.loads(sfile.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
            client.gather(client.map(_warm, range(workers), pure=False))
            client.gather(client.map(_warm, range(workers), pure=False))  # (the second lands on the other worker)
        procs = {"scheduler": [psutil.Process(spawned[0].pid)]}
        for i, cmd in enumerate(spawned[1:]):  # `dask worker` (the nanny) and its worker process
            procs[f"worker{i}"] = [psutil.Process(cmd.pid), *psutil.Process(cmd.pid).children(recursive=True)]
        yield address, procs
    finally:
        for p in reversed(spawned):
            p.terminate()
        for p in spawned:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)


def control(address: str, scheduler: psutil.Process, tasks: int = 8, noops: int = 400) -> tuple[float, float]:
    """Seconds of ``tasks`` CPU-only pure-Python tasks (:func:`benchmarks.bench_build._spin`) on the cluster, and the
    scheduler's CPU seconds per task (``noops`` empty tasks, less its idle rate over as long)."""
    from distributed import Client

    with Client(address) as client:
        t0 = time.perf_counter()
        client.gather(client.map(_spin, range(tasks), pure=False))
        spin = time.perf_counter() - t0
        c0, t0 = sum(scheduler.cpu_times()[:2]), time.perf_counter()
        client.gather(client.map(_noop, range(noops), pure=False))
        busy, wall = sum(scheduler.cpu_times()[:2]) - c0, time.perf_counter() - t0
        c0 = sum(scheduler.cpu_times()[:2])
        time.sleep(wall)
        idle = sum(scheduler.cpu_times()[:2]) - c0
        return spin, max(busy - idle, 0.0) / noops


def _noop(i: int) -> int:
    return i


def worker_setup_seconds(cfg) -> float:
    """CPU seconds of one worker's per-build setup: the StageContext (face model, fitter, layout caches)."""
    from preprocess.stages import StageContext

    c0 = time.process_time()
    StageContext.build(cfg.stages)
    return time.process_time() - c0


@dataclass(frozen=True)
class Terms:
    """The model's measured terms (seconds)."""

    n: int
    pre_maps: int
    chunk: int
    serial: float
    """This process: setup + PCA + basis write (wall of a run where it had the cores to itself)."""
    pca: float
    """Of which the PCA + basis write."""
    setup: float
    """One worker's setup (CPU)."""
    pre_sample: float
    """Pre-pass CPU per map."""
    chunk_sample: float
    """Chunk CPU per sample."""
    check_chunk: float
    """Re-read CPU per chunk."""
    sched_task: float
    """Scheduler CPU per task."""

    def time(self, w: int, n: int | None = None, pre_maps: int | None = None, chunk: int | None = None) -> float:
        n, p, c = n or self.n, pre_maps or self.pre_maps, chunk or self.chunk
        pca = self.pca * p / self.pre_maps  # randomised SVD: linear in the number of maps
        size = max(1, min(c, math.ceil(p / (4 * w))))
        pre_tasks = math.ceil(p / size)
        chunks = math.ceil(n / c)
        rounds = math.ceil(chunks / w)
        return (self.serial - self.pca + pca + self.setup + math.ceil(pre_tasks / w) * size * self.pre_sample
                + rounds * (c * self.chunk_sample + self.check_chunk) + (pre_tasks + 2 * chunks) * self.sched_task)

    def speedup(self, w: int, **kw) -> float:
        return self.time(1, **kw) / self.time(w, **kw)


def terms_from(run: Run, n: int, pre_maps: int, chunk: int, setup: float, sched_task: float) -> Terms:
    """The model's terms: this process's serial phases as CPU seconds (its wall time on a busy machine is mostly
    waiting for a core), the tasks' CPU per sample, the scheduler's CPU per task (measured with empty tasks)."""
    p = run.profile
    return Terms(n=n, pre_maps=pre_maps, chunk=chunk, serial=p.phase_cpu["setup"] + p.phase_cpu["pca"],
                 pca=p.phase_cpu["pca"], setup=setup, pre_sample=p.task_cpu["prepass"] / pre_maps,
                 chunk_sample=p.task_cpu["chunk"] / n, check_chunk=p.task_cpu["check"] / max(p.tasks["check"], 1),
                 sched_task=sched_task)


def probe(tmp: Path, size: int, n: int) -> tuple[float, float]:
    """Per-sample CPU (pre-pass, chunk) of an in-process build of ``n`` samples at ``size``² (the FFHQ size)."""
    run = build_once(make_cfg(n, size, n, 40), tmp / "probe.zarr", {}, workers=0)
    return run.profile.task_cpu["prepass"] / n, run.profile.task_cpu["chunk"] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64, help="samples per build (the issue's target: >= 256)")
    ap.add_argument("--image-size", type=int, default=64, help="working image size = UV size of the builds")
    ap.add_argument("--chunk", type=int, default=32, help="samples per chunk")
    ap.add_argument("--n-tex", type=int, default=16, help="texture basis components")
    ap.add_argument("--pca-samples", type=int, default=64, help="maps the PCA basis is learned from (pre-pass)")
    ap.add_argument("--repeats", type=int, default=1, help="builds per mode")
    ap.add_argument("--modes", default="eager,local1,local2,sched1,sched2", help="which builds to run")
    ap.add_argument("--probe", type=int, default=8, help="samples of the 256² probe build for the FFHQ line (0: none)")
    args = ap.parse_args()
    n, size, chunk = args.samples, args.image_size, args.chunk
    cfg = make_cfg(n, size, chunk, args.n_tex, args.pca_samples)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    modes: dict[str, Mode] = {}
    controls: dict[int, float] = {}
    sched_task: dict[int, float] = {}
    wanted = args.modes.split(",")
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    try:
        setup = worker_setup_seconds(cfg)
        for name in wanted:
            m = modes.setdefault(name, Mode(name))
            for r in range(args.repeats):
                print(f"{name}: build {r + 1}/{args.repeats} of {n} samples at {size}², chunk {chunk} ...", flush=True)
                if name == "eager":
                    m.runs.append(build_once(cfg, tmp / "s.zarr", {}, workers=0))
                elif name.startswith("local"):
                    m.runs.append(build_once(cfg, tmp / "s.zarr", {}, workers=int(name[5:])))
                elif name.startswith("sched"):
                    w = int(name[5:])
                    with dask_cluster(tmp, w) as (address, procs):
                        if r == 0:
                            controls[w], sched_task[w] = control(address, procs["scheduler"][0])
                        m.runs.append(build_once(cfg, tmp / "s.zarr", procs, scheduler=address))
                else:
                    raise SystemExit(f"--modes: unknown mode {name!r} (eager, localW, schedW)")
        pre256 = probe(tmp, 256, args.probe) if args.probe else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()[0]
    print_report(modes, controls, sched_task, args, setup, pre256, (load0, load1), time.perf_counter() - t_all)


def _ratio(modes: dict[str, Mode], a: str, b: str) -> str:
    if a in modes and b in modes:
        return f"{statistics.median(modes[b].walls()) / statistics.median(modes[a].walls()):.2f}x"
    return "n/a"


def print_report(modes, controls, sched_task, args, setup, pre256, loads, total) -> None:
    n, chunk = args.samples, args.chunk
    table = Table()
    for name, m in modes.items():
        note = {"local1": f"{_ratio(modes, 'local1', 'eager')} of eager's time",
                "local2": f"speed-up over local 1: {_ratio(modes, 'local2', 'local1')} (target >= 1.8x)",
                "sched1": f"{_ratio(modes, 'sched1', 'eager')} of eager's time",
                "sched2": f"speed-up over sched 1: {_ratio(modes, 'sched2', 'sched1')} (target >= 1.8x)"}.get(name, "")
        if name in ("local2", "sched2"):
            a, b = f"{name[:-1]}1", name
            if a in modes:
                note = f"speed-up over {a[:-1]} 1: {_ratio(modes, b, a)} (target >= 1.8x)"
        table.add(f"{name}: build wall", m.walls(), "s", note)
    if 1 in controls and 2 in controls:
        table.add("control: CPU-only tasks, 2 vs 1 worker", controls[1] / controls[2], "x",
                  "what the cores give two processes now (bounds every wall ratio)")
    for name, m in modes.items():
        r = m.runs[0]
        p = r.profile
        table.add(f"{name}: CPU client | sched | workers", r.cpu["client"], "s",
                  f"scheduler {r.cpu.get('scheduler', 0):.1f} s, workers "
                  + ", ".join(f"{r.cpu[k]:.1f}" for k in sorted(r.cpu) if k.startswith("worker")) + " s; tasks "
                  + ", ".join(f"{k} {p.task_cpu[k]:.1f} s/{p.tasks[k]}" for k in ("prepass", "chunk", "check")))
        table.add(f"{name}: phases (wall | client CPU)", sum(p.phase_wall.values()), "s",
                  ", ".join(f"{k} {v:.1f} | {p.phase_cpu[k]:.1f}" for k, v in p.phase_wall.items()))
    table.print()

    base = modes.get("sched1") or modes.get("local1") or modes.get("eager")
    if base is None:
        return
    t = terms_from(base.runs[0], n, min(args.pca_samples, n), chunk, setup, sched_task.get(1, 0.0))
    print(f"\nmodel terms (from the {base.name} build, seconds): serial {t.serial:.2f} (of which PCA + basis write "
          f"{t.pca:.2f}); worker setup {t.setup:.2f}; pre-pass {t.pre_sample:.3f}/map; chunk {t.chunk_sample:.3f}/"
          f"sample; re-read {t.check_chunk:.3f}/chunk; scheduler {1000 * t.sched_task:.1f} ms/task")
    rows = [f"  this build ({n} samples, chunk {chunk}): " + ", ".join(
        f"S({w}) = {t.speedup(w):.2f}" for w in (2, 64, 512))]
    for c in (64, 16):
        big = dict(n=70_000, pre_maps=1024, chunk=c)
        rows.append(f"  the same costs, 70k samples, 1024 maps, chunk {c}: " + ", ".join(
            f"S({w}) = {t.speedup(w, **big):.1f}" for w in (2, 64, 512)))
    if pre256 is not None:
        scale = (pre256[0] / t.pre_sample, pre256[1] / t.chunk_sample)
        ff = Terms(n=70_000, pre_maps=1024, chunk=64, serial=t.serial - t.pca + t.pca * 1024 / t.pre_maps,
                   pca=t.pca * 1024 / t.pre_maps, setup=t.setup, pre_sample=pre256[0], chunk_sample=pre256[1],
                   check_chunk=t.check_chunk * scale[1], sched_task=t.sched_task)
        for c in (64, 16):
            cells = [f"{w} workers {_hms(ff.time(w, chunk=c))} (S {ff.speedup(w, chunk=c):.1f})"
                     for w in (1, 2, 64, 512)]
            rows.append(f"  FFHQ 70k at 256² (probe: pre-pass {pre256[0]:.2f} s/map, chunk {pre256[1]:.2f} s/sample), "
                        f"chunk {c}: " + ", ".join(cells))
    print("predicted speed-up, T(W) = serial + setup + pre-pass rounds + chunk rounds + scheduler:")
    print("\n".join(rows))
    print(f"\nbench_scaling: {n} synthetic samples at {args.image_size}², chunk {chunk}, n_tex {args.n_tex}, "
          f"{os.cpu_count()} cores, load average {loads[0]:.1f} -> {loads[1]:.1f}, {total:.0f} s in all")


def _hms(s: float) -> str:
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{s / 60:.1f} min"


if __name__ == "__main__":
    main()
