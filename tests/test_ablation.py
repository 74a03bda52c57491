"""What the ablation table of issue 19 needs from `uvtrain fit`: D_ctr's own weight (``--w-ctr``), a discriminator
weighted 0 is never run, the paper's per-texel sampler head as a flag (``--sampler-control-size 0``), and generator
variants trained from one pre-trained sampler (``--init-sampler``); and ``scripts/ablation_table.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.files import sha256_file
from tests.test_train import _metrics, opts, tiny
from train import console
from train.cli import app
from train.config import LossWeights
from train.loop import Trainer, active_discriminators, fit
from train.losses import total_generator_loss
from train.runs import CHECKPOINT, SAMPLER_CHECKPOINT, atomic_save
from train.warmstart import INIT_SAMPLER

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(path: Path, net: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["models"][net]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ --w-ctr
def test_w_ctr_weighs_d_ctr_term_as_w_side_weighs_d_sd():
    terms = {"loss_adv_ctr": torch.tensor(0.3), "loss_adv_sd": torch.tensor(0.5), "loss_adv_face": torch.tensor(0.7)}
    w = LossWeights(adv=0.1, ctr=2.0, side=0.25)
    assert float(total_generator_loss(terms, w)) == pytest.approx(0.1 * (2.0 * 0.3 + 0.25 * 0.5 + 0.7))
    assert float(total_generator_loss(terms, LossWeights(adv=0.1))) == pytest.approx(0.1 * (0.3 + 0.5 * 0.5 + 0.7))
    assert active_discriminators(LossWeights()) == ("ctr", "sd", "face")
    assert active_discriminators(LossWeights(ctr=0.0, side=0.0)) == ("face",)
    assert active_discriminators(LossWeights(adv=0.0)) == ()


@pytest.mark.parametrize("weights, trained", [(LossWeights(ctr=0.0, side=0.0), ("face",)), (LossWeights(adv=0.0), ())])
def test_a_discriminator_weighted_zero_is_never_run(train_store, tmp_path, weights, trained):
    cfg = tiny(train_store, sampler_steps=1, sampler_finetune_steps=0, generator_steps=2, weights=weights)
    init = {k: v.clone() for k, v in Trainer(cfg, opts(tmp_path / "init")).discs.state_dict().items()}
    calls = []
    import train.models as models

    real = models.PatchDiscriminator.forward

    def spy(self, x):
        calls.append(id(self))
        return real(self, x)

    models.PatchDiscriminator.forward = spy
    try:
        result = fit(cfg, opts(tmp_path / "r"))
    finally:
        models.PatchDiscriminator.forward = real
    assert result["step"] == 3
    rows = [r for r in _metrics(tmp_path / "r") if r["phase"] == "generator"]
    keys = set().union(*rows)
    for name in ("ctr", "sd", "face"):
        assert (f"loss_adv_{name}" in keys) == (name in trained), (name, sorted(keys))
        assert (f"loss_d_{name}" in keys) == (name in trained), (name, sorted(keys))
    after = _state(tmp_path / "r" / CHECKPOINT, "discriminators")
    for name in ("ctr", "sd", "face"):
        same = _equal({k: v for k, v in after.items() if k.startswith(name)},
                      {k: v for k, v in init.items() if k.startswith(name)})
        assert same == (name not in trained), name
    # D_face alone: one forward in each generator step (the generator's term) and one in each D step
    assert len(calls) == 2 * 2 * len(trained)
    assert any("not trained" in n or "no discriminator" in n for n in result["notes"]), result["notes"]


# ------------------------------------------------------------------------------------- --sampler-control-size
def _recorded_fit(monkeypatch, *flags) -> dict:
    recorded = {}

    def record(cfg, run):
        recorded.update(cfg=cfg, run=run)
        return 0

    monkeypatch.setattr(console, "run_fit", record)
    res = CliRunner().invoke(app, ["fit", "--store", "s.zarr", "--run-dir", "r", *map(str, flags)])
    assert res.exit_code == 0, res.output
    return recorded


@pytest.mark.parametrize("given, control", [((), 19), (("--sampler-control-size", 0), None),
                                            (("--sampler-control-size", 7), 7)])
def test_sampler_control_size_0_is_the_papers_per_texel_head(monkeypatch, given, control):
    assert _recorded_fit(monkeypatch, *given)["cfg"].sampler.control_size == control


# ------------------------------------------------------------------------------------------- --init-sampler
def _cli(*args):
    res = CliRunner().invoke(app, ["fit", *map(str, args), "--no-progress", "--no-tensorboard"])
    return res, [ln for ln in res.output.splitlines() if ln.strip()]


def _flags(store, run_dir, *extra):
    return ["--store", store, "--run-dir", run_dir, "--sampler-steps", 3, "--sampler-finetune-steps", 1,
            "--generator-steps", 2, "--batch-size", 2, "--image-size", 64, "--sampler-image-size", 48,
            "--sampler-grid", 16, "--channels", 8, "--workers", 0, "--identity", "none", "--log-every", 1, *extra]


@pytest.fixture(scope="module")
def pretrained(train_store, tmp_path_factory) -> Path:
    """A run whose sampler phase is done (``--phase sampler``): the source of the generator variants."""
    src = tmp_path_factory.mktemp("ablation") / "sampler"
    res, _ = _cli(*_flags(train_store, src, "--phase", "sampler"))
    assert res.exit_code == 0, res.output
    assert torch.load(src / SAMPLER_CHECKPOINT, weights_only=True)["step"] == 3
    return src


@pytest.mark.parametrize("variant, source", [(("--w-ctr", 0, "--w-side", 0), "dir"), (("--w-sym", 0), "file")])
def test_generator_variants_start_from_one_pretrained_sampler(train_store, tmp_path, pretrained, variant, source):
    init = pretrained if source == "dir" else pretrained / SAMPLER_CHECKPOINT
    run = tmp_path / "variant"
    res, _ = _cli(*_flags(train_store, run, "--init-sampler", init, *variant))
    assert res.exit_code == 0, res.output
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [4, 5] and {r["phase"] for r in rows} == {"generator"}  # from step 3 on
    src_sampler = _state(pretrained / SAMPLER_CHECKPOINT, "sampler")
    assert _equal(_state(run / CHECKPOINT, "sampler"), src_sampler)  # frozen in the generator phase
    assert _equal(_state(run / SAMPLER_CHECKPOINT, "sampler"), src_sampler)  # the run is a source in turn
    assert not _equal(_state(run / CHECKPOINT, "generator"), _state(pretrained / SAMPLER_CHECKPOINT, "generator"))
    record = json.loads((run / INIT_SAMPLER).read_text())
    assert record["path"] == str((pretrained / SAMPLER_CHECKPOINT).resolve())
    assert record["sha256"] == sha256_file(pretrained / SAMPLER_CHECKPOINT) and record["step"] == 3
    assert record["config"]["sampler"]["grid_size"] == 16
    if "--w-ctr" in variant:
        assert not any("loss_adv_ctr" in r or "loss_d_sd" in r for r in rows)
    # the same command again (a requeue) resumes, with a note that --init-sampler is not used
    res, _ = _cli(*_flags(train_store, run, "--init-sampler", init, *variant))
    assert res.exit_code == 0 and "--init-sampler" in res.output and "ignored" in res.output, res.output


@pytest.mark.parametrize("case", ["grid", "finetune", "phase_sampler", "unfinished", "no_file", "lost_flag"])
def test_init_sampler_refusals_are_one_line(train_store, tmp_path, pretrained, case):
    run, extra, want = tmp_path / "variant", [], ""
    init = pretrained
    if case == "grid":
        extra, want = ["--sampler-grid", 20], "sampler.grid_size: its sampler 16, this run 20"
    elif case == "finetune":
        extra, want = ["--sampler-finetune-steps", 0], "finetune_steps: its sampler 1, this run 0"
    elif case == "phase_sampler":
        extra, want = ["--phase", "sampler"], "--phase sampler would train nothing"
    elif case == "unfinished":  # the checkpoint of a run stopped inside its sampler phase
        shutil.copytree(pretrained, tmp_path / "stopped")
        init, want = tmp_path / "stopped" / CHECKPOINT, "not at the end of its sampler phase (step 3)"
        ck = torch.load(init, weights_only=True)
        atomic_save({**ck, "step": 2}, init)
    elif case == "no_file":
        init, want = tmp_path / "nowhere", "no such file"
    elif case == "lost_flag":  # started from a sampler, stopped before its first checkpoint, rerun without the flag
        run.mkdir()
        (run / INIT_SAMPLER).write_text(json.dumps({"path": str(pretrained / SAMPLER_CHECKPOINT)}))
        res, lines = _cli(*_flags(train_store, run))
        assert res.exit_code == 2 and len(lines) == 1 and "pass --init-sampler again" in lines[0], res.output
        return
    res, lines = _cli(*_flags(train_store, run, "--init-sampler", init, *extra))
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], res.output
    assert not (run / CHECKPOINT).exists()


# ------------------------------------------------------------------------------------- ablation_table.py
def _fake_eval(uv_l1: float, with_id: bool) -> dict:
    def row(l1):
        r = {"l1": l1, "ssim": 1 - 10 * l1, "l1_face": 6 * l1}
        if with_id:
            r.update(id_recon=0.95, id_front=0.9)
        bands = {"all": (6.0, 28.0, 48), "|yaw|<30": (5.5, 20.0, 13), "30-60": (6.0, 27.0, 21),
                 ">60": (None, None, 0)}
        r["completion_mae_255"] = {b: {"seen": s, "unseen": u, "all": s, "samples": n}
                                   for b, (s, u, n) in bands.items()}
        return r

    return {"samples": 48, "checkpoint_step": 7500,
            "methods": {"bfm": row(0.005), "bl": row(0.003), "sampler": row(0.013), "generator": row(uv_l1)}}


def test_ablation_table_reads_the_eval_jsons(tmp_path):
    rows = {"full": 0.004, "no_ctr_sd": 0.0045, "no_sym": 0.0042}
    (tmp_path / "eval").mkdir()
    for name, l1 in rows.items():
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(_fake_eval(l1, with_id=True)))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    header = lines[0]
    for col in ("L1", "SSIM", "ID Recon", "ID Front", "seen / unseen", r"\|yaw\| < 30 (13)", "> 60 (0)"):
        assert col in header, header
    body = lines[2:]
    assert body[0].startswith("| UV_bfm") and body[1].startswith("| UV_bl") and body[2].startswith("| sampler alone")
    assert all(ln.count(" | ") == header.count(" | ") for ln in body)  # no stray cell separators
    full = next(ln for ln in body if ln.startswith("| full method"))
    assert "0.0040" in full and "0.960" in full and "0.950" in full and "6.0 / 28.0" in full and "– / –" in full
    assert any(ln.startswith("| without D_ctr and D_sd") and "0.0045" in ln for ln in body)
    assert len(body) == 3 + len(rows)  # the rows not yet evaluated are left out
    # without identity columns (eval --identity none) the ID columns are left out
    for name in rows:
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(_fake_eval(0.004, with_id=False)))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "ID Recon" not in out


def test_ablations_script_parses():
    for script in ("ablations.sh", "recipe_flags.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
