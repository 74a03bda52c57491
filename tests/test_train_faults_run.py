"""`uvtrain fit` under faults, the run directory's part (issue 20): the store's identity and completion are recorded
and checked (item 1), one `uvtrain fit` per run directory (item 5), a torn metrics.jsonl and an oversized batch
(section 2), and one line instead of a traceback for a read-only run directory, `--device foo`, a damaged
config.json and a run without a checkpoint (section 3); a failed start writes no config.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from common.store import LockHeld, acquire_lock, read_lock
from tests.test_train import _metrics, opts, tiny
from train.bundle import BUNDLE_DIR
from train.cli import app
from train.config import LossWeights
from train.loop import fit
from train.runs import CHECKPOINT, CONFIG, METRICS, RUN_LOCK, STORE_RECORD, RunError, acquire_run_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def short(store: str, **kw):
    """Two sampler steps and one generator step of the tiny networks."""
    return tiny(store, **{"sampler_steps": 2, "sampler_finetune_steps": 0, "generator_steps": 1, **kw})


def _copy(train_store: str, tmp_path: Path, name: str = "store.zarr") -> str:
    out = tmp_path / name
    shutil.copytree(train_store, out)
    return str(out)


def _attrs(store: str, **changes) -> None:
    g = zarr.open_group(store, mode="r+")
    a = dict(g.attrs)
    a.update(changes)
    g.attrs.put(a)


def _cli(*args) -> tuple[int, list[str]]:
    res = CliRunner().invoke(app, [*map(str, args)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output, res.output
    return res.exit_code, lines


def _fit_flags(store, run_dir, *extra):
    return ["fit", "--store", store, "--run-dir", run_dir, "--sampler-steps", 2, "--sampler-finetune-steps", 0,
            "--generator-steps", 1, "--batch-size", 2, "--image-size", 64, "--sampler-image-size", 48,
            "--sampler-grid", 16, "--channels", 8, "--workers", 0, "--identity", "none", "--no-progress",
            "--no-tensorboard", *extra]


# ------------------------------------------------------------------------------------------------ item 1: the store
def test_the_store_identity_is_recorded_with_the_config(train_store, tmp_path):
    fit(short(train_store), opts(tmp_path / "r"))
    rec = json.loads((tmp_path / "r" / STORE_RECORD).read_text())
    g = zarr.open_group(train_store, mode="r")
    assert rec["complete"] and rec["chunks_done"] == rec["n_chunks"] == 6 and rec["samples_ok"] == 24
    assert rec["config"] == g.attrs["config"] and rec["created"] == g.attrs["created"]
    assert rec["manifest"]["sha256"] == g.attrs["manifest"]["sha256"] and len(rec["data_sha256"]) == 64


def test_a_store_rebuilt_with_other_settings_is_refused_on_resume(train_store, tmp_path):
    """`uvprep build --overwrite --erosion 0.1` in place: the rerun named the change (it resumed silently)."""
    store = _copy(train_store, tmp_path)
    cfg = short(store)
    fit(cfg, opts(tmp_path / "r", phase="sampler"))  # stopped after the sampler, the rerun resumes
    g = zarr.open_group(store, mode="r")
    config = json.loads(json.dumps(dict(g.attrs)["config"]))
    config["stages"]["uvgt"]["erosion_frac"] = 0.1
    _attrs(store, config=config, created="2031-01-01T00:00:00+00:00", generation="f" * 32)
    with pytest.raises(RunError, match=r"not the store this run trained on \(config\.stages\.uvgt\.erosion_frac: "
                                       r"run's store 0\.03, now 0\.1.*--overwrite"):
        fit(cfg, opts(tmp_path / "r"))
    result = fit(cfg, opts(tmp_path / "r", overwrite=True))  # a new run on the new store
    assert result["step"] == 3 and not result["resumed"]


def test_a_store_whose_data_changed_is_refused_and_an_identical_rebuild_passes(train_store, tmp_path):
    store = _copy(train_store, tmp_path)
    fit(short(store), opts(tmp_path / "r", phase="sampler"))
    _attrs(store, created="2031-01-01T00:00:00+00:00", generation="e" * 32)  # rebuilt: same settings, same data
    result = fit(short(store), opts(tmp_path / "r"))
    assert result["resumed"] and result["step"] == 3
    assert any("was rebuilt" in n and "identical data" in n for n in result["notes"]), result["notes"]
    g = zarr.open_group(store, mode="r+")
    rec = np.asarray(g["chunk_record"][3])
    rec[0] ^= 1  # the chunk's data digest: another build's samples
    g["chunk_record"][3] = rec
    _attrs(store, generation="d" * 32)
    with pytest.raises(RunError, match=r"not the store this run trained on \(sample data"):
        fit(short(store), opts(tmp_path / "r"))  # a finished run's rerun is checked as well


def test_other_photos_are_named(train_store, tmp_path):
    store = _copy(train_store, tmp_path)
    fit(short(store), opts(tmp_path / "r"))
    _attrs(store, manifest={"count": 30, "sha256": "0" * 64}, generation="c" * 32)
    with pytest.raises(RunError, match=r"manifest: run's store 24 photos .* now 30 photos"):
        fit(short(store), opts(tmp_path / "r"))


def test_an_incomplete_store_is_refused_before_anything_is_written(train_store, tmp_path):
    """A store still being built trained on the chunks done so far, and a rerun later on more."""
    store = _copy(train_store, tmp_path)
    zarr.open_group(store, mode="r+")["chunk_done"][2] = 0
    with pytest.raises(RunError, match=r"INCOMPLETE: 5 of 6 chunks built.*uvprep build.*uvprep check"):
        fit(short(store), opts(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_run_from_before_store_records_gets_one_recorded(train_store, tmp_path):
    fit(short(train_store), opts(tmp_path / "r", phase="sampler"))
    (tmp_path / "r" / STORE_RECORD).unlink()
    result = fit(short(train_store), opts(tmp_path / "r"))
    assert result["step"] == 3 and any(f"no {STORE_RECORD}" in n for n in result["notes"])
    assert (tmp_path / "r" / STORE_RECORD).is_file()


def test_overwrite_replaces_the_inference_bundle(train_store, tmp_path):
    """--overwrite onto another store kept the first store's inference/ (infer would use its face model)."""
    fit(short(train_store), opts(tmp_path / "r"))
    other = _copy(train_store, tmp_path, "other.zarr")
    fit(short(other), opts(tmp_path / "r", overwrite=True))
    assert json.loads((tmp_path / "r" / BUNDLE_DIR / "info.json").read_text())["store"] == other


# ------------------------------------------------------------------------------------------------ item 5: the lock
def test_a_second_fit_into_a_run_directory_in_use_is_refused(train_store, tmp_path):
    rd = tmp_path / "r"
    holder = acquire_run_lock(rd)  # a live process (this one) on this host
    try:
        with pytest.raises(RunError, match=rf"{rd} is in use by uvtrain fit \(pid {os.getpid()} on "):
            fit(short(train_store), opts(rd))
        assert not (rd / CONFIG).exists() and read_lock(rd, RUN_LOCK)["token"] == holder.info["token"]
    finally:
        holder.release()
    fit(short(train_store), opts(rd))
    assert read_lock(rd, RUN_LOCK) is None  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over(train_store, tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (rd / RUN_LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                           "owner": "uvtrain fit", "started": "2020-01-01T00:00:00+00:00",
                                           "token": "x"}))
    assert fit(short(train_store), opts(rd))["step"] == 3
    assert not (rd / RUN_LOCK).exists()


def test_a_lock_from_another_host_is_taken_over_only_by_its_own_slurm_job(tmp_path, monkeypatch):
    """A requeued SLURM job runs on another node with the same SLURM_JOB_ID: its old lock is its own."""
    (tmp_path / "x.lock").write_text(json.dumps({"pid": 1, "host": "node-7", "job": "4242", "token": "t"}))
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    with pytest.raises(LockHeld):
        acquire_lock(tmp_path, "x.lock", "test")
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(LockHeld):
        acquire_lock(tmp_path, "x.lock", "test")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with acquire_lock(tmp_path, "x.lock", "test") as lock:
        assert lock.info["job"] == "4242" and read_lock(tmp_path, "x.lock")["host"] == socket.gethostname()


@pytest.mark.slow
def test_two_fit_processes_into_one_run_directory(train_store, tmp_path):
    """Both ran, exit 0, and interleaved metrics.jsonl (60 rows for 32 steps); now the second gets one line."""
    rd = tmp_path / "r"
    flags = [str(f) for f in _fit_flags(train_store, rd, "--log-every", 1)]
    flags[flags.index("--sampler-steps") + 1] = "400"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "train.cli", *flags], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (rd / CONFIG).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (rd / CONFIG).exists(), first.communicate()[0] if first.poll() is not None else "no config.json"
        second = subprocess.run([sys.executable, "-m", "train.cli", *flags], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1 and f"{rd} is in use by uvtrain fit (pid {first.pid}" \
            in lines[0], lines
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------------ section 2
def test_a_torn_last_metrics_line_is_dropped_on_resume(train_store, tmp_path):
    """Power loss tore the last row: every resume failed with a JSONDecodeError traceback."""
    cfg = short(train_store, generator_steps=2)
    fit(cfg, opts(tmp_path / "full", checkpoint_every=2))
    rd = tmp_path / "r"

    class Stop(Exception):
        pass

    def cut(row, stop):
        if row["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, opts(rd, checkpoint_every=2), on_log=cut)
    with open(rd / METRICS, "ab") as f:
        f.write(b'{"step": 4, "phase": "gener' + b"\0" * 37)  # a write cut by the power loss, NUL-padded
    result = fit(cfg, opts(rd, checkpoint_every=2))
    assert result["resumed"] and result["step"] == 4
    assert any("torn last line" in n for n in result["notes"]), result["notes"]
    assert [r["step"] for r in _metrics(rd)] == [r["step"] for r in _metrics(tmp_path / "full")] == [1, 2, 3, 4]


def test_rows_of_an_attempt_without_a_checkpoint_are_dropped(train_store, tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / METRICS).write_text('{"step": 1, "phase": "sampler", "loss": 9.0}\n{"step": 2, "ph')
    fit(short(train_store), opts(rd))
    assert [r["step"] for r in _metrics(rd)] == [1, 2, 3] and _metrics(rd)[0]["loss"] != 9.0


@pytest.mark.parametrize("workers, limit", [(0, 24), (2, 12)])
def test_a_batch_larger_than_a_shard_is_refused(train_store, tmp_path, workers, limit):
    """--batch-size 1000 on a 16-sample store grew to 11.9 GB RSS without a single step."""
    with pytest.raises(RunError, match=rf"--batch-size {limit + 1}: larger than the {limit} samples each batch is "
                                       rf"drawn from \(24 usable samples .* 1 rank\(s\) x {max(1, workers)} loader"):
        fit(short(train_store, batch_size=limit + 1, workers=workers), opts(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ section 3
def test_device_foo_is_one_line(train_store, tmp_path):
    code, lines = _cli(*_fit_flags(train_store, tmp_path / "r", "--device", "foo"))
    assert code == 2 and lines == ["error: --device foo: expected cpu, cuda or cuda:N"], lines
    assert not (tmp_path / "r").exists()


def test_a_failed_start_writes_no_config(train_store, tmp_path):
    """The corrected command was refused without --overwrite: config.json had been written before the failure."""
    rd = tmp_path / "r"
    code, lines = _cli(*_fit_flags(train_store, rd, "--identity", "arcface"))
    assert code == 2 and len(lines) == 1 and not (rd / CONFIG).exists(), lines
    code, lines = _cli(*_fit_flags(train_store, rd))
    assert code == 0, lines


@pytest.mark.parametrize("damage", [b'{"store": "x", "sampler_st', b"", b'{"nope": 1}'])
def test_a_damaged_config_is_one_line(train_store, trained_run, tmp_path, damage):
    rd = tmp_path / "r"
    shutil.copytree(trained_run, rd)
    (rd / CONFIG).write_bytes(damage)
    if damage != b'{"nope": 1}':  # valid JSON of another shape: fit reports it as another config
        code, lines = _cli(*_fit_flags(train_store, rd))
        assert code == 2 and len(lines) == 1 and f"{rd / CONFIG} is damaged (not JSON" in lines[0], lines
    code, lines = _cli("eval", "--store", train_store, "--checkpoint", rd, "--out", tmp_path / "m.json",
                       "--identity", "none", "--no-progress")
    assert code == 2 and len(lines) == 1 and str(rd / CONFIG) in lines[0], lines


def _read_only(path: Path):
    """Make ``path`` read-only for this process (chmod, or ``chattr +i`` as root); a context manager."""
    os.chmod(path, 0o555)
    immutable = False
    if os.access(path, os.W_OK) and os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            os.chmod(path, 0o755)
            pytest.skip("running as root where chattr +i is unavailable: cannot make a read-only directory")
        immutable = True

    @contextlib.contextmanager
    def undo():
        try:
            yield
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            os.chmod(path, 0o755)

    return undo()


def test_a_read_only_run_directory_is_one_line(train_store, tmp_path):
    rd = tmp_path / "r"
    assert _cli(*_fit_flags(train_store, rd, "--phase", "sampler"))[0] == 0
    with _read_only(rd):
        code, lines = _cli(*_fit_flags(train_store, rd))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] in (f"error: run directory {rd} is not writable ({why})"
                        for why in ("Operation not permitted", "Permission denied")), lines


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_a_run_without_a_checkpoint_names_the_checkpoint_not_the_store(train_store, tmp_path, command):
    """A run stopped before its first checkpoint: infer / eval said the (gone) training store was missing."""
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / CONFIG).write_text(json.dumps(short(str(tmp_path / "gone.zarr")).to_json()))
    (tmp_path / "p.png").write_bytes(b"")
    args = (["infer", "--images", tmp_path / "p.png", "--out", tmp_path / "o"] if command == "infer" else
            ["eval", "--store", train_store, "--out", tmp_path / "m.json", "--identity", "none"])
    code, lines = _cli(*args, "--checkpoint", rd, "--no-progress")
    assert code == 2 and len(lines) == 1 and f"the run has no {CHECKPOINT} yet" in lines[0], lines
    assert "gone.zarr" not in lines[0]


def test_a_config_from_before_a_new_field_is_the_same_config(train_store, tmp_path):
    """Adding a config field (default = the old behaviour) must not make older runs "another config"; a changed
    value of a field the old config does have still does."""
    cfg = short(train_store)
    fit(cfg, opts(tmp_path / "r"))
    path = tmp_path / "r" / CONFIG
    old = json.loads(path.read_text())
    del old["generator"]["residual"], old["generator"]["mirror_input"], old["weights"]["ctr"]
    path.write_text(json.dumps(old))
    fit(cfg, opts(tmp_path / "r"))  # the same run: resumes, not refused
    with pytest.raises(RunError, match="weights.face"):
        fit(short(train_store, weights=LossWeights(face=3.0)), opts(tmp_path / "r"))
