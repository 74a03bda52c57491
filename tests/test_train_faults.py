"""`uvtrain` under faults, the checkpoints' part (issue 20): no checkpoint with NaN or inf weights and the right
step named (item 3), a SHA-256 inside every checkpoint checked on every load (item 4), the checkpoint's config
checked against the run's (item 8), temporary files of interrupted writes removed and a lost ``sampler.pt`` written
again (section 2), and one line naming the file for a damaged checkpoint, a full disk and a UV size changed under a
run (section 3)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.test_train import opts, tiny
from train.cli import app
from train.config import OptimConfig
from train.loop import Trainer, fit, schedule
from train.models import UVGenerator
from train.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    DIGEST,
    SAMPLER_CHECKPOINT,
    RunError,
    atomic_save,
    checkpoint_record,
    load_checkpoint,
    load_trained,
    payload_sha256,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def short(store: str, **kw):
    """Two sampler steps and one generator step of the tiny networks."""
    return tiny(store, **{"sampler_steps": 2, "sampler_finetune_steps": 0, "generator_steps": 1, **kw})


@pytest.fixture(scope="module")
def done(train_store, tmp_path_factory) -> Path:
    """A finished run of :func:`short` (sampler.pt at step 2, checkpoint.pt at step 3)."""
    rd = tmp_path_factory.mktemp("faults") / "done"
    fit(short(train_store), opts(rd))
    return rd


@pytest.fixture(scope="module")
def photos(train_store, tmp_path_factory) -> Path:
    """A folder with one of the store's images as a photo."""
    from common.imageio import write_png
    from common.store import StoreReader

    d = tmp_path_factory.mktemp("photos")
    write_png(d / "face.png", StoreReader(train_store).batch([0], ["image"])["image"][0])
    return d


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def _cli(*args) -> tuple[int, list[str]]:
    res = CliRunner().invoke(app, [*map(str, args)])
    assert "Traceback" not in res.output and "weights_only=False" not in res.output, res.output
    return res.exit_code, [ln for ln in res.output.splitlines() if ln.strip()]


def _fit_cli(store, run_dir, *extra):
    return _cli("fit", "--store", store, "--run-dir", run_dir, "--sampler-steps", 2, "--sampler-finetune-steps", 0,
                "--generator-steps", 1, "--batch-size", 2, "--image-size", 64, "--sampler-image-size", 48,
                "--sampler-grid", 24, "--channels", 8, "--workers", 0, "--identity", "none", "--no-progress",
                "--no-tensorboard", *extra)


def _one_line(code_lines: tuple[int, list[str]], *needles: str) -> str:
    code, lines = code_lines
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _resave(path: Path, change) -> None:
    """Load a checkpoint, ``change(ck)`` and write it back with a valid SHA-256."""
    ck = torch.load(path, weights_only=True)
    change(ck)
    atomic_save(ck, path)


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit in the middle of the checkpoint's largest tensor record (the zip archive stays readable)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------------------- item 3: NaN / inf
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_a_learning_rate_that_is_not_finite_is_refused(value):
    with pytest.raises(ValueError, match="expected a finite learning rate"):
        OptimConfig(lr_generator=float(value))
    code, lines = _cli("fit", "--store", "s.zarr", "--run-dir", "r", "--lr-generator", value)
    assert code == 2 and "lr" in " ".join(lines).lower(), lines


def test_weights_gone_non_finite_are_never_saved(train_store, tmp_path, monkeypatch):
    """A step that makes a weight NaN: its checkpoint is not written, the last finite one (step 1) stays, and the
    message names both steps; the rerun resumes from step 1."""
    import train.loop as loop

    real = loop.Trainer.sampler_step

    def poisoning(self, b, stage):
        out = real(self, b, stage)
        if self.step == 1:  # the update of step 2
            next(self.sampler.parameters()).data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(loop.Trainer, "sampler_step", poisoning)
    rd = tmp_path / "r"
    with pytest.raises(RunError, match=r"NaN or inf after step 2 \(first: models\.sampler\..*\(step 1\) is kept"):
        fit(short(train_store), opts(rd, checkpoint_every=1))
    ck = load_checkpoint(rd / CHECKPOINT)
    assert ck["step"] == 1
    assert not list(rd.glob(".*.tmp-*"))
    monkeypatch.setattr(loop.Trainer, "sampler_step", real)
    assert fit(short(train_store), opts(rd, checkpoint_every=1))["step"] == 3


def test_a_nan_loss_names_its_step_and_the_checkpoint_kept(train_store, tmp_path, monkeypatch):
    """The loss of the third step is NaN: "at step 3" (metrics.jsonl's numbering; it said 2), checkpoint step 2."""
    import train.loop as loop

    real = loop.sampler_loss
    calls = []

    def poisoned(*a, **kw):
        terms = real(*a, **kw)
        calls.append(1)
        if len(calls) == 3:
            terms["loss_uv"] = terms["loss_uv"] * float("nan")
        return terms

    monkeypatch.setattr(loop, "sampler_loss", poisoned)
    rd = tmp_path / "r"
    with pytest.raises(RunError, match=r"'loss_uv' is nan at step 3;.*checkpoint\.pt \(step 2\) is kept"):
        fit(short(train_store, sampler_steps=4), opts(rd, checkpoint_every=2))
    assert load_checkpoint(rd / CHECKPOINT)["step"] == 2


def test_best_pt_is_skipped_not_fatal_with_nan_weights(train_store, tmp_path):
    """Rank 0 alone writes best.pt (the other ranks wait at a barrier): NaN weights skip it there, and the next
    checkpoint.pt, which every rank writes, stops the run."""
    tr = Trainer(short(train_store), opts(tmp_path / "r"))
    next(tr.generator.parameters()).data.view(-1)[0] = float("nan")
    stage = schedule(tr.cfg, tr.uv_size)[-1]
    tr.save(stage, tr.rd / BEST)
    assert not (tr.rd / BEST).exists()
    with pytest.raises(RunError, match=r"NaN or inf after step 0 \(first: models\.generator\..*no checkpoint was"):
        tr.save(stage)


def test_a_checkpoint_with_nan_weights_is_refused_everywhere(done, train_store, photos, tmp_path):
    """A checkpoint poisoned before the guard existed: fit, infer, eval and export each stop with one line."""
    rd = _copy(done, tmp_path)
    _resave(rd / CHECKPOINT, lambda ck: next(iter(ck["models"]["generator"].values())).view(-1).__setitem__(
        0, float("nan")))
    with pytest.raises(RunError, match=r"checkpoint\.pt \(step 3\): 1 tensor\(s\) hold NaN or inf \(first: gen"):
        load_trained(rd)
    with pytest.raises(RunError, match="NaN or inf"):
        fit(short(train_store), opts(rd))
    _one_line(_cli("infer", "--checkpoint", rd, "--images", photos, "--out", tmp_path / "o", "--framing", "none",
                   "--no-progress"), str(rd / CHECKPOINT), "NaN or inf")
    _one_line(_cli("eval", "--store", train_store, "--checkpoint", rd, "--out", tmp_path / "m.json", "--identity",
                   "none", "--no-progress"), str(rd / CHECKPOINT), "NaN or inf")
    _one_line(_cli("export", rd, "--out", tmp_path / "e"), "NaN or inf")


# --------------------------------------------------------------------------------------- item 4: integrity
def test_the_digest_is_of_the_contents_and_survives_a_round_trip(done, tmp_path):
    for name in (CHECKPOINT, SAMPLER_CHECKPOINT):
        ck = torch.load(done / name, weights_only=True)
        assert ck[DIGEST] == payload_sha256({k: v for k, v in ck.items() if k != DIGEST})
    ck = load_checkpoint(done / CHECKPOINT)
    # the digest sees every kind of leaf: a tensor's bytes, dtype and shape, a scalar, a key
    changed = [payload_sha256(ck)]
    for change in (lambda c: c["models"]["sampler"][next(iter(c["models"]["sampler"]))].view(-1).__setitem__(0, 7.0),
                   lambda c: c.__setitem__("step", 4), lambda c: c.__setitem__("extra", None),
                   lambda c: c["rng"].__setitem__("torch", c["rng"]["torch"].view(torch.int8))):
        change(ck)
        changed.append(payload_sha256(ck))
    assert len(set(changed)) == len(changed)
    b16 = {"x": torch.ones(3, dtype=torch.bfloat16)}
    assert payload_sha256(b16) != payload_sha256({"x": torch.ones(3, dtype=torch.float16)})


def test_a_flipped_bit_is_refused_on_every_load(done, train_store, photos, tmp_path):
    """One bit of one weight: fit (resume), infer, eval and export each refuse it in one line naming the file (it
    loaded and was used before)."""
    rd = _copy(done, tmp_path)
    _flip_a_weight_bit(rd / CHECKPOINT)
    torch.load(rd / CHECKPOINT, weights_only=True)  # still a readable archive: only the digest sees the change
    with pytest.raises(RunError, match=r"checkpoint\.pt: its contents hash to SHA-256 .* changed or damaged"):
        load_trained(rd)
    with pytest.raises(RunError, match="changed or damaged"):
        fit(short(train_store), opts(rd))
    _one_line(_cli("infer", "--checkpoint", rd, "--images", photos, "--out", tmp_path / "o", "--framing", "none",
                   "--no-progress"), str(rd / CHECKPOINT), "SHA-256")
    _one_line(_cli("eval", "--store", train_store, "--checkpoint", rd, "--out", tmp_path / "m.json", "--identity",
                   "none", "--no-progress"), str(rd / CHECKPOINT), "SHA-256")
    _one_line(_cli("export", rd, "--out", tmp_path / "e"), str(rd / CHECKPOINT), "SHA-256")


def test_a_checkpoint_from_before_digests_loads_with_a_warning(done, train_store, tmp_path):
    rd = _copy(done, tmp_path)
    ck = torch.load(rd / CHECKPOINT, weights_only=True)
    del ck[DIGEST]
    torch.save(ck, rd / CHECKPOINT)
    with pytest.warns(UserWarning, match="no SHA-256"):
        assert load_checkpoint(rd / CHECKPOINT)["step"] == 3
    result = fit(short(train_store), opts(rd))
    assert result["resumed"] and any("no SHA-256" in n for n in result["notes"])


# --------------------------------------------------------------------------------------- item 8: config
def test_a_checkpoint_of_another_config_is_refused_when_config_json_is_lost(done, train_store, tmp_path):
    """config.json lost and a rerun with another --lr-generator: refused naming the field (it trained with the
    checkpoint's value and recorded the new one); config.json is the checkpoint's again, so the right command
    resumes."""
    rd = _copy(done, tmp_path)
    (rd / CONFIG).unlink()
    cfg = short(train_store, generator_steps=2)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_generator=1e-2))
    with pytest.raises(RunError, match=r"trained with another config \(generator_steps: checkpoint 1, this run 2; "
                                       r"optim\.lr_generator: checkpoint 0\.0001, this run 0\.01\)"):
        fit(other, opts(rd))
    assert json.loads((rd / CONFIG).read_text()) == short(train_store).to_json()
    assert load_checkpoint(rd / CHECKPOINT)["step"] == 3  # not trained on
    result = fit(short(train_store), opts(rd))
    assert result["resumed"] and result["step"] == 3


# --------------------------------------------------------------------------------------- section 2
def test_a_kill_while_sampler_pt_is_written_is_repaired(done, train_store, tmp_path, monkeypatch):
    """Killed during the sampler.pt write (its temporary file left half written): the rerun removes the temporary
    file and writes sampler.pt again, identical to the uninterrupted run's; files not ours stay."""
    import train.loop as loop

    class Killed(BaseException):
        pass

    real = loop.atomic_save

    def killed_on_sampler(obj, path):
        if Path(path).name == SAMPLER_CHECKPOINT:
            (Path(path).parent / f".{SAMPLER_CHECKPOINT}.tmp-999999").write_bytes(b"PK\x03\x04" + b"\0" * 1000)
            raise Killed
        real(obj, path)

    monkeypatch.setattr(loop, "atomic_save", killed_on_sampler)
    rd = tmp_path / "r"
    with pytest.raises(Killed):
        fit(short(train_store), opts(rd))
    monkeypatch.setattr(loop, "atomic_save", real)
    assert not (rd / SAMPLER_CHECKPOINT).exists() and load_checkpoint(rd / CHECKPOINT)["step"] == 2
    (rd / ".checkpoint.pt.tmp-123").write_bytes(b"x")
    (rd / ".notes.tmp-1").write_bytes(b"mine")
    result = fit(short(train_store), opts(rd))
    assert result["step"] == 3
    assert sorted(p.name for p in rd.glob(".*tmp*")) == [".notes.tmp-1"]
    assert any("removed 2 temporary file(s)" in n for n in result["notes"]), result["notes"]
    assert any("sampler.pt was missing" in n for n in result["notes"]), result["notes"]
    got, want = (torch.load(d / SAMPLER_CHECKPOINT, weights_only=True) for d in (rd, done))
    assert got["step"] == 2 and got[DIGEST] == want[DIGEST]  # the same contents, byte for byte


def test_sampler_pt_lost_after_the_generator_started_is_written_again(done, train_store, tmp_path):
    rd = _copy(done, tmp_path)
    (rd / SAMPLER_CHECKPOINT).unlink()
    result = fit(short(train_store), opts(rd))
    assert any("the sampler as the phase left it at step 2" in n for n in result["notes"]), result["notes"]
    got, want = (torch.load(d / SAMPLER_CHECKPOINT, weights_only=True) for d in (rd, done))
    assert got["step"] == 3
    for k, v in want["models"]["sampler"].items():
        assert torch.equal(got["models"]["sampler"][k], v), k


# --------------------------------------------------------------------------------------- section 3
def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "zero_bytes":
        path.write_bytes(b"")
    elif how == "zeroed":
        path.write_bytes(bytes(len(raw)))
    elif how == "foreign":
        torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    elif how == "pickled_object":  # a torch file holding a Python object weights_only refuses
        buf = io.BytesIO()
        torch.save({"models": torch.nn.Linear(1, 1)}, buf)
        path.write_bytes(buf.getvalue())
    elif how == "key_incomplete":
        _resave(path, lambda ck: ck.pop("optims"))


@pytest.fixture(scope="module")
def cli_done(train_store, tmp_path_factory) -> Path:
    """A run finished by :func:`_fit_cli`."""
    rd = tmp_path_factory.mktemp("faults") / "cli"
    assert _fit_cli(train_store, rd)[0] == 0
    return rd


@pytest.mark.parametrize("how", ["truncated", "zero_bytes", "zeroed", "foreign", "pickled_object", "key_incomplete"])
def test_a_damaged_checkpoint_is_one_line(cli_done, train_store, tmp_path, how):
    """Resuming (`uvtrain fit`) from a damaged checkpoint.pt: one line naming it, exit 2 (tracebacks of 60-180 lines,
    or a bare `Aborted.` for an empty file, before); never the advice to load with weights_only=False."""
    rd = _copy(cli_done, tmp_path)
    _damage(rd / CHECKPOINT, how)
    line = _one_line(_fit_cli(train_store, rd), str(rd / CHECKPOINT))
    assert "weights_only" not in line
    if how in ("truncated", "zero_bytes", "zeroed", "foreign"):  # inference needs no optimiser state
        with pytest.raises(RunError, match=str(rd / CHECKPOINT)):
            load_trained(rd)


def test_a_damaged_best_pt_is_one_line(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(RunError, match="best.pt is empty"):
        checkpoint_record(tmp_path / "best.pt", "val_best")


def test_a_full_disk_while_checkpointing_is_one_line(done, train_store, tmp_path, monkeypatch):
    """Disk full during the checkpoint write (an OSError(ENOSPC) from the file's write, which torch.save reports as
    "unexpected pos"): one line, the previous checkpoint intact, no temporary file left."""
    import train.runs as runs

    real_open = open

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **kw):
        return Full(path, "wb") if "w" in mode and ".pt.tmp-" in str(path) else real_open(path, mode, *a, **kw)

    monkeypatch.setattr(runs, "open", full_open, raising=False)
    before = (done / CHECKPOINT).read_bytes()
    rd = _copy(done, tmp_path)
    with pytest.raises(RunError, match=r"checkpoint\.pt: checkpoint not written \(No space left on device\); the "
                                       r"previous checkpoint\.pt is intact"):
        atomic_save(torch.load(rd / CHECKPOINT, weights_only=True), rd / CHECKPOINT)
    assert (rd / CHECKPOINT).read_bytes() == before and not list(rd.glob(".*.tmp-*"))
    _one_line(_fit_cli(train_store, tmp_path / "new"), str(tmp_path / "new" / CHECKPOINT), "No space left")
    assert not list((tmp_path / "new").glob(".*.tmp-*"))


def test_a_uv_size_changed_under_a_run_is_one_line(done, train_store, tmp_path):
    """The generator of another UV size in the checkpoint (the store rebuilt with --uv-size 64): the state-dict
    mismatch is one line naming the file, in fit and in inference."""
    rd = _copy(done, tmp_path)
    cfg = short(train_store)
    _resave(rd / CHECKPOINT, lambda ck: ck["models"].__setitem__("generator",
                                                                 UVGenerator(64, cfg.generator).state_dict()))
    with pytest.raises(RunError, match=r"checkpoint\.pt: its generator does not fit this run's network \(.*UV size"):
        fit(cfg, opts(rd))
    with pytest.raises(RunError, match="its generator does not fit"):
        load_trained(rd)
    tr = Trainer(cfg, opts(tmp_path / "other"))
    with pytest.raises(RunError, match="does not fit"):
        tr.load_state_dict(load_checkpoint(rd / CHECKPOINT), rd / CHECKPOINT)
