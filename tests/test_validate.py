"""``uvtrain fit --val-store`` (issue 19): held-out metrics rows at the expected steps, ``best.pt`` chosen by the named
metric and kept across a resume, training unchanged by validation, validation equal to ``uvtrain eval``, incompatible
held-out stores refused in one line, and ``uvtrain plot``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TRAIN_STORE_FLAGS
from tests.test_train import opts, tiny
from train import validate
from train.cli import app
from train.config import EvalConfig, InferConfig, RunOptions
from train.evaluate import YAW_BANDS, evaluate
from train.infer import Inferencer
from train.loop import fit
from train.runs import BEST, CHECKPOINT, METRICS, RunError, load_trained
from train.validate import BAND_KEYS, Validator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLAT_METRICS = validate.flat_metrics


@pytest.fixture(scope="module")
def val_store(tmp_path_factory) -> str:
    """8 held-out faces: the training store's sizes and face model, another seed."""
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    out = tmp_path_factory.mktemp("val") / "val.zarr"
    flags = TRAIN_STORE_FLAGS | {"count": 8, "pca_samples": 8, "seed": 11}
    cfg, run = make_config(BuildArgs(out=out, **flags))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    assert summary.ok == 8, summary
    return str(out)


def _rows(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines()]


def _val(run_dir) -> list[dict]:
    return [r for r in _rows(run_dir) if r["phase"] == "val"]


@pytest.fixture(scope="module")
def runs(train_store, val_store, tmp_path_factory):
    """The same tiny run without and with validation (every 3 steps and at each stage's end, all 8 samples)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny(train_store)  # stages: sampler [0, 2), finetune [2, 4), generator [4, 8)
    fit(cfg, opts(root / "plain"))
    fit(cfg, opts(root / "val", val_store=val_store, val_every=3, val_samples=0, tensorboard=True))
    return root / "plain", root / "val"


def test_validation_rows_at_every_n_steps_and_each_stage_end(runs):
    _, rd = runs
    val = _val(rd)
    assert [(r["step"], r["stage"], r["method"]) for r in val] == [
        (2, "sampler", "sampler"), (3, "finetune", "sampler"), (4, "finetune", "sampler"),
        (6, "generator", "generator"), (8, "generator", "generator")]
    bands = [f"val/{b}/{k}_mae" for b in BAND_KEYS.values() for k in ("seen", "unseen", "all")]
    for r in val:
        assert r["val/samples"] == 8
        keys = {f"val/{k}" for k in ("l1", "l1_face", "ssim", "seen_mae", "unseen_mae", "all_mae")}
        assert keys <= set(r), r
        assert any(b in r for b in bands), r
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("val/")), r
        assert 0 <= r["val/l1"] <= r["val/l1_face"] <= 1 and -1 <= r["val/ssim"] <= 1
    # the training rows are those of a run without validation (every step, log_every 1)
    assert [r["step"] for r in _rows(rd) if r["phase"] != "val"] == list(range(1, 9))


def test_tensorboard_gets_the_val_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs[1] / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val/l1", "val/l1_face", "val/ssim", "val/seen_mae", "val/unseen_mae", "val/all_mae"} <= set(tags), tags
    assert [e.step for e in acc.Scalars("val/l1")] == [2, 3, 4, 6, 8]


def test_validation_does_not_change_training(runs):
    plain, rd = runs
    strip = [{k: v for k, v in r.items() if k.startswith("loss") or k == "step"} for r in _rows(plain)]
    got = [{k: v for k, v in r.items() if k.startswith("loss") or k == "step"} for r in _rows(rd)
           if r["phase"] != "val"]
    assert got == strip  # bit-identical losses
    a, b = (torch.load(d / CHECKPOINT, weights_only=True)["models"] for d in runs)
    for net in a:
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), (net, k)


def test_best_pt_is_the_best_generator_and_evaluates_as_validated(runs, val_store, tmp_path):
    _, rd = runs
    gen = [r for r in _val(rd) if r["method"] == "generator"]
    best = min(gen, key=lambda r: r["val/l1"])
    ck = torch.load(rd / BEST, weights_only=True)
    assert ck["step"] == best["step"] and ck["val_best"]["value"] == best["val/l1"]
    assert ck["val_best"]["metric"] == "l1" and ck["val_best"]["method"] == "generator"
    assert set(ck) == set(torch.load(rd / CHECKPOINT, weights_only=True))  # checkpoint.pt's format
    # uvtrain eval of best.pt on the whole held-out store gives the numbers validation logged
    res = evaluate(EvalConfig(store=val_store, out=tmp_path / "m.json", checkpoint=rd / BEST, identity="none"))
    assert res["checkpoint_step"] == best["step"]
    row = res["methods"]["generator"]
    for k in ("l1", "l1_face", "ssim"):
        assert row[k] == pytest.approx(best[f"val/{k}"], rel=1e-5, abs=1e-7), k
    assert row["completion_mae_255"]["all"]["unseen"] == pytest.approx(best["val/unseen_mae"], rel=1e-5)
    assert load_trained(rd, checkpoint=rd / BEST)[3] == best["step"]
    inf = Inferencer(InferConfig(checkpoint=rd / BEST, images=tmp_path, out=tmp_path / "o", framing="none",
                                 fitter="none"))
    assert inf.step == best["step"]


def _scripted(monkeypatch, values):
    """Validation reports ``values`` in turn as every metric (the networks still run)."""
    it = iter(values)

    def fake(row):
        v = next(it)
        return {k: v for k in FLAT_METRICS(row)}

    monkeypatch.setattr(validate, "flat_metrics", fake)


@pytest.mark.parametrize("metric, best_step", [("l1", 4), ("ssim", 5)])
def test_best_is_chosen_by_the_named_metric(train_store, val_store, tmp_path, monkeypatch, metric, best_step):
    # validations at steps 1, 2 (sampler) then 3..6 (generator): the sampler's records do not count against UV_pred's
    _scripted(monkeypatch, [0.1, 0.05, 0.5, 0.3, 0.9, 0.35])
    cfg = tiny(train_store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=4)
    rd = tmp_path / "r"
    result = fit(cfg, opts(rd, val_store=val_store, val_every=1, val_samples=2, val_metric=metric))
    assert [r["step"] for r in _val(rd)] == [1, 2, 3, 4, 5, 6]
    ck = torch.load(rd / BEST, weights_only=True)
    assert ck["step"] == best_step and result["val_best"]["step"] == best_step
    assert torch.load(rd / CHECKPOINT, weights_only=True)["val_best"] == ck["val_best"]


def test_a_resumed_run_keeps_a_better_best(train_store, val_store, tmp_path, monkeypatch):
    """best.pt written after the last checkpoint survives a resume that validates worse (the checkpoint's copy of the
    record lags behind it)."""
    cfg = tiny(train_store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=4)
    rd = tmp_path / "r"
    run = opts(rd, val_store=val_store, val_every=1, val_samples=2, checkpoint_every=3)

    class Stop(Exception):
        pass

    def cut(row, stop):
        if row["step"] == 5:
            raise Stop

    _scripted(monkeypatch, [0.1, 0.05, 0.5, 0.3])  # steps 1-4: best.pt at step 4, after the checkpoint at 3
    with pytest.raises(Stop):
        fit(cfg, run, on_log=cut)
    assert torch.load(rd / CHECKPOINT, weights_only=True)["step"] == 3
    assert torch.load(rd / BEST, weights_only=True)["step"] == 4
    _scripted(monkeypatch, [0.45, 0.6, 0.35])  # steps 4-6 again, all worse than 0.3
    result = fit(cfg, run)
    assert result["resumed"] and result["val_best"]["step"] == 4 and result["val_best"]["value"] == 0.3
    assert torch.load(rd / BEST, weights_only=True)["step"] == 4
    assert [r["step"] for r in _val(rd)] == [1, 2, 3, 4, 5, 6]  # the lost rows are not duplicated


def test_an_incompatible_val_store_is_refused_in_one_line(train_store, val_store, tmp_path):
    import zarr

    other = tmp_path / "other.zarr"
    shutil.copytree(val_store, other)
    zarr.open_group(str(other), mode="r+").attrs["face_model_hash"] = "0123456789abcdef"
    cfg = tiny(train_store)
    with pytest.raises(RunError, match=r"--val-store .* face model 0123456789abcdef.*this run") as e:
        fit(cfg, opts(tmp_path / "r", val_store=str(other)))
    assert "\n" not in str(e.value)
    from common.store import StoreReader

    reader = StoreReader(train_store)
    run = RunOptions(run_dir=tmp_path / "r", val_store=val_store)
    with pytest.raises(RunError, match=r"UV size 32, this run 48") as e:
        Validator(run, reader.attrs["face_model_hash"], 48, torch.device("cpu"))
    res = CliRunner().invoke(app, ["fit", "--store", train_store, "--run-dir", str(tmp_path / "c"), "--val-store",
                                   str(tmp_path / "missing.zarr"), "--no-progress", "--sampler-steps", "1",
                                   "--generator-steps", "0", "--workers", "0", "--channels", "8"])
    assert res.exit_code == 2 and "--val-store" in res.output, res.output


def test_band_keys_name_every_yaw_band():
    assert list(BAND_KEYS) == [b[0] for b in YAW_BANDS]


def test_plot_draws_the_curves(runs, tmp_path):
    res = CliRunner().invoke(app, ["plot", str(runs[1])])
    assert res.exit_code == 0, res.output
    png = runs[1] / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["plot", str(runs[0]), "--out", str(tmp_path / "p.png")])  # no val rows
    assert res.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 0, res.output
    res = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 2 and "no metrics.jsonl" in res.output


def _ddp_worker(rank: int, world: int, port: int, store: str, val_store: str, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    calls: list[int] = []
    real = Validator.__call__

    def spy(self, step, *a, **kw):
        calls.append(step)
        return real(self, step, *a, **kw)

    Validator.__call__ = spy
    cfg = tiny(store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=2)
    fit(cfg, opts(Path(run_dir), val_store=val_store, val_every=1, val_samples=2))
    torch.save({"calls": calls}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_rank_0_validates_and_the_other_ranks_wait(train_store, val_store, tmp_path):
    import torch.multiprocessing as mp

    from tests.test_train import _free_port

    mp.spawn(_ddp_worker, args=(2, _free_port(), train_store, val_store, str(tmp_path / "r"), str(tmp_path)),
             nprocs=2)
    calls = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["calls"] for r in (0, 1)]
    assert calls == [[1, 2, 3, 4], []]
    assert [r["step"] for r in _val(tmp_path / "r")] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "r" / BEST, weights_only=True)["val_best"]["method"] == "generator"
