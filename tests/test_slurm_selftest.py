"""``pipelines/slurm/selftest.sh``: a real single-node SLURM (Debian's slurm-wlm and munge, daemons started by the
script on localhost from a private folder) runs ``uvprep build --cluster slurm``, ``pipelines/slurm/build.sbatch``
and ``pipelines/slurm/train.sbatch`` preempted with SIGUSR1, requeued and resumed. Slow (minutes) and root only:
``pytest -m slow tests/test_slurm_selftest.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "pipelines" / "slurm" / "selftest.sh"
SLURM_BINS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel",
              "srun")


def _cannot_run() -> str | None:
    """Why the self-test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: the script starts munged, slurmctld and slurmd and runs the jobs as root"
    missing = [b for b in SLURM_BINS if shutil.which(b) is None]
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    policy = subprocess.run(["apt-cache", "policy", "slurm-wlm", "munge"], capture_output=True, text=True).stdout
    if "Candidate: (none)" in policy or "Candidate:" not in policy:
        return "SLURM is not installed and apt has no slurm-wlm / munge candidate (run apt-get update)"
    return None


def test_selftest_script_parses_and_refuses_unknown_options():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    res = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --frobnicate" in res.stderr
    text = SCRIPT.read_text()
    for part in ("SLURM_CONF=", "trap cleanup EXIT", "--cluster slurm", "pipelines/slurm/build.sbatch",
                 "pipelines/slurm/train.sbatch", "scancel --batch --signal=USR1"):
        assert part in text, part


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_selftest_passes_on_a_real_single_node_slurm(tmp_path):
    """The whole script: every check PASS, exit 0, and the daemons it started are gone afterwards."""
    reason = _cannot_run()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "selftest"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--workdir", str(work), "--venv", sys.prefix],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the script cancels its jobs and stops its daemons
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"selftest.sh ran over 1500 s:\n{(stdout + stderr)[-6000:]}")
    assert proc.returncode == 0, (stdout + stderr)[-6000:]
    summary = stdout.split("SLURM self-test:", 1)[1]
    assert "FAIL" not in summary and summary.count("PASS  ") >= 12, summary
    for name in ("slurmctld", "slurmd", "munged"):  # stopped: a pid file left behind names no such process
        pid_file = work / "run" / f"{name}.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        assert not (pid and _command(int(pid)) == name), f"{name} (pid {pid}) still runs"


def _command(pid: int) -> str | None:
    """The command name of process ``pid``, None when there is none."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None
