"""Descriptors per second: our PyTorch dlib ResNet against dlib's own ``compute_face_descriptor``, same chips.

Baseline: dlib (``dlib-bin``, CPU) on a batch of 150x150 chips (its batched overload). Candidates: our network
at batch 1 / 16 / 64 in inference mode, and with the differentiable alignment (``face_chip`` from 256 px
images + network, as the identity loss runs it) forward and forward + backward to the image. Each is repeated;
the table gives min / median seconds per descriptor and descriptors/s, and the ratio to dlib's median.

    python benchmarks/bench_identity.py [--repeats 5] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from common.identity import load_identity
from common.identity.align import DLIB_5PT_TEMPLATE


def _time(fn, repeats: int, n: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) / n)
    return min(ts), statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    chips = [np.ascontiguousarray((rng.random((150, 150, 3)) * 255).astype(np.uint8)) for _ in range(64)]
    net = load_identity("dlib", dev)
    rows = []
    try:
        import dlib

        from common.identity.dlibnet import dlib_model_path

        rec = dlib.face_recognition_model_v1(str(dlib_model_path()))
        rows.append(("dlib compute_face_descriptor, batch 16", *_time(lambda: rec.compute_face_descriptor(
            chips[:16]), args.repeats, 16)))
    except ImportError:
        print("dlib is not installed (pip install -e .[identity]): no baseline")
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float().div(255).to(dev)
    for b in (1, 16, 64):
        def run(b=b):
            with torch.inference_mode():
                net(x[:b])
            sync()
        rows.append((f"ours, chips, batch {b}", *_time(run, args.repeats, b)))
    img = torch.rand(16, 3, 256, 256, device=dev)
    pts = ((0.25 + DLIB_5PT_TEMPLATE.float()) / 1.5 * 200 + 20).expand(16, 5, 2).to(dev)

    def aligned():
        with torch.inference_mode():
            net(img, pts)
        sync()

    def aligned_backward():
        i = img.clone().requires_grad_(True)
        net(i, pts).sum().backward()
        sync()

    rows.append(("ours, align + net, batch 16", *_time(aligned, args.repeats, 16)))
    rows.append(("ours, align + net + backward, batch 16", *_time(aligned_backward, args.repeats, 16)))
    base = rows[0][2] if rows[0][0].startswith("dlib") else None
    print(f"device {dev}, torch threads {torch.get_num_threads()}, repeats {args.repeats}\n")
    print(f"{'':<42} {'min ms':>8} {'median ms':>10} {'desc/s':>8} {'vs dlib':>8}")
    for name, lo, med in rows:
        ratio = f"{base / med:7.2f}x" if base else "-"
        print(f"{name:<42} {lo * 1e3:>8.2f} {med * 1e3:>10.2f} {1 / med:>8.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
