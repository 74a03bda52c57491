"""``uvtrain`` under faults (issue 20): loader workers under a process-group signal (item 6), hostile photos in
``uvtrain infer`` (item 7 and the pixel / byte limits of section 2), ``--out`` checked before the work and signals
during start-up (section 3). Every test failed before its fix."""

from __future__ import annotations

import csv
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from typer.testing import CliRunner

from common.config import MAX_BYTES, MAX_PIXELS
from common.imageio import write_png
from common.options import field_default
from common.signals import SignalInterrupt
from common.store import StoreReader
from preprocess.sources import FolderSource
from tests.test_hostile_input import _png_header_only
from train.cli import app
from train.config import EXIT_PREEMPTED, EvalConfig, InferConfig
from train.data import DataConfig, StoreStream, make_loader
from train.runs import CHECKPOINT, METRICS, RunError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------ item 6: loader workers and signals
def _mark_init(folder: str, worker_id: int) -> None:
    Path(folder, f"init{worker_id}").touch()


def test_loader_workers_ignore_stop_signals_and_chain_the_init(train_store, tmp_path):
    """SIGTERM / SIGUSR1 / SIGINT from another process (as a process-group signal reaches them) leave the workers
    running: torch's worker SIGTERM handler killed them, and the main process's next step raised "DataLoader worker
    is killed by signal". A SIGTERM from the main process itself (Process.terminate) still ends a worker, and a
    caller's worker_init_fn still runs."""
    cfg = DataConfig(batch_size=2, image_size=64, with_targets=False)
    loader = make_loader(StoreStream(train_store, cfg), 2, worker_init_fn=functools.partial(_mark_init, str(tmp_path)))
    it = iter(loader)
    first = [next(it)["batch"] for _ in range(2)]
    workers = it._workers
    for w in workers:
        for sig in ("TERM", "USR1", "INT"):
            subprocess.run(["kill", "-s", sig, str(w.pid)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert [next(it)["batch"] for _ in range(4)] == [first[-1] + 1 + k for k in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init0", "init1"]
    workers[0].terminate()
    workers[0].join(10)
    assert workers[0].exitcode == 0
    del it, loader


_EXIT_WITH_A_LIVE_LOADER = """
import sys
from train.data import DataConfig, StoreStream, make_loader
it = iter(make_loader(StoreStream(sys.argv[1], DataConfig(batch_size=2, image_size=64, with_targets=False)), 2))
next(it)
KEPT = it  # alive at exit, as an iterator held by a traceback is after an error
"""


def test_a_process_exiting_with_live_loader_workers_does_not_hang(train_store):
    """At exit, multiprocessing terminates daemon workers (SIGTERM from their parent) and joins them: workers that
    ignored every SIGTERM would hang the exit for ever; they obey their parent's."""
    res = subprocess.run([sys.executable, "-c", _EXIT_WITH_A_LIVE_LOADER, train_store], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr[-3000:]


def _fit_flags(store: str, run_dir: Path, steps: int, workers: int) -> list[str]:
    return ["fit", "--store", store, "--run-dir", str(run_dir), "--sampler-steps", str(steps),
            "--sampler-finetune-steps", "0", "--generator-steps", "0", "--batch-size", "2", "--image-size", "64",
            "--sampler-image-size", "48", "--sampler-grid", "16", "--channels", "8", "--workers", str(workers),
            "--identity", "none", "--log-every", "1", "--no-progress", "--no-tensorboard"]


def _start(args: list[str]) -> subprocess.Popen:
    """``uvtrain ARGS`` in a session of its own: os.killpg signals it and its loader workers, as SLURM does."""
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=ROOT, env={**os.environ,
                            "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"uvtrain exited ({proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > t_end:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.01)


@pytest.mark.slow  # ~5-12 s on 2 shared cores: a real run with two loader workers
def test_process_group_sigterm_with_workers_checkpoints_and_exits_124(train_store, tmp_path):
    """SIGTERM to the whole process group of `uvtrain fit --workers 2` (SLURM's way): the preemption checkpoint is
    written, exit 124 with the one preemption line, no temporary file and no process left. Before: the workers died
    first, a worker-death error inside the step / torch.save, exit 1, no checkpoint, a temporary file left."""
    rd, total = tmp_path / "r", 400
    proc = _start(_fit_flags(train_store, rd, total, workers=2))
    _wait(lambda: (rd / METRICS).exists() and (rd / METRICS).read_text().strip(), proc, "a metrics row")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    step = torch.load(rd / CHECKPOINT, weights_only=True)["step"]
    assert 0 < step < total
    assert _lines(out + err) == [f"preempted by SIGTERM at step {step} of {total}: checkpoint written to "
                                 f"{rd / CHECKPOINT}; rerun the same command to resume (exit code 124: requeue)"]
    assert not [p for p in rd.rglob("*") if ".tmp" in p.name]
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # the workers are gone with the main process
        os.killpg(proc.pid, 0)


# --------------------------------------------------------------------- section 3: signals during start-up, SIGINT
def _signal_handler_installed(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` catches ``sig`` (/proc/PID/status SigCgt): Python does not catch SIGTERM by itself."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught >> (int(sig) - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads a process's signal mask from /proc")
@pytest.mark.parametrize(("command", "sig", "code"), [("fit", signal.SIGTERM, EXIT_PREEMPTED),
                                                      ("fit", signal.SIGINT, 130), ("infer", signal.SIGTERM, 143)])
def test_a_signal_during_start_up_is_one_line(train_store, trained_run, tmp_path, command, sig, code):
    """A signal while the command starts (torch loading, seconds): before, SIGTERM ended it silently (-15) and SIGINT
    with exit 130 and nothing printed. Now one line and a defined exit code: fit 124 for SIGTERM (preempted: rerun,
    the same code as a preemption after a step), 130 for SIGINT; infer / eval 128 + the signal's number."""
    if command == "fit":
        args = _fit_flags(train_store, tmp_path / "r", 4, workers=0)
    else:
        args = ["infer", "--checkpoint", str(trained_run), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                "--no-progress"]
    proc = _start(args)
    _wait(lambda: _signal_handler_installed(proc.pid, signal.SIGTERM), proc, "the start-up handler")
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    lines = _lines(out + err)
    assert len(lines) == 1 and f"interrupted by {sig.name} during start-up" in lines[0], lines
    assert lines[0].startswith(f"uvtrain {command}: ") and lines[0].endswith(f"(exit code {code})"), lines
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("stepped", "exc", "code", "where"), [
    (3, KeyboardInterrupt(), 130, "interrupted by SIGINT at step 3: the steps since the last checkpoint are lost"),
    (None, SignalInterrupt("SIGTERM"), EXIT_PREEMPTED,
     "interrupted by SIGTERM during start-up, before the first step: nothing trained")])
def test_an_interrupted_fit_says_where_in_one_line(train_store, tmp_path, monkeypatch, stepped, exc, code, where):
    """Ctrl-C during training (and a stop signal before fit installs its own handling) ended `uvtrain fit` silently
    with exit 130; now one line says at which step, and the exit code follows the signal."""
    from tests.test_train import tiny
    from train import console
    from train.config import RunOptions
    from train.console import run_fit

    def interrupted_fit(cfg, run, on_log=None, on_step=None):
        if stepped is not None:
            on_step(stepped, "sampler")
        raise exc

    monkeypatch.setattr(console, "fit", interrupted_fit)
    from rich.console import Console

    term = Console(stderr=False, record=True, width=300)
    got = run_fit(tiny(train_store), RunOptions(run_dir=tmp_path / "r", progress=False, tensorboard=False), term)
    assert got == code
    assert _lines(term.export_text()) == [f"uvtrain fit: {where}; rerun the same command to resume (exit code "
                                          f"{code})"]


# ---------------------------------------------------------------- item 7 and section 2: hostile photos in infer
@pytest.fixture(scope="module")
def hostile_photos(train_store, tmp_path_factory) -> Path:
    """A good face PNG, the same face as a JPEG cut in half, and a 1 KB PNG that declares 20000 x 20000."""
    d = tmp_path_factory.mktemp("hostile")
    face = StoreReader(train_store).sample(0)["image"]
    write_png(d / "face.png", face)
    jpg = cv2.imencode(".jpg", cv2.cvtColor(cv2.resize(face, (256, 256)), cv2.COLOR_RGB2BGR))[1].tobytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "huge.png").write_bytes(_png_header_only(20000, 20000))
    return d


def _failures(out: Path) -> dict[str, str]:
    with open(out / "failures.csv") as f:
        return {r["photo"]: r["reason"] for r in csv.DictReader(f)}


def test_infer_fails_a_truncated_jpeg_and_a_huge_png_without_decoding_them(trained_run, hostile_photos, tmp_path,
                                                                           monkeypatch):
    """The cut JPEG was decoded with its lower half grey (libjpeg only warns) and given a UV map, and the 20000²
    PNG was decoded (2.9 GB RSS for a 1.2 MB file); both were absent from failures.csv, exit 0. Now they fail with
    uvprep's reasons and neither reaches the decoder."""
    import common.imageio

    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(common.imageio.cv2, "imdecode", lambda buf, flag: decoded.append(len(buf)) or real(buf, flag))
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(trained_run), "--images", str(hostile_photos),
                                   "--out", str(tmp_path / "o"), "--framing", "none", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _failures(tmp_path / "o") == {"cut.jpg": "truncated", "huge.png": "too_large"}
    assert decoded == [(hostile_photos / "face.png").stat().st_size]
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["face_uv.png"]


@pytest.mark.parametrize("flag", ["--max-pixels", "--max-bytes"])
def test_infer_takes_uvprep_read_limits(trained_run, hostile_photos, tmp_path, flag):
    """--max-pixels / --max-bytes as `uvprep build` has them: the good face fails too_large under a low limit."""
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(trained_run), "--images",
                                   str(hostile_photos / "face.png"), "--out", str(tmp_path / "o"), "--framing", "none",
                                   flag, "100", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _failures(tmp_path / "o") == {"face.png": "too_large"}


def test_infer_and_uvprep_share_one_default_for_each_limit():
    assert field_default(InferConfig, "max_pixels") == field_default(FolderSource, "max_pixels") == MAX_PIXELS
    assert field_default(InferConfig, "max_bytes") == field_default(FolderSource, "max_bytes") == MAX_BYTES


# ------------------------------------------------------------------------- section 3: --out before the work
@pytest.fixture
def no_work(monkeypatch):
    """Make the work itself fail loudly: an --out error must come first."""
    import train.evaluate
    import train.infer

    def started(*a, **kw):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(train.infer, "Inferencer", started)
    monkeypatch.setattr(train.evaluate, "resolve_device", started)


@pytest.mark.parametrize(("command", "case", "message"), [
    ("infer", "a_file", "is a file, not a folder"),
    ("infer", "under_a_file", "cannot be created (Not a directory)"),
    ("infer", "unwritable", "is not writable"),
    ("eval", "a_folder", "is a folder, not a file"),
    ("eval", "under_a_file", "is a file, not a folder"),
    ("eval", "unwritable", "is not writable"),
])
def test_out_is_checked_before_the_work(trained_run, train_store, hostile_photos, tmp_path, no_work, command, case,
                                        message):
    """infer's --out was only created (a read-only folder failed at the first PNG, after loading everything), and
    eval wrote --out after evaluating every sample: a folder, a path under a file or a read-only folder failed
    with a traceback at the very end. Now one line before any work, exit 2."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    unwritable = Path("/proc")  # not writable by anyone, root included (a chmod'ed folder is writable by root)
    name = "" if command == "infer" else "m.json"
    out = {"a_file": tmp_path / "afile", "a_folder": tmp_path / "adir", "under_a_file": tmp_path / "afile" / "x",
           "unwritable": unwritable / name if name else unwritable}[case]
    if case == "under_a_file" and command == "eval":
        out = tmp_path / "afile" / "m.json"
    if command == "infer":
        args = ["infer", "--checkpoint", str(trained_run), "--images", str(hostile_photos / "face.png")]
    else:
        args = ["eval", "--store", train_store, "--checkpoint", str(trained_run), "--identity", "none"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = _lines(res.output)
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: ") and message in lines[0], res.output


def test_eval_writes_its_metrics_whole(trained_run, train_store, tmp_path, monkeypatch):
    """metrics.json appears complete or not at all (a temporary file renamed over it)."""
    from train.evaluate import evaluate

    out = tmp_path / "e" / "metrics.json"
    res = evaluate(EvalConfig(store=train_store, out=out, checkpoint=trained_run, identity="none", limit=2,
                              progress=False))
    assert res["samples"] == 2 and sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(RunError, match="cannot write it .No space left on device."):
        evaluate(EvalConfig(store=train_store, out=out, checkpoint=trained_run, identity="none", limit=2,
                            progress=False))
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]
