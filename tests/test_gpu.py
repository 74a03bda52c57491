"""The trainer's CUDA paths (``pytest -m gpu``; skipped without CUDA): the sampler and generator steps under bf16
autocast and under fp16 with the grad scaler, ``--compile``, and a DDP step over NCCL in one process. The renderer's
and the identity network's CUDA checks live in test_render.py and test_identity.py. ``scripts/gpu_check.sh`` runs
them all on a GPU machine."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from tests.test_train import tiny
from train.config import RunOptions
from train.loop import fit
from train.runs import CHECKPOINT, load_checkpoint, load_trained

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = dict(sampler_steps=3, sampler_finetune_steps=1, generator_steps=2)


def _run(train_store, run_dir, **run_kw) -> list[dict]:
    """A tiny run (sampler, fine-tune, generator) logged every step; its metrics rows."""
    opts = dict(run_dir=run_dir, log_every=1, checkpoint_every=1000, progress=False, tensorboard=False)
    fit(tiny(train_store, **STEPS), RunOptions(**{**opts, **run_kw}))
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_finite(rows: list[dict]) -> None:
    assert {r["phase"] for r in rows} >= {"sampler", "generator"}, rows
    for r in rows:
        bad = {k: v for k, v in r.items() if k.startswith("loss") and not torch.isfinite(torch.tensor(v))}
        assert not bad, f"step {r['step']} ({r['phase']}): non-finite {bad}"


def test_bf16_autocast_steps_match_the_cpu_losses(train_store, tmp_path):
    """bf16 autocast (``--amp auto`` on CUDA): every phase trains with finite losses, and the first step's losses
    (same data, same initial weights) are the float32 CPU run's to bf16 precision."""
    gpu = _run(train_store, tmp_path / "gpu", device="cuda", amp="bf16")
    cpu = _run(train_store, tmp_path / "cpu", device="cpu", amp="none")
    _assert_finite(gpu)
    first_gpu, first_cpu = gpu[0], cpu[0]
    assert first_gpu["step"] == first_cpu["step"] == 1
    for k, v in first_cpu.items():
        if k.startswith("loss") and abs(v) > 1e-3:
            assert first_gpu[k] == pytest.approx(v, rel=0.1), (k, first_gpu[k], v)
    # The checkpoint written on the GPU loads on the CPU for inference.
    _, sampler, generator, step = load_trained(tmp_path / "gpu")
    assert step == STEPS["sampler_steps"] + STEPS["generator_steps"]
    assert all(torch.isfinite(p).all() for p in [*sampler.parameters(), *generator.parameters()])


def test_fp16_with_the_grad_scaler(train_store, tmp_path):
    rows = _run(train_store, tmp_path / "r", device="cuda", amp="fp16")
    _assert_finite(rows)
    ck = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    scale = ck["scaler"].get("scale") if isinstance(ck.get("scaler"), dict) else None
    assert scale is not None and 0 < float(scale) < float("inf"), ck.get("scaler")


def test_compile(train_store, tmp_path):
    """``--compile``: torch.compile'd networks train every phase with finite losses."""
    _assert_finite(_run(train_store, tmp_path / "r", device="cuda", compile=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_step(train_store, tmp_path):
    """A process group of one over NCCL; the trainer's networks wrapped as ``Trainer._wrap`` wraps them under
    torchrun (DistributedDataParallel on the rank's GPU, buffers not broadcast); one batch per stage through
    train.loop's steps (sampler, fine-tune, generator + discriminators): finite losses, changed weights, and an
    all-reduce over NCCL that returns its input."""
    import torch.distributed as dist

    from train.data import DataConfig, StoreStream
    from train.distributed import Dist
    from train.loop import StageKind, Trainer, schedule

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = tiny(train_store, **STEPS)
        tr = Trainer(cfg, RunOptions(run_dir=tmp_path / "r", device="cuda", progress=False, tensorboard=False))
        tr.world = Dist(0, 2, 0)  # _wrap wraps in DDP above one rank; the process group itself has one
        tr.sampler_t, tr.generator_t = tr._wrap(tr.sampler), tr._wrap(tr.generator)
        tr.discs_t = {k: tr._wrap(d) for k, d in tr.discs.items()}
        tr.world = Dist(0, 1, 0)
        assert isinstance(tr.sampler_t, torch.nn.parallel.DistributedDataParallel)
        tr.init_sampler_template()
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x)
        assert torch.equal(x.cpu(), torch.arange(4.0))
        before = {k: v.clone() for k, v in tr.generator.state_dict().items()}
        for stage in schedule(cfg, tr.uv_size):
            gen = stage.kind is StageKind.GENERATOR
            tr.sampler.train(not gen).requires_grad_(not gen)  # as train.loop's stage loop: frozen for the generator
            batch = next(iter(StoreStream(train_store, DataConfig(batch_size=cfg.batch_size,
                                                                  image_size=stage.image_size, with_targets=gen,
                                                                  rotate_share=cfg.rotate_share))))
            batch = {k: v.to(tr.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if gen:
                res = tr.generator_step(batch)
                tr.discriminator_step(batch, res.fakes)
            else:
                res = tr.sampler_step(batch, stage)
            tr.scaler.update()
            assert all(torch.isfinite(v) for v in res.terms.values()), (stage.name, res.terms)
        torch.cuda.synchronize()
        assert any(not torch.equal(before[k], v) for k, v in tr.generator.state_dict().items())
    finally:
        dist.destroy_process_group()
