"""Benchmark: vectorised rasteriser (common.render.rasterize) vs a naive per-triangle loop.

Both run on the same face-sized mesh (~38k vertices, ~76k triangles) in the same process, at
``--size`` pixels with a frontal-ish pose (yaw 20 deg, pitch 10 deg). Prints one table with
min / median seconds and triangles per second for each, and their ratio.

    python benchmarks/bench_rasterize.py [--size 256] [--repeats 3] [--threads 1] [--device cpu] [--mesh grid]

``--mesh procedural`` (default) uses ``common.procedural.build_procedural_model()``'s mean shape
(falling back to the grid when that module fails to import); ``--mesh grid`` a 196 x 196 grid
height field shaped like a face (dome + nose + brow): 38,416 vertices, 76,050 triangles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.geometry import make_pose, project_to_image  # noqa: E402
from common.render import rasterize  # noqa: E402

BASELINE_BUDGET_S = 60.0


def grid_face(n: int = 196) -> tuple[np.ndarray, np.ndarray]:
    """A face-like height field: (n*n, 3) vertices in [-1, 1]^2 x [0, ~1], (2 (n-1)^2, 3) outward triangles."""
    s = np.linspace(-1.0, 1.0, n)
    x, y = np.meshgrid(s, s[::-1])  # row 0 is the top (y = +1)
    r2 = (x / 0.9) ** 2 + (y / 1.1) ** 2
    z = 0.7 * np.sqrt(np.clip(1.0 - 0.8 * r2, 0.0, None))
    z += 0.25 * np.exp(-((x / 0.12) ** 2 + ((y + 0.05) / 0.35) ** 2))  # nose
    z += 0.06 * np.exp(-((x / 0.6) ** 2 + ((y - 0.35) / 0.08) ** 2))  # brow
    verts = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]  # a b / c d, y up
    # counter-clockwise seen from +z (y up): a -> c -> b and b -> c -> d
    tris = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return verts, tris.astype(np.int64)


def load_mesh(kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    if kind == "grid":
        verts, tris = grid_face()
        return verts, tris, "196x196 grid face"
    try:
        from common.procedural import build_procedural_model

        model = build_procedural_model()
        return model.mean_shape.astype(np.float32), model.triangles.astype(np.int64), f"procedural ({model.name})"
    except Exception as err:  # noqa: BLE001 - any failure falls back to the built-in mesh
        verts, tris = grid_face()
        return verts, tris, f"196x196 grid face (common.procedural unavailable: {type(err).__name__})"


def posed(verts: np.ndarray, size: int) -> np.ndarray:
    """Centre and scale the mesh to ~80% of the frame, rotate (yaw 20, pitch 10 deg), project to pixels."""
    c = (verts.max(0) + verts.min(0)) / 2
    extent = float((verts.max(0) - verts.min(0))[:2].max())
    v = (verts - c)[None]
    pose = make_pose(0.8 * size / extent, np.radians(20.0), np.radians(10.0), 0.0, [[size / 2, size / 2, 0.0]])
    return project_to_image(v.astype(np.float32), pose, float(size))[0]


def naive_rasterize(verts: np.ndarray, tris: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: python loop over front-facing triangles, each filling its bbox with numpy and a z-test."""
    depth = np.full((size, size), -np.inf, np.float64)
    tri_id = np.full((size, size), -1, np.int64)
    for f, (i0, i1, i2) in enumerate(tris):
        p0, p1, p2 = verts[i0], verts[i1], verts[i2]
        area = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])
        if area >= 0:  # back-facing or degenerate
            continue
        xs, ys = (p0[0], p1[0], p2[0]), (p0[1], p1[1], p2[1])
        j0, j1 = max(int(np.ceil(min(xs) - 0.5)), 0), min(int(np.floor(max(xs) - 0.5)), size - 1)
        r0, r1 = max(int(np.ceil(min(ys) - 0.5)), 0), min(int(np.floor(max(ys) - 0.5)), size - 1)
        if j0 > j1 or r0 > r1:
            continue
        py, px = np.mgrid[r0:r1 + 1, j0:j1 + 1] + 0.5
        w0 = ((p2[0] - p1[0]) * (py - p1[1]) - (p2[1] - p1[1]) * (px - p1[0])) / area
        w1 = ((p0[0] - p2[0]) * (py - p2[1]) - (p0[1] - p2[1]) * (px - p2[0])) / area
        w2 = 1.0 - w0 - w1
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        z = w0 * p0[2] + w1 * p1[2] + w2 * p2[2]
        win = inside & (z > depth[r0:r1 + 1, j0:j1 + 1])
        depth[r0:r1 + 1, j0:j1 + 1][win] = z[win]
        tri_id[r0:r1 + 1, j0:j1 + 1][win] = f
    return tri_id, depth


def timeit(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mesh", choices=("procedural", "grid"), default="procedural",
                    help="procedural face model's mean shape (falls back to grid), or the 196x196 grid face")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    verts_np, tris_np, name = load_mesh(args.mesh)
    vpx = posed(verts_np, args.size)
    dev = torch.device(args.device)
    verts = torch.from_numpy(vpx)[None].to(dev)
    tris = torch.from_numpy(tris_np).to(dev)
    n_f = len(tris_np)

    def run_vec():
        frags = rasterize(verts, tris, (args.size, args.size))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return frags

    frags = run_vec()  # warm-up
    t_vec = timeit(run_vec, args.repeats)

    # naive baseline: time one pass over a subset first, scale to the full mesh if it would exceed the budget
    probe = min(n_f, 5000)
    t0 = time.perf_counter()
    naive_rasterize(vpx, tris_np[:probe], args.size)
    est = (time.perf_counter() - t0) * n_f / probe
    if est * args.repeats > BASELINE_BUDGET_S:
        sub = max(probe, int(n_f * BASELINE_BUDGET_S / (est * args.repeats)))
        note = f"baseline timed on {sub} of {n_f} triangles and scaled by {n_f / sub:.2f}"
    else:
        sub, note = n_f, "baseline timed on all triangles"
    t_naive = [t * n_f / sub for t in timeit(lambda: naive_rasterize(vpx, tris_np[:sub], args.size), args.repeats)]

    # agreement check (coverage and winning triangle) against the baseline on the full mesh when timed in full
    agree = ""
    if sub == n_f:
        ref_id, _ = naive_rasterize(vpx, tris_np, args.size)
        got = frags.tri_id[0].cpu().numpy()
        agree = (f"coverage agreement {((got >= 0) == (ref_id >= 0)).mean():.5f}, "
                 f"same triangle {(got == ref_id).mean():.5f}")

    print(f"mesh: {name}: {verts_np.shape[0]} vertices, {n_f} triangles; image {args.size}^2; "
          f"device {dev}; torch threads {torch.get_num_threads()}; repeats {args.repeats}")
    print(f"covered pixels: {int(frags.mask.sum())}; {note}. {agree}")
    print(f"{'method':<28}{'min s':>10}{'median s':>10}{'tri/s (min)':>14}")
    for label, t in (("vectorised (common.render)", t_vec), ("naive python loop", t_naive)):
        print(f"{label:<28}{min(t):>10.4f}{statistics.median(t):>10.4f}{n_f / min(t):>14.3g}")
    print(f"ratio naive / vectorised: min {min(t_naive) / min(t_vec):.1f}x, "
          f"median {statistics.median(t_naive) / statistics.median(t_vec):.1f}x")


if __name__ == "__main__":
    main()
