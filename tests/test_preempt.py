"""Preemption: SIGUSR1 / SIGTERM stop `uvtrain fit` after the current step with a checkpoint and exit code 124, every
DDP rank at the same step; a rerun resumes. And the SLURM template that requeues such a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import _cli, _free_port, opts, tiny
from train.console import EXIT_PREEMPTED
from train.loop import fit
from train.runs import CHECKPOINT, METRICS

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "pipelines" / "slurm" / "train.sbatch"


def _flags(store: str, run_dir: Path, steps: int) -> list[str]:
    return ["--store", store, "--run-dir", str(run_dir), "--sampler-steps", str(steps), "--sampler-finetune-steps",
            "0", "--generator-steps", "0", "--batch-size", "2", "--image-size", "64", "--sampler-image-size", "48",
            "--sampler-grid", "16", "--channels", "8", "--workers", "0", "--identity", "none", "--log-every", "1"]


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"uvtrain fit exited ({proc.returncode}) early: {proc.communicate()[1]}")
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail(f"no metrics row within {timeout} s")
        time.sleep(0.02)


def test_sigusr1_checkpoints_exits_124_and_a_rerun_finishes(train_store, tmp_path):
    """`uvtrain fit` in a subprocess gets SIGUSR1 after its first step: one line, exit 124, a checkpoint at a step
    inside the run; the same command again resumes there and ends at the last step with every metrics row once."""
    rd, total = tmp_path / "r", 8
    flags = _flags(train_store, rd, total)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "fit", *flags, "--no-progress", "--no-tensorboard"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (rd / METRICS).exists() and (rd / METRICS).read_text().strip(), proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, (out, err)
    step = torch.load(rd / CHECKPOINT, weights_only=True)["step"]
    assert 0 < step < total
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert lines == [f"preempted by SIGUSR1 at step {step} of {total}: checkpoint written to {rd / CHECKPOINT}; "
                     f"rerun the same command to resume (exit code 124: requeue)"], (out, err)

    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    res = _cli(*flags)  # the rerun, in this process: fit installs its handlers and puts the old ones back
    assert res.exit_code == 0, res.output
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    assert torch.load(rd / CHECKPOINT, weights_only=True)["step"] == total
    rows = [json.loads(ln) for ln in (rd / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, total + 1))


def _ddp_worker(rank: int, world: int, port: int, store: str, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    def signal_rank1(row, stop):
        if rank == 1 and row["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = fit(tiny(store, sampler_steps=6, sampler_finetune_steps=0, generator_steps=0), opts(Path(run_dir)),
                 on_log=signal_rank1)
    torch.save({"step": result["step"], "preempted": result["preempted"]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_stop_at_the_same_step_when_one_is_signalled(train_store, tmp_path):
    """Only rank 1 gets SIGTERM (at step 2); the all-reduced flag stops both ranks after step 2, rank 0 writes the
    checkpoint, and neither deadlocks in the next step's all-reduce."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), train_store, str(tmp_path / "r"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == {"step": 2, "preempted": "a signal to another rank"}
    assert r1 == {"step": 2, "preempted": "SIGTERM"}
    assert torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------------------ SLURM template
def test_sbatch_template_directives_and_launch_line():
    text = SBATCH.read_text()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert {"--signal=B:USR1@120", "--requeue", "--ntasks-per-node=1", "--open-mode=append"} <= set(directives)
    assert {d.split("=")[0] for d in directives} >= {"--nodes", "--gpus-per-node", "--time", "--output"}
    for var in ("STORE", "RUN_DIR", "GPUS_PER_NODE", "DEVICE", "EXTRA", "ENV_SETUP"):
        assert f"\n{var}=${{{var}:" in text, var
    launch = " ".join(text.split("srun ", 1)[1].split("STEP_PID=$!")[0].replace("\\\n", " ").split())
    for part in ('torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"', "--rdzv-backend c10d",
                 '--rdzv-endpoint "$HEAD:$PORT"', '--rdzv-id "$SLURM_JOB_ID"', "SIGUSR1",
                 '-m train.cli fit --store "$STORE" --run-dir "$RUN_DIR" --device "$DEVICE"', '$EXTRA "$@" &'):
        assert part in launch, part
    assert f"PREEMPTED_EXIT={EXIT_PREEMPTED}" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "trap 'forward USR1' USR1" in text and "/home/" not in text and "/scratch" not in text


STUB_SRUN = "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n"
STUB_SCONTROL = ("#!/usr/bin/env bash\nif [[ $1 == show ]]; then printf 'node-a\\nnode-b\\n'; "
                 "else echo \"$*\" >> \"$STUB_LOG/scontrol\"; fi\n")
STUB_TORCHRUN = ("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$STUB_LOG/torchrun\"\n"
                 "[[ -n $STUB_EXIT_NOW ]] && exit \"$STUB_EXIT_NOW\"\n"
                 "trap 'exit $STUB_EXIT_ON_SIGNAL' USR1\ntouch \"$STUB_LOG/ready\"\nwhile :; do sleep 0.02; done\n")


@pytest.mark.parametrize(("signalled", "trainer_exit", "requeued", "script_exit"),
                         [(True, 124, True, 0), (True, 1, True, 0), (True, 0, False, 0), (False, 3, False, 3)])
def test_sbatch_template_forwards_the_signal_and_requeues(tmp_path, signalled, trainer_exit, requeued, script_exit):
    """The template under stand-in srun / torchrun / scontrol: SIGUSR1 to the batch shell reaches the trainer, and
    the job is requeued when the trainers then fail (124 itself, or torchrun's 1); not after a clean end or a
    failure without a signal."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("torchrun", STUB_TORCHRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path), "ENV_SETUP": ":",
           "STORE": "s.zarr", "RUN_DIR": str(tmp_path / "runs" / "a"), "GPUS_PER_NODE": "2", "EXTRA": "--seed 3",
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "STUB_EXIT_NOW": "" if signalled else str(trainer_exit), "STUB_EXIT_ON_SIGNAL": str(trainer_exit)}
    proc = subprocess.Popen(["bash", str(SBATCH), "--batch-size", "6"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signalled:
        t_end = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < t_end, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == script_exit, (out, err)
    assert (tmp_path / "scontrol").exists() == requeued, err
    if requeued:
        assert (tmp_path / "scontrol").read_text() == "requeue 42\n"
    args = (tmp_path / "torchrun").read_text().split("\n")
    assert args[:args.index("-m")] == ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                                       "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "42", "--signals-to-handle",
                                       "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "100"]
    assert args[args.index("-m"):-1] == ["-m", "train.cli", "fit", "--store", "s.zarr", "--run-dir",
                                         str(tmp_path / "runs" / "a"), "--device", "cuda", "--workers", "4",
                                         "--no-progress", "--seed", "3", "--batch-size", "6"]
