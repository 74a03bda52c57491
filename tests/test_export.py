"""``uvtrain export``: the exported weights give the run's textures, the manifest catches a changed file, best.pt and
the held-out rows reach the model card, runs that cannot be exported are one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.imageio import read_image, write_png
from common.store import StoreReader
from train.cli import app
from train.config import ExportConfig, InferConfig
from train.export import export_run
from train.infer import infer
from train.runs import BEST, CHECKPOINT, EXPORT_MANIFEST, EXPORT_WEIGHTS, RunError, atomic_save, load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    res = CliRunner().invoke(app, ["export", str(trained_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def photo(train_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("photo")
    write_png(d / "face1.png", StoreReader(train_store).sample(1)["image"])
    return d / "face1.png"


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("tb", "previews"))
    return dst


def test_export_round_trip_gives_the_runs_textures(trained_run, exported, photo, train_store, tmp_path):
    manifest = json.loads((exported / EXPORT_MANIFEST).read_text())
    assert set(manifest["files"]) == {EXPORT_WEIGHTS, "config.json", "README.md", "inference/face_model.npz",
                                      "inference/info.json", "inference/uv_valid.npy"}
    assert manifest["source"]["checkpoint"] == CHECKPOINT
    # The same networks: every weight equal, the discriminators and optimisers left behind.
    run_cfg, run_s, run_g, run_step = load_trained(trained_run)
    exp_cfg, exp_s, exp_g, exp_step = load_trained(exported)
    assert (exp_cfg, exp_step) == (run_cfg, run_step) == (run_cfg, manifest["step"])
    for a, b in ((run_s, exp_s), (run_g, exp_g)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # `uvtrain infer` on the export writes the texture the run directory gives, byte for byte.
    for src, out in ((trained_run, tmp_path / "from_run"), (exported, tmp_path / "from_export")):
        sm = infer(InferConfig(checkpoint=src, images=photo, out=out, framing="none", fitter="none", progress=False))
        assert sm.written == 1
    a, b = read_image(tmp_path / "from_run" / "face1_uv.png"), read_image(tmp_path / "from_export" / "face1_uv.png")
    assert a.shape == (StoreReader(train_store).layout.uv_size,) * 2 + (3,) and np.array_equal(a, b)
    card = (exported / "README.md").read_text()
    assert train_store in card and "Held-out metrics\n\nNone" in card and f"step {run_step} of" in card
    assert "non-commercial" in card


def test_a_changed_file_is_refused(exported, photo, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    raw = bytearray((bad / EXPORT_WEIGHTS).read_bytes())
    raw[-1] ^= 0x01  # one bit of the last weight
    (bad / EXPORT_WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(RunError, match="SHA-256 .* does not match export.json"):
        load_trained(bad)
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(bad), "--images", str(photo), "--out",
                                   str(tmp_path / "o"), "--framing", "none", "--fitter", "none", "--no-progress"])
    assert EXPORT_WEIGHTS in _one_line_error(res)
    (bad / EXPORT_WEIGHTS).write_bytes((exported / EXPORT_WEIGHTS).read_bytes())
    (bad / "inference" / "info.json").unlink()
    with pytest.raises(RunError, match="info.json: missing from the export"):
        load_trained(bad)


def test_best_checkpoint_and_held_out_rows_reach_the_card(train_store, tmp_path):
    """A run validated during training (`--val-store`): the default export is its best.pt, and the card shows the
    last held-out row of metrics.jsonl."""
    from tests.test_train import tiny
    from train.config import RunOptions
    from train.loop import fit

    run = tmp_path / "run"
    fit(tiny(train_store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=3),
        RunOptions(run_dir=run, progress=False, tensorboard=False, log_every=1, val_store=train_store, val_every=1,
                   val_samples=2))
    best = torch.load(run / BEST, weights_only=True)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("phase") == "val"][-1]
    manifest = export_run(ExportConfig(run_dir=run, out=tmp_path / "best"))
    assert (manifest["source"]["checkpoint"], manifest["step"]) == (BEST, best["step"])
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"step {val['step']}, stage {val['stage']}, {val['method']}" in card
    assert f"| val/l1 | {val['val/l1']:.4g} |" in card
    assert load_trained(tmp_path / "best")[3] == best["step"]
    last = export_run(ExportConfig(run_dir=run, out=tmp_path / "last", which="last"))
    assert (last["source"]["checkpoint"], last["step"]) == (CHECKPOINT, 5)
    with pytest.raises(RunError, match="not empty; pass --overwrite"):
        export_run(ExportConfig(run_dir=run, out=tmp_path / "last", which="best"))
    export_run(ExportConfig(run_dir=run, out=tmp_path / "last", which="best", overwrite=True))
    assert json.loads((tmp_path / "last" / EXPORT_MANIFEST).read_text())["step"] == best["step"]


def test_runs_that_cannot_be_exported_are_one_line_errors(trained_run, tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained_run / "config.json", empty / "config.json")
    line = _one_line_error(runner.invoke(app, ["export", str(empty), "--out", str(tmp_path / "o1")]))
    assert "no checkpoint.pt to export" in line
    line = _one_line_error(runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "o2"),
                                               "--which", "best"]))
    assert "no best.pt" in line
    nan = _copy_run(trained_run, tmp_path)
    ck = torch.load(nan / CHECKPOINT, weights_only=True)
    name = next(iter(ck["models"]["generator"]))
    ck["models"]["generator"][name].view(-1)[0] = float("nan")
    atomic_save(ck, nan / CHECKPOINT)  # a valid SHA-256: the NaN is what is refused
    line = _one_line_error(runner.invoke(app, ["export", str(nan), "--out", str(tmp_path / "o3")]))
    assert "NaN or inf" in line and f"generator.{name}" in line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_eval_takes_an_export_as_it_takes_the_run(trained_run, exported, train_store, tmp_path):
    from train.config import EvalConfig
    from train.evaluate import evaluate

    got = {}
    for name, src in (("run", trained_run), ("export", exported)):
        got[name] = evaluate(EvalConfig(store=train_store, out=tmp_path / f"{name}.json", checkpoint=src,
                                        identity="none", limit=2, progress=False))
    assert got["export"]["methods"] == got["run"]["methods"]
    assert got["export"]["checkpoint_step"] == got["run"]["checkpoint_step"]
