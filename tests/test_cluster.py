"""``uvprep build`` on SLURM, without SLURM: the job script dask-jobqueue writes for given flags, flag refusals
before any store exists, a ``--cluster slurm`` build through stand-in ``sbatch``/``scancel`` that run each job
here (bytewise equal to an eager build), and ``pipelines/slurm/build.sbatch`` (syntax, commands, and a slow run
through a stand-in ``srun``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT
from test_build import SMALL, _assert_same_arrays

from pipelines.dask_slurm import make_slurm_cluster
from preprocess.build import build_store
from preprocess.buildcli import make_config, run_build, slurm_config
from preprocess.config import BuildArgs

TEMPLATE = ROOT / "pipelines" / "slurm" / "build.sbatch"

FAKE_SBATCH = """#!/usr/bin/env bash
# stand-in: run the job script in the background in its own session; the job id is its pid (= its group)
job=$(mktemp "$FAKE_SLURM/job-XXXXXX")
cp "${@: -1}" "$job"
setsid bash "$job" >"$job.log" 2>&1 </dev/null &
echo "$!" >>"$FAKE_SLURM/submitted"
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
for id in "$@"; do echo "$id" >>"$FAKE_SLURM/cancelled"; kill -TERM -- "-$id" 2>/dev/null; done
exit 0
"""
FAKE_SRUN = """#!/usr/bin/env bash
# stand-in: run the step's command once, here
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A folder of stand-in SLURM commands, first on PATH (after this interpreter's bin: dask, uvprep)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                                os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    return tmp_path


def test_job_script_from_flags(fake_slurm, tmp_path):
    args = BuildArgs(out=tmp_path / "s.zarr", cluster="slurm", threads=2, slurm_cores=8, slurm_memory="32GB",
                     slurm_walltime="02:30:00", slurm_partition="cpu", slurm_account="proj42",
                     slurm_job_extra=["--constraint=skylake", "--qos=short"],
                     slurm_prologue=["source .venv/bin/activate"], slurm_min_jobs=2, slurm_max_jobs=6,
                     slurm_local_directory="/scratch/w", slurm_log_directory=str(tmp_path / "logs"))
    cfg = slurm_config(args)
    assert (cfg.min_jobs, cfg.max_jobs) == (2, 6)
    cluster = make_slurm_cluster(cfg, threads=2, adapt=False)  # submits nothing
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    for expected in ("#SBATCH -p cpu", "#SBATCH -A proj42", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G",
                     "#SBATCH -t 02:30:00", "#SBATCH --constraint=skylake", "#SBATCH --qos=short",
                     "#SBATCH -J uvprep-worker", f"#SBATCH -o {tmp_path / 'logs'}/uvprep-worker-%J.out",
                     "source .venv/bin/activate"):
        assert expected in lines, f"{expected!r} not in\n{script}"
    worker = lines[-1]  # the worker command comes last, after the prologue
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://"), worker
    for part in ("--nthreads 2", "--nworkers 4", "--memory-limit 7.45GiB", "--local-directory /scratch/w"):
        assert part in worker, worker
    assert lines.index("source .venv/bin/activate") < len(lines) - 1


@pytest.mark.parametrize("flags,message", [
    ({"slurm_cores": 4}, "--slurm-cores needs --cluster slurm"),
    ({"slurm_job_extra": ["--qos=x"]}, "--slurm-job-extra needs --cluster slurm"),
    ({"cluster": "pbs"}, "--cluster 'pbs': expected local | slurm"),
    ({"cluster": "slurm", "scheduler": "tcp://127.0.0.1:8786"}, "--cluster slurm and --scheduler are exclusive"),
    ({"cluster": "slurm", "workers": 2}, "--cluster slurm and --workers are exclusive"),
    ({"cluster": "slurm", "slurm_cores": 0}, "--slurm-cores 0"),
    ({"cluster": "slurm", "slurm_cores": 6, "threads": 4}, "--slurm-cores 6 is not a multiple of --threads 4"),
    ({"cluster": "slurm", "slurm_memory": "lots"}, "--slurm-memory 'lots'"),
    ({"cluster": "slurm", "slurm_walltime": "4h"}, "--slurm-walltime '4h'"),
    ({"cluster": "slurm", "slurm_min_jobs": 3, "slurm_max_jobs": 2}, "--slurm-min-jobs 3 / --slurm-max-jobs 2"),
    ({"cluster": "slurm", "slurm_max_jobs": 0}, "--slurm-max-jobs 0"),
    ({"cluster": "slurm", "slurm_job_extra": ["qos=short"]}, "--slurm-job-extra 'qos=short'"),
])
def test_bad_cluster_flags_fail_before_a_store_exists(fake_slurm, tmp_path, capsys, flags, message):
    code = run_build(BuildArgs(out=tmp_path / "s.zarr", count=2, **flags))
    out = capsys.readouterr()
    assert code == 2 and message in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1, out.err
    assert not (tmp_path / "s.zarr").exists()
    assert not (tmp_path / "submitted").exists()


def test_slurm_needs_sbatch_and_jobqueue(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert run_build(BuildArgs(out=tmp_path / "s.zarr", count=2, cluster="slurm")) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    assert run_build(BuildArgs(out=tmp_path / "s.zarr", count=2, cluster="slurm")) == 2
    err = capsys.readouterr().err
    assert "needs dask-jobqueue" in err and "pip install" in err, err
    assert not (tmp_path / "s.zarr").exists()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_slurm_build_matches_eager_and_cancels_its_jobs(fake_slurm, tmp_path):
    cfg, run = make_config(BuildArgs(out=tmp_path / "slurm.zarr", cluster="slurm", slurm_cores=2,
                                     slurm_max_jobs=1, **SMALL))
    assert run.slurm is not None and run.workers == 0
    summary = build_store(cfg, replace(run, progress=False))
    assert summary.complete and summary.ok == 8
    eager_cfg, eager_run = make_config(BuildArgs(out=tmp_path / "eager.zarr", workers=0, **SMALL))
    build_store(eager_cfg, replace(eager_run, progress=False))
    _assert_same_arrays(tmp_path / "slurm.zarr", tmp_path / "eager.zarr")
    jobs = (fake_slurm / "submitted").read_text().split()
    assert len(jobs) == 1
    assert (fake_slurm / "cancelled").read_text().split() == jobs  # closed at the end: the job was cancelled
    deadline = time.monotonic() + 30
    while not all(_gone(int(j)) for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(int(j)) for j in jobs)


def test_sbatch_template_parses_and_runs_scheduler_workers_build():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
    text = TEMPLATE.read_text()
    for part in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "dask scheduler --scheduler-file",
                 "srun --ntasks-per-node=1", "dask worker --scheduler-file", 'uvprep build --scheduler "$ADDRESS"',
                 '"$@"', ".shutdown()"):
        assert part in text, part
    assert "/home/" not in text and "/scratch" not in text  # no site paths


@pytest.mark.slow
def test_sbatch_template_builds_a_store(fake_slurm, tmp_path):
    """The template end to end on this machine: srun runs the worker step once, here."""
    env = {**os.environ, "ENV_SETUP": ":", "SLURM_CPUS_PER_TASK": "2", "SHARED_DIR": str(tmp_path / "dask")}
    flags = [x for k, v in {**SMALL, "count": 4, "pca_samples": 4}.items()
             for x in (f"--{k.replace('_', '-')}", str(v))]
    res = subprocess.run(["bash", str(TEMPLATE), "--out", str(tmp_path / "s.zarr"), *flags], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "samples in store" in res.stdout + res.stderr
    assert not (tmp_path / "dask").exists()
    check = subprocess.run([sys.executable, "-m", "preprocess.cli", "check", str(tmp_path / "s.zarr")],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr


STUB_UVPREP = """#!/usr/bin/env bash
# stand-in: record the flags the template passes (the scheduler's address among them)
echo "$@" >"$FAKE_SLURM/uvprep-args"
"""


def test_sbatch_template_scheduler_starts_when_the_default_port_is_taken(fake_slurm, tmp_path):
    """Another program holds dask's default port 8786 (another build job's scheduler on a shared node): the
    template's scheduler starts on a free port all the same. It used the default port, and then waited its whole
    STARTUP_S for a scheduler file that never came."""
    for name, text in (("srun", "#!/usr/bin/env bash\nexit 0\n"), ("uvprep", STUB_UVPREP)):  # no workers, no build
        (fake_slurm / "fakebin" / name).write_text(text)
        (fake_slurm / "fakebin" / name).chmod(0o755)
    holder = socket.socket()
    try:
        holder.bind(("", 8786))
        holder.listen()
    except OSError:  # held by another program already: the same situation
        pass
    try:
        env = {**os.environ, "ENV_SETUP": ":", "SLURM_CPUS_PER_TASK": "1", "SHARED_DIR": str(tmp_path / "dask"),
               "STARTUP_S": "60"}
        res = subprocess.run(["bash", str(TEMPLATE), "--out", str(tmp_path / "s.zarr")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    assert res.returncode == 0, res.stderr[-3000:]
    args = (tmp_path / "uvprep-args").read_text().split()
    address = args[args.index("--scheduler") + 1]
    assert address.startswith("tcp://") and not address.endswith(":8786"), address
    assert not (tmp_path / "dask").exists()
