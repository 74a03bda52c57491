"""A Dask cluster of SLURM jobs (dask-jobqueue's ``SLURMCluster``), for ``uvprep build --cluster slurm``.

The scheduler runs in the calling process (on the login / submit node); each SLURM job is ``cores // threads``
worker processes of ``threads`` threads, and the cluster adapts between ``min_jobs`` and ``max_jobs`` jobs with the
queue of tasks. dask-jobqueue is an optional dependency (``pip install -e .[cluster]``), imported only here and only
when a SLURM cluster is asked for. Settings with no field here (``interface``, ``shebang``, ``worker_extra_args``)
come from dask-jobqueue's own configuration (``jobqueue.slurm`` in ``~/.config/dask/jobqueue.yaml``).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

# SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_WALLTIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")


@dataclass(frozen=True)
class SlurmConfig:
    """One SLURM job of Dask workers, and how many of them (``uvprep build --slurm-*``)."""

    cores: int = 8
    """CPU cores per job (``#SBATCH --cpus-per-task``); split into cores // threads worker processes."""
    memory: str = "32GB"
    """Memory per job (``#SBATCH --mem``), shared by its worker processes."""
    walltime: str = "04:00:00"
    """Time limit per job (``#SBATCH -t``); a build outliving its jobs resumes on the next ones."""
    partition: str | None = None
    """SLURM partition (``#SBATCH -p``); None: the site default."""
    account: str | None = None
    """Account charged (``#SBATCH -A``); None: the user's default."""
    job_extra_directives: tuple[str, ...] = ()
    """More ``#SBATCH`` options, each as written after ``#SBATCH`` (``--constraint=skylake``, ``--qos=short``)."""
    job_script_prologue: tuple[str, ...] = ()
    """Shell lines run before the worker starts (``source .venv/bin/activate``, ``module load ...``)."""
    min_jobs: int = 1
    """Fewest jobs kept while the build runs (``cluster.adapt(minimum_jobs=...)``)."""
    max_jobs: int = 4
    """Most jobs at once (``cluster.adapt(maximum_jobs=...)``)."""
    local_directory: str | None = None
    """Worker scratch space on the compute node (``$TMPDIR`` style); None: dask's default."""
    log_directory: str | None = None
    """Folder for the jobs' stdout/stderr (shared storage); None: the job's working directory."""

    def __post_init__(self):
        if self.cores < 1:
            raise ValueError(f"--slurm-cores {self.cores}: expected a whole number >= 1")
        from dask.utils import parse_bytes

        try:
            ok = parse_bytes(self.memory) > 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"--slurm-memory {self.memory!r}: expected a size such as 16GB or 64GiB")
        if not _WALLTIME.fullmatch(self.walltime):
            raise ValueError(f"--slurm-walltime {self.walltime!r}: expected SLURM's time format, e.g. 04:00:00, "
                             f"90 (minutes) or 1-12:00:00")
        if self.min_jobs < 0 or self.max_jobs < max(1, self.min_jobs):
            raise ValueError(f"--slurm-min-jobs {self.min_jobs} / --slurm-max-jobs {self.max_jobs}: expected "
                             f"0 <= min <= max and max >= 1")
        for d in self.job_extra_directives:
            if not d.startswith("-") or "\n" in d:
                raise ValueError(f"--slurm-job-extra {d!r}: expected one sbatch option as written after #SBATCH, "
                                 f"e.g. --constraint=skylake")

    def processes(self, threads: int) -> int:
        """Worker processes per job for ``threads`` threads each; raises ValueError when they do not fit."""
        if threads < 1 or self.cores % threads:
            raise ValueError(f"--slurm-cores {self.cores} is not a multiple of --threads {threads}: each job runs "
                             f"cores // threads worker processes; choose cores divisible by threads")
        return self.cores // threads


def require_jobqueue():
    """The ``dask_jobqueue`` module, or a RuntimeError that says how to install it."""
    try:
        import dask_jobqueue
    except ImportError:
        raise RuntimeError("--cluster slurm needs dask-jobqueue, which is not installed: "
                           "pip install -e '.[cluster]' (or pip install dask-jobqueue)") from None
    return dask_jobqueue


def check_submit_host(cfg: SlurmConfig, threads: int) -> None:
    """Everything a SLURM cluster needs, checked before anything is created: the config fits ``threads``,
    dask-jobqueue is installed and ``sbatch`` is on PATH (this must run where jobs can be submitted)."""
    cfg.processes(threads)
    require_jobqueue()
    if shutil.which("sbatch") is None:
        raise RuntimeError("--cluster slurm: sbatch is not on PATH; run the build on a SLURM login/submit node "
                           "(or, where jobs may not submit jobs, use pipelines/slurm/build.sbatch)")


def make_slurm_cluster(cfg: SlurmConfig, threads: int, adapt: bool = True):
    """A ``dask_jobqueue.SLURMCluster`` for ``cfg`` (workers of ``threads`` threads), adapting between
    ``cfg.min_jobs`` and ``cfg.max_jobs`` jobs when ``adapt``. Its ``job_script()`` is the script each job runs;
    constructing it submits nothing (jobs are submitted by ``adapt``/``scale``) and needs no SLURM."""
    import dask

    jobqueue = require_jobqueue()
    # the dashboard on a random loopback port (a login node is shared; never 8787), unless configured otherwise
    scheduler_options = {"dashboard_address": "127.0.0.1:0",
                         **(dask.config.get("jobqueue.slurm.scheduler-options", None) or {})}
    cluster = jobqueue.SLURMCluster(
        cores=cfg.cores, processes=cfg.processes(threads), memory=cfg.memory, walltime=cfg.walltime,
        queue=cfg.partition, account=cfg.account, job_extra_directives=list(cfg.job_extra_directives),
        job_script_prologue=list(cfg.job_script_prologue), local_directory=cfg.local_directory,
        log_directory=cfg.log_directory, job_name="uvprep-worker", scheduler_options=scheduler_options)
    if adapt:
        cluster.adapt(minimum_jobs=cfg.min_jobs, maximum_jobs=cfg.max_jobs)
    return cluster
