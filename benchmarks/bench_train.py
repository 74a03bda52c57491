"""Trainer throughput: data loader samples/s vs the trainer's consumption, steps/s per phase, shares of a step.

Baselines measured in the same run: single-sample store reads (what a map-style dataset does) against the
stream's whole-chunk reads, and the loader's delivery against one training step's consumption at the default batch.

    python benchmarks/bench_train.py                         # builds a 64-sample synthetic store at 256² first
    python benchmarks/bench_train.py --store S --device cuda # on a GPU (full-size models)
    python benchmarks/bench_train.py --device cuda --json bench.json   # the numbers also as JSON (scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.store import StoreReader
from train.config import RunOptions, TrainConfig
from train.data import DataConfig, StoreStream, make_loader
from train.loop import StageKind, Trainer, schedule
from train.render import PosedMesh

DEFAULT = TrainConfig(store="")
"""What ``uvtrain fit`` trains without options: the schedule, sizes and batch these measurements are taken at."""
BATCH = DEFAULT.batch_size


def build_store(out: Path, size: int, count: int) -> str:
    from preprocess.build import build_store as build
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, run = make_config(BuildArgs(out=out, count=count, image_size=size, uv_size=size, chunk=16,
                                     pca_samples=count, n_tex=16))
    build(cfg, dataclasses.replace(run, workers=0, progress=False))
    return str(out)


def loader_rate(store: str, workers: int, image_size: int, batches: int, render: bool = True) -> float:
    """Samples/s of a generator-phase loader (with its rasterising when ``render``)."""
    ds = StoreStream(store, DataConfig(batch_size=BATCH, image_size=image_size, render_in_loader=render))
    loader = make_loader(ds, workers)
    it = iter(loader)
    next(it)  # start-up (worker spawn, model load)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = BATCH * batches / (time.perf_counter() - t0)
    del it, loader
    gc.collect()  # stop the persistent workers before the next measurement
    return rate


def read_rates(store: str, n: int = 48) -> tuple[float, float]:
    """(per-sample reads/s, whole-chunk reads/s) of the arrays a training sample needs."""
    reader = StoreReader(store)
    names = ["image", "face_region", "uv_gt", "uv_gt_mask", "uv_bl", "params"]
    idx = reader.ok_indices()[:n]
    t0 = time.perf_counter()
    for i in idx:
        reader.sample(int(i), names)
    single = len(idx) / (time.perf_counter() - t0)
    c = reader.layout.chunk
    t0 = time.perf_counter()
    for lo in range(0, len(idx), c):
        {k: reader.group[k][lo:lo + c] for k in names}
    return single, len(idx) / (time.perf_counter() - t0)


def raster_share(store: str, image_size: int) -> float:
    """Seconds per sample spent rasterising (two lookups: I0 and I1) in the loader."""
    reader = StoreReader(store)
    mesh = PosedMesh(reader.face_model())
    params = torch.from_numpy(reader.batch(reader.ok_indices()[:BATCH], ["params"])["params"])
    verts = mesh.verts(params, reader.layout.image_size, image_size)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        mesh.lookup(verts, image_size)
        times.append(time.perf_counter() - t0)
    return 2 * min(times) / BATCH


def phase_steps(store: str, device: str, image_size: int, small: bool = False):
    """A Trainer on ``store`` and, per training phase, ``(stage, step)``: ``step(i)`` runs one optimiser step of
    that phase at the default batch on one of two pre-loaded batches (alternating) and returns nothing."""
    cfg = dataclasses.replace(DEFAULT, store=store, sampler_steps=10, sampler_finetune_steps=5, generator_steps=10,
                              image_size=image_size, sampler_image_size=min(DEFAULT.sampler_image_size, image_size),
                              workers=0)
    if small:
        from train.config import DiscriminatorConfig, GeneratorConfig, SamplerConfig

        cfg = dataclasses.replace(cfg, sampler=SamplerConfig(channels=16, head_hidden=256),
                                  generator=GeneratorConfig(channels=16),
                                  discriminator=DiscriminatorConfig(channels=16))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, RunOptions(run_dir=Path(tmp), device=device, progress=False, tensorboard=False))
    tr.init_sampler_template()
    phases = []
    for stage in schedule(cfg, tr.uv_size):
        generator = stage.kind is StageKind.GENERATOR
        ds = StoreStream(store, DataConfig(batch_size=BATCH, image_size=stage.image_size, with_targets=generator,
                                           rotate_share=cfg.rotate_share))
        it = iter(ds)
        batches = [{k: v.to(tr.device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
                   for _ in range(2)]

        def step(i, b=batches, st=stage, generator=generator):  # one step of train.loop's stage loop
            if generator:
                tr.discriminator_step(b[i % 2], tr.generator_step(b[i % 2]).fakes)
            else:
                tr.sampler_step(b[i % 2], st)
            tr.scaler.update()
            if tr.device.type == "cuda":
                torch.cuda.synchronize()

        phases.append((stage, step))
    return tr, phases


def step_rates(store: str, device: str, image_size: int, steps: int, small: bool) -> dict[str, dict[str, float]]:
    _, phases = phase_steps(store, device, image_size, small)
    out = {}
    for stage, step in phases:
        times = []
        for s in range(steps + 1):
            t0 = time.perf_counter()
            step(s)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        out[stage.name] = {"s_per_step": t, "steps_per_s": 1 / t, "samples_per_s": BATCH / t, "min": min(times[1:])}
    return out


def _phase_report(steps: dict, best_render: float, best_bare: float, device: str) -> dict:
    """Per phase: the step rates, the loader ratio (samples/s the best loader delivers over the samples/s a step
    consumes, with rasterising where ``--render-on auto`` puts it on ``device``: the loader on CPU, the device on
    CUDA) and the share of wall time the step would wait for data at that ratio (0 when the loader keeps up)."""
    loader = best_bare if device.startswith("cuda") else best_render
    out = {}
    for name, r in steps.items():
        ratio = loader / r["samples_per_s"]
        out[name] = {**r, "loader_ratio": ratio, "data_wait_share": max(0.0, 1.0 - ratio)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None)
    ap.add_argument("--size", type=int, default=DEFAULT.image_size, help="image/UV size of the store built when "
                    "--store is absent")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-size", type=int, default=DEFAULT.sampler_image_size, help="image size of the step "
                    "timings")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", default="0,2,4")
    ap.add_argument("--small", action="store_true", help="time small networks (channels 16)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    report = {"device": args.device, "torch": torch.__version__, "batch": BATCH, "train_size": args.train_size,
              "sampler_grid": DEFAULT.sampler.grid_size, "small": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or build_store(Path(tmp) / "bench.zarr", args.size, args.count)
        h = StoreReader(store).layout.image_size
        single, chunked = read_rates(store)
        print(f"store reads ({h}²): single-sample {single:.1f} samples/s, whole-chunk {chunked:.1f} samples/s, "
              f"ratio {chunked / single:.1f}x")
        rs = raster_share(store, h)
        print(f"rasterising in the loader: {1e3 * rs:.1f} ms/sample (I0 + I1 lookups at {h}²)")
        report.update(store_size=h, reads_single_per_s=single, reads_chunk_per_s=chunked, raster_ms_per_sample=1e3 * rs)
        rates, bares = {}, {}
        for w in (int(x) for x in args.workers.split(",")):
            rates[w] = loader_rate(store, w, h, args.batches)
            bares[w] = bare = loader_rate(store, w, h, args.batches, render=False)
            print(f"loader at {h}², {w} workers: {rates[w]:.1f} samples/s rasterising in the loader, "
                  f"{bare:.1f} samples/s without (--render-on device)")
        steps = step_rates(store, args.device, args.train_size, args.steps, args.small)
        print(f"\nsteps at batch {BATCH} on {args.device} (image {args.train_size}², sampler grid "
              f"{DEFAULT.sampler.grid_size}, UV {h}² after the first stage, {'small' if args.small else 'full-size'} "
              f"networks):")
        print(f"{'phase':<10} {'s/step':>8} {'steps/s':>8} {'samples/s':>10} {'loader(best)/step':>18}")
        best = max(rates.values())
        for name, r in steps.items():
            print(f"{name:<10} {r['s_per_step']:>8.3f} {r['steps_per_s']:>8.2f} {r['samples_per_s']:>10.1f} "
                  f"{best / r['samples_per_s']:>17.1f}x")
        report.update(loader={str(w): {"render_in_loader": rates[w], "render_on_device": bares[w]} for w in rates},
                      phases=_phase_report(steps, best, max(bares.values()), args.device))
        gen = steps.get("generator", {}).get("s_per_step")
        if gen:
            n = {"sampler": DEFAULT.sampler_steps - DEFAULT.finetune_steps, "finetune": DEFAULT.finetune_steps,
                 "generator": DEFAULT.generator_steps}
            total = sum(n[k] * steps[k]["s_per_step"] for k in n if k in steps)
            print(f"\nprojected default schedule ({n['sampler']:,} sampler + {n['finetune']:,} fine-tune + "
                  f"{n['generator']:,} generator steps) at these rates: {total / 3600:.1f} h")
            report.update(schedule_steps=n, projected_hours=total / 3600)
        print(f"rasterising share if done in the step instead of the loader: "
              f"{100 * BATCH * rs / (BATCH * rs + (gen or 1)):.0f}% of a generator step")
        report["raster_share_of_generator_step"] = BATCH * rs / (BATCH * rs + (gen or 1))
        np.set_printoptions(precision=3)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
