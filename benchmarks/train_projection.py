"""The paper's training schedule at cluster scale, projected from costs measured here.

Measured in this run, per training phase at batch 6 and the paper's sizes (sampler 128² → grid 152, fine-tune and
generator 256²): the floating-point operations of one optimiser step (forward + backward, counted by
``torch.utils.flop_counter``), the seconds per step on this machine's device, the bytes DDP all-reduces per step
(the trained parameters' gradients, float32), and the loader's samples/s per worker process (reads + rasterising).

Projected: the schedule ``uvtrain fit`` trains by default (:class:`train.config.TrainConfig`, Sec. 4's: 30k sampler
steps of which the last ``--finetune`` at 256², then 100k generator steps, batch 6 per GPU) on N GPUs, as compute
(FLOPs / the sustained throughput given by ``--gpu-tflops``) plus a ring all-reduce of the gradients (2 (N-1)/N x
bytes / bandwidth; not overlapped, so an upper bound), and the loader processes each GPU needs. The sustained
throughput is an assumption, not a measurement: the paper's own "about 100 hours on two Titan X Pascal" is turned
into the throughput it implies for our FLOP count, as a calibration.

    python benchmarks/train_projection.py                    # builds a 24-sample synthetic 256² store first
    python benchmarks/train_projection.py --device cuda      # on a GPU: the measured s/step replaces the assumption
    python benchmarks/train_projection.py --save costs.json  # then --costs costs.json --gpus 4,16 re-projects
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import BATCH, DEFAULT, build_store, loader_rate, phase_steps
from torch.utils.flop_counter import FlopCounterMode

PAPER = {"hours": 100.0, "gpus": 2, "tflops_peak": 11.0}
"""Sec. 4: ~100 h on two Titan X Pascal (11 TFLOP/s fp32 peak each) for its 30k sampler and 100k generator steps,
the schedule :data:`bench_train.DEFAULT` holds."""


def measure(store: str, device: str, steps: int) -> dict[str, dict[str, float]]:
    """Per phase: ``flops`` per step, ``s`` median seconds per step, ``bytes`` all-reduced per step."""
    tr, phases = phase_steps(store, device, DEFAULT.image_size)
    trained = {"sampler": [tr.sampler], "finetune": [tr.sampler], "generator": [tr.generator, tr.discs]}
    out = {}
    for stage, step in phases:
        step(0)  # warm-up (allocator, cudnn autotune)
        counter = FlopCounterMode(display=False)
        with counter:
            step(1)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        n_params = sum(p.numel() for m in trained[stage.name] for p in m.parameters() if p.requires_grad)
        out[stage.name] = {"flops": float(counter.get_total_flops()), "s": statistics.median(times),
                           "bytes": 4.0 * n_params}
    return out


def schedule_steps(finetune: int | None = None) -> dict[str, int]:
    """Steps per phase of the default schedule; ``finetune`` None: the default fine-tune length."""
    finetune = DEFAULT.finetune_steps if finetune is None else finetune
    return {"sampler": DEFAULT.sampler_steps - finetune, "finetune": finetune, "generator": DEFAULT.generator_steps}


def allreduce_s(nbytes: float, gpus: int, per_node: int, nvlink_gbs: float, net_gbs: float) -> float:
    """Ring all-reduce time of ``nbytes`` over ``gpus`` GPUs; the slowest link sets the pace."""
    if gpus <= 1:
        return 0.0
    bw = nvlink_gbs if gpus <= per_node else net_gbs
    return 2 * (gpus - 1) / gpus * nbytes / (bw * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per phase (after one warm-up and one counted)")
    ap.add_argument("--finetune", type=int, default=None, help=f"of the {DEFAULT.sampler_steps:,} sampler steps, "
                    f"those at {DEFAULT.image_size}² (default {DEFAULT.finetune_steps:,}, uvtrain fit's; paper: "
                    f"'fine-tuning needed', no count given)")
    ap.add_argument("--gpu-tflops", type=float, default=20.0, help="sustained TFLOP/s per GPU assumed for the "
                    "projection (an A100/H100 with AMP on these conv nets: tens; the paper's Titan X: see the "
                    "calibration line)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbs", type=float, default=150.0, help="intra-node all-reduce bandwidth, GB/s")
    ap.add_argument("--net-gbs", type=float, default=12.5, help="inter-node bandwidth, GB/s (100 Gb/s InfiniBand)")
    ap.add_argument("--gpus", default="1,2,8,32,64", help="GPU counts to project")
    ap.add_argument("--loader-workers", type=int, default=8, help="loader processes per GPU (CPU cores per GPU)")
    ap.add_argument("--save", default=None, help="write the measured costs to this JSON file")
    ap.add_argument("--costs", default=None, help="project from a --save file instead of measuring")
    args = ap.parse_args()

    if args.costs:  # re-project measured costs (e.g. measured on a GPU) for other cluster settings
        saved = json.loads(Path(args.costs).read_text())
        cost, per_worker, args.device = saved["cost"], saved["loader"], saved["device"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store or build_store(Path(tmp) / "proj.zarr", DEFAULT.image_size, 24)
            cost = measure(store, args.device, args.steps)
            per_worker = {"loader": loader_rate(store, 0, DEFAULT.image_size, 4),  # rasterising in the loader
                          "device": loader_rate(store, 0, DEFAULT.image_size, 4, render=False)}  # --render-on device
        if args.save:
            Path(args.save).write_text(json.dumps({"cost": cost, "loader": per_worker, "device": args.device}))
    n = schedule_steps(args.finetune)

    print(f"measured per step at batch {BATCH} on {args.device}:")
    print(f"{'phase':<10} {'GFLOP/step':>11} {'s/step':>8} {'GFLOP/s':>8} {'all-reduce MB':>14} {'steps':>8}")
    for name, c in cost.items():
        print(f"{name:<10} {c['flops'] / 1e9:>11.1f} {c['s']:>8.2f} {c['flops'] / c['s'] / 1e9:>8.1f} "
              f"{c['bytes'] / 1e6:>14.1f} {n[name]:>8,}")
    total_flops = sum(n[k] * c["flops"] for k, c in cost.items())
    here_h = sum(n[k] * c["s"] for k, c in cost.items()) / 3600
    print(f"\nthe schedule: {total_flops / 1e15:.1f} PFLOP; on this {args.device} at the measured rates: "
          f"{here_h:,.0f} h")
    implied = total_flops / (PAPER["hours"] * 3600 * PAPER["gpus"]) / 1e12
    print(f"calibration: 'about 100 hours on two Titan X Pascal' implies {implied:.2f} TFLOP/s sustained per GPU for "
          f"this FLOP count, {100 * implied / PAPER['tflops_peak']:.0f}% of its {PAPER['tflops_peak']:.0f} TFLOP/s "
          f"fp32 peak")
    print(f"loader, per worker process at {DEFAULT.image_size}² on this machine: {per_worker['loader']:.1f} "
          f"samples/s rasterising in the loader (default), {per_worker['device']:.1f} samples/s with --render-on "
          f"device")

    measured_gpu = args.device == "cuda"
    basis = "measured s/step" if measured_gpu else f"{args.gpu_tflops:g} TFLOP/s sustained (assumed)"
    print(f"\nprojection, batch {BATCH} per GPU, the same samples seen as the paper (steps / N, global batch "
          f"{BATCH} N), "
          f"compute at {basis}, all-reduce not overlapped ({args.gpus_per_node} GPUs/node, "
          f"NVLink {args.nvlink_gbs:g} GB/s, network {args.net_gbs:g} GB/s):")
    k = args.loader_workers
    print(f"{'GPUs':>5} {'nodes':>6} {'compute h':>10} {'all-reduce h':>13} {'total h':>8} "
          f"{'loader workers/GPU needed':>26} {'h with ' + str(k) + ' loader workers/GPU':>28}")
    for g in (int(x) for x in args.gpus.split(",")):
        comp = comm = bound = 0.0
        need = {"loader": 0.0, "device": 0.0}
        for name, c in cost.items():
            t = c["s"] if measured_gpu else c["flops"] / (args.gpu_tflops * 1e12)
            a = allreduce_s(c["bytes"], g, args.gpus_per_node, args.nvlink_gbs, args.net_gbs)
            steps = n[name] / g
            comp += steps * t
            comm += steps * a
            for mode in need:
                need[mode] = max(need[mode], BATCH / (t + a) / per_worker[mode])
            bound += steps * max(t + a, BATCH / (k * per_worker["device"]))  # a step waits for its batch
        nodes = -(-g // args.gpus_per_node)
        print(f"{g:>5} {nodes:>6} {comp / 3600:>10.2f} {comm / 3600:>13.2f} {(comp + comm) / 3600:>8.2f} "
              f"{need['loader']:>12.0f} / {need['device']:>4.1f} (dev) {bound / 3600:>28.2f}")
    print("loader workers/GPU needed: to feed each step in time, rasterising in the loader / with --render-on device "
          "(whose rasterising then runs in the step, not counted); the last column uses --render-on device")

if __name__ == "__main__":
    main()
