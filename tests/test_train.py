"""`uvtrain fit`: one step changes the weights, the sampler overfits, exact resume, DDP, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train.cli import app
from train.config import DiscriminatorConfig, GeneratorConfig, RunOptions, SamplerConfig, TrainConfig
from train.loop import StageKind, Trainer, fit, schedule
from train.runs import CHECKPOINT, CONFIG, METRICS, RunError


def tiny(store: str, **kw) -> TrainConfig:
    """A network small enough to train for a few steps on CPU in a second or two."""
    base = dict(store=store, sampler_steps=4, sampler_finetune_steps=2, generator_steps=4, batch_size=2,
                image_size=64, sampler_image_size=48, workers=0, rotate_share=0.5,
                sampler=SamplerConfig(grid_size=24, channels=8, max_channels=32, feature_dim=32, head_hidden=32),
                generator=GeneratorConfig(channels=8, max_channels=32, n_res=1),
                discriminator=DiscriminatorConfig(channels=8, n_layers=2), identity="none")
    base.update(kw)
    return TrainConfig(**base)


def opts(run_dir: Path, **kw) -> RunOptions:
    base = dict(run_dir=run_dir, log_every=1, checkpoint_every=1000, progress=False, tensorboard=False)
    base.update(kw)
    return RunOptions(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, weights_only=True)
    return {f"{m}.{k}": v for m, sd in ck["models"].items() for k, v in sd.items()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines()]


def test_schedule_follows_section_4_1(train_store):
    cfg = tiny(train_store, sampler_steps=10, sampler_finetune_steps=3, generator_steps=5)
    st = schedule(cfg, 32)
    assert [(s.name, s.start, s.stop, s.image_size, s.uv_out) for s in st] == [
        ("sampler", 0, 7, 48, 24), ("finetune", 7, 10, 64, 32), ("generator", 10, 15, 64, 32)]
    assert [s.kind for s in st] == [StageKind.SAMPLER, StageKind.SAMPLER, StageKind.GENERATOR]


def test_one_step_changes_the_weights(train_store, tmp_path):
    cfg = tiny(train_store)
    tr = Trainer(cfg, opts(tmp_path / "r"))
    tr.init_sampler_template()
    from train.data import DataConfig, StoreStream

    b = next(iter(StoreStream(train_store, DataConfig(batch_size=2, image_size=64, rotate_share=0.5))))
    before = {k: v.clone() for k, v in [*tr.sampler.state_dict().items(), *tr.generator.state_dict().items()]}
    st = schedule(cfg, tr.uv_size)
    out = tr.sampler_step(b, st[1])
    assert set(out.terms) >= {"loss", "loss_uv", "loss_face", "loss_tv"}
    assert {"image", "uv_spl", "uv_gt", "target"} <= set(out.images)
    assert any(not torch.equal(before[k], v) for k, v in tr.sampler.state_dict().items())
    d_before = {k: v.clone() for k, v in tr.discs.state_dict().items()}
    out = tr.generator_step(b)
    assert {"loss_rec_uv", "loss_rec_face", "loss_sym", "loss_tv", "loss_adv_face"} <= set(out.terms)
    assert any(not torch.equal(before[k], v) for k, v in tr.generator.state_dict().items())
    assert all(torch.equal(d_before[k], v) for k, v in tr.discs.named_parameters())  # D has its own step
    assert "loss_d_face" in tr.discriminator_step(b, out.fakes)
    assert any(not torch.equal(d_before[k], v) for k, v in tr.discs.state_dict().items())


@pytest.mark.parametrize("w_grid", [0.0, 1.0])
def test_sampler_overfits_a_tiny_store(train_store, tmp_path, w_grid):
    """A few dozen steps on 24 faces lower Eq. 5 clearly, with and without the auxiliary grid term."""
    base = TrainConfig(store="")
    cfg = tiny(train_store, sampler_steps=60, sampler_finetune_steps=0, generator_steps=0, batch_size=4,
               optim=dataclasses.replace(base.optim, lr_sampler=1e-3),
               weights=dataclasses.replace(base.weights, grid=w_grid))
    fit(cfg, opts(tmp_path / "r", log_every=10, phase="sampler"))
    rows = _metrics(tmp_path / "r")
    first, last = rows[0], rows[-1]
    assert last["step"] == 60 and last["phase"] == "sampler"
    eq5 = [r["loss_uv"] + r["loss_face"] + base.weights.tv * r["loss_tv"] for r in (first, last)]
    assert eq5[1] < 0.8 * eq5[0], (first, last)
    assert last["loss"] < first["loss"], (first, last)  # with the grid term when it is on
    assert ("loss_grid" in last) == bool(w_grid)


def test_resume_after_interruption_gives_the_same_run(train_store, tmp_path):
    """Stopped at step k (sampler or generator phase) and resumed: the same weights and logged losses."""
    cfg = tiny(train_store)
    fit(cfg, opts(tmp_path / "full", checkpoint_every=3))
    ref_w, ref_m = _weights(tmp_path / "full" / CHECKPOINT), _metrics(tmp_path / "full")
    assert ref_m[-1]["step"] == 8

    class Stop(Exception):
        pass

    for k in (3, 6):
        rd = tmp_path / f"cut{k}"

        def cut(row, stop, k=k):
            if row["step"] == k + 1:  # one step past the checkpoint at k: that step is lost and redone
                raise Stop

        with pytest.raises(Stop):
            fit(cfg, opts(rd, checkpoint_every=3), on_log=cut)
        assert torch.load(rd / CHECKPOINT, weights_only=True)["step"] == k
        result = fit(cfg, opts(rd, checkpoint_every=3))
        assert result["resumed"] and result["step"] == 8
        got = _weights(rd / CHECKPOINT)
        for name, v in ref_w.items():
            torch.testing.assert_close(got[name], v, rtol=0, atol=1e-6, msg=name)
        m = _metrics(rd)
        assert [r["step"] for r in m] == [r["step"] for r in ref_m]
        for a, b in zip(m, ref_m, strict=True):
            assert {k2: v for k2, v in a.items() if "loss" in k2} == {k2: v for k2, v in b.items() if "loss" in k2}


def test_rerun_with_another_config_is_refused(train_store, tmp_path):
    cfg = tiny(train_store, sampler_steps=1, sampler_finetune_steps=0, generator_steps=0)
    fit(cfg, opts(tmp_path / "r"))
    other = dataclasses.replace(cfg, batch_size=3, seed=4)
    with pytest.raises(RunError, match=r"batch_size: run dir 2, this run 3.*seed: run dir 0, this run 4"):
        fit(other, opts(tmp_path / "r"))
    result = fit(other, opts(tmp_path / "r", overwrite=True))
    assert result["step"] == 1 and not result["resumed"]
    assert json.loads((tmp_path / "r" / CONFIG).read_text())["batch_size"] == 3


def test_generator_phase_needs_the_sampler(train_store, tmp_path):
    with pytest.raises(RunError, match="sampler phase is not done"):
        fit(tiny(train_store), opts(tmp_path / "r", phase="generator"))


def test_nan_stops_with_the_term_and_step(train_store, tmp_path, monkeypatch):
    import train.loop as loop

    real = loop.sampler_loss

    def poisoned(*a, **kw):
        terms = real(*a, **kw)
        terms["loss_face"] = terms["loss_face"] * float("nan")
        return terms

    monkeypatch.setattr(loop, "sampler_loss", poisoned)
    with pytest.raises(RunError, match=r"loss_face.*step 1;.*no checkpoint was written yet"):
        fit(tiny(train_store), opts(tmp_path / "r"))
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_previews_and_metrics_are_written(train_store, tmp_path):
    fit(tiny(train_store), opts(tmp_path / "r", log_every=2, checkpoint_every=4, tensorboard=True))
    rows = _metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert {"step", "phase", "loss", "lr", "steps_per_s", "data_wait_s"} <= set(r)
    pngs = sorted(p.name for p in (tmp_path / "r" / "previews").glob("*.png"))
    assert pngs == ["finetune_0000004.png", "generator_0000008.png", "sampler_0000002.png"]  # every 4 + stage ends
    assert any((tmp_path / "r" / "tb").iterdir())


# --------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return CliRunner().invoke(app, ["fit", *map(str, args), "--no-progress", "--no-tensorboard"])


def _tiny_flags(store, run_dir):
    return ["--store", store, "--run-dir", run_dir, "--sampler-steps", 2, "--sampler-finetune-steps", 0,
            "--generator-steps", 1, "--batch-size", 2, "--image-size", 64, "--sampler-image-size", 48,
            "--sampler-grid", 16, "--channels", 8, "--workers", 0]


def test_cli_trains_and_resumes(train_store, tmp_path):
    res = _cli(*_tiny_flags(train_store, tmp_path / "r"))
    assert res.exit_code == 0, res.output
    assert torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["step"] == 3
    res = _cli(*_tiny_flags(train_store, tmp_path / "r"))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case", ["no_store", "old_schema", "no_parent", "cuda", "phase", "mismatch", "damaged"])
def test_cli_errors_are_one_line(train_store, tmp_path, case):
    flags = _tiny_flags(train_store, tmp_path / "r")
    if case == "no_store":
        flags[1] = tmp_path / "missing.zarr"
    elif case == "old_schema":
        import shutil

        import zarr

        old = tmp_path / "old.zarr"
        shutil.copytree(train_store, old)
        g = zarr.open_group(str(old), mode="r+")
        g.attrs["schema_version"] = 1
        flags[1] = old
    elif case == "no_parent":
        flags[3] = tmp_path / "a" / "b" / "r"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        flags += ["--device", "cuda"]
    elif case == "phase":
        flags += ["--phase", "nope"]
    elif case == "mismatch":
        assert _cli(*flags).exit_code == 0
        flags[flags.index("--batch-size") + 1] = 3
    elif case == "damaged":  # a deleted chunk file, read by a loader worker process (issue 20, item 2)
        from tests.test_data import _damaged

        flags[1] = _damaged(train_store, tmp_path, "image", 0)
        flags[flags.index("--workers") + 1] = 2
    res = _cli(*flags)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, store: str, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from train import loop

    seen: list[list[int]] = []
    real_step = loop.Trainer.sampler_step

    def spy(self, b, stage):
        seen.append(b["index"].tolist())
        return real_step(self, b, stage)

    loop.Trainer.sampler_step = spy
    cfg = tiny(store, sampler_steps=3, sampler_finetune_steps=0, generator_steps=2)
    captured = {}
    real_init = loop.Trainer.__init__

    def keep(self, *a, **kw):
        real_init(self, *a, **kw)
        captured["tr"] = self

    loop.Trainer.__init__ = keep
    fit(cfg, opts(Path(run_dir)))
    tr = captured["tr"]
    state = {f"s.{k}": v for k, v in tr.sampler.state_dict().items()}
    state.update({f"g.{k}": v for k, v in tr.generator.state_dict().items()})
    torch.save({"seen": seen, "state": state}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_split_the_data_and_agree_on_weights(train_store, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), train_store, str(tmp_path / "r"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for step0, step1 in zip(r0["seen"], r1["seen"], strict=True):
        assert not set(step0) & set(step1)
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=1e-6, msg=k)
    assert torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["step"] == 5


def test_bf16_autocast_and_a_torchscript_identity_network(train_store, tmp_path):
    """The AMP path (bf16 autocast, here on CPU) trains with finite losses; --identity PATH enables Eq. 13."""

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    torch.manual_seed(0)
    net = tmp_path / "id.pt"
    torch.jit.script(Features()).save(str(net))
    cfg = tiny(train_store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=2, identity=str(net))
    fit(cfg, opts(tmp_path / "r", amp="bf16"))
    rows = _metrics(tmp_path / "r")
    assert "loss_id" in rows[-1] and rows[-1]["phase"] == "generator"
    for r in rows:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if "loss" in k), r
    with pytest.raises(RunError, match=r"expected one of none \| dlib"):
        fit(dataclasses.replace(cfg, identity="arcface"), opts(tmp_path / "r2"))


def test_dlib_identity_network_in_the_generator_step(train_store, tmp_path):
    """--identity dlib: Eq. 13 on chips aligned by the fit's landmarks (the batch's points0 / points1)."""
    from common.identity.dlibnet import dlib_model_path

    try:
        dlib_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the identity extra (pip install -e .[identity]): {e}")
    cfg = tiny(train_store, sampler_steps=1, sampler_finetune_steps=0, generator_steps=2, identity="dlib")
    fit(cfg, opts(tmp_path / "r"))
    rows = [r for r in _metrics(tmp_path / "r") if r["phase"] == "generator"]
    assert rows and all(0 < r["loss_id"] < 1 for r in rows), rows


def test_rendering_on_the_device_equals_rendering_in_the_loader(train_store, tmp_path):
    """--render-on device (the GPU path: the step rasterises) trains exactly like the loader path."""
    cfg = tiny(train_store, sampler_steps=2, sampler_finetune_steps=1, generator_steps=2)
    fit(cfg, opts(tmp_path / "loader", render_on="loader"))
    fit(cfg, opts(tmp_path / "device", render_on="device"))
    a, b = _weights(tmp_path / "loader" / CHECKPOINT), _weights(tmp_path / "device" / CHECKPOINT)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6, msg=k)
