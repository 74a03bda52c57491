"""Benchmark: symmetric fill + Poisson blend (Eq. 9) of an RGB UV texture, fast path vs baselines.

Runs every method on the same synthetic face-shaped inputs in one process and prints min / median
milliseconds, the max abs difference to the sparse direct solution (in 1/255 units) and the time
ratio to the per-pixel-loop baseline (or to splu where that baseline is skipped). Pin to one core:

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_blend.py --sizes 256 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from preprocess.blend import blend_uv, poisson_blend, symmetric_fill
from preprocess.config import BlendConfig


def make_inputs(size: int, profile: bool, seed: int = 0):
    """Face-shaped UV_gt mask (ellipse, eye/mouth holes, far half cut for a profile), textures in [0, 1]."""
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, (size // 2, int(size * 0.52)), (int(size * 0.4), int(size * 0.47)), 0, 0, 360, 1, -1)
    if profile:
        m[:, int(size * 0.62):] = 0
    for cx in (0.36, 0.64):
        cv2.ellipse(m, (int(size * cx), int(size * 0.42)), (int(size * 0.06), int(size * 0.03)), 0, 0, 360, 0, -1)
    cv2.ellipse(m, (size // 2, int(size * 0.75)), (int(size * 0.1), int(size * 0.03)), 0, 0, 360, 0, -1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    uv_bfm = np.stack([0.6 + 0.1 * xx, 0.45 + 0.1 * yy, 0.4 + 0.05 * xx * yy], -1).astype(np.float32)
    noise = cv2.GaussianBlur(rng.standard_normal((size, size, 3)).astype(np.float32), (0, 0), 1.5)
    uv_gt = np.clip(uv_bfm + 0.12 + 0.05 * np.sin(40 * xx)[..., None] + 0.05 * noise, 0, 1).astype(np.float32)
    return uv_gt, m.astype(bool), uv_bfm


def loop_built_spsolve(target, source, mask):
    """Baseline as public UV-dataset code does it: python loop over texels, one spsolve per channel."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    index = {(y, x): i for i, (y, x) in enumerate(zip(ys, xs, strict=True))}
    n = len(index)
    a = sp.lil_matrix((n, n))
    out = target.astype(np.float64).copy()
    rhs = np.zeros((n, 3))
    for (y, x), i in index.items():
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            qy, qx = y + dy, x + dx
            if not (0 <= qy < h and 0 <= qx < w):
                continue
            a[i, i] += 1
            if (qy, qx) in index:
                a[i, index[qy, qx]] = -1
                rhs[i] += source[y, x] - source[qy, qx]
            else:  # crossing edge: target boundary value plus the target's gradient (see preprocess.blend)
                rhs[i] += target[qy, qx] + (target[y, x] - target[qy, qx])
    a = a.tocsr()
    for c in range(3):
        out[ys, xs, c] = spla.spsolve(a, rhs[:, c])
    return out.astype(np.float32)


def seamless_clone(target, source, mask):
    """OpenCV's seamlessClone (solves a different bounding-box problem), for reference."""
    ys, xs = np.nonzero(mask)
    center = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    to8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    out = cv2.seamlessClone(to8(source), to8(target), mask.astype(np.uint8) * 255, center, cv2.NORMAL_CLONE)
    return out.astype(np.float32) / 255


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, 1e3 * min(times), 1e3 * float(np.median(times))


def run_case(size: int, profile: bool, repeats: int) -> None:
    """Time every method on one input and print its table rows."""
    uv_gt, uv_mask, uv_bfm = make_inputs(size, profile)
    filled, fmask, _ = symmetric_fill(uv_gt, uv_mask)
    paste = BlendConfig.paper_mirror(mode="paste")  # synthetic arrays, no shape: the plain mirror
    paste_direct = BlendConfig.paper_mirror(mode="paste", solver="direct")
    methods = {
        "blend_uv paste (sym fill + mgcg)": lambda: blend_uv(uv_gt, uv_mask, uv_bfm, config=paste)[0],
        "blend_uv paste (sym fill + splu)": lambda: blend_uv(uv_gt, uv_mask, uv_bfm, config=paste_direct)[0],
        "poisson_blend mgcg (no fill)": lambda: poisson_blend(uv_bfm, filled, fmask),
        "poisson_blend amg (pyamg RS)": lambda: poisson_blend(uv_bfm, filled, fmask, BlendConfig(solver="amg")),
        "cv2.seamlessClone": lambda: seamless_clone(uv_bfm, filled, fmask),
    }
    if size <= 256:
        methods["loop-built + spsolve per channel"] = lambda: loop_built_spsolve(uv_bfm, filled, fmask)
    ref = np.clip(poisson_blend(uv_bfm, filled, fmask, BlendConfig(solver="direct")), 0, 1)
    results = {}
    for name, fn in methods.items():
        slow = "loop" in name or (size > 512 and ("direct" in name or "amg" in name))
        out, t_min, t_med = timed(fn, 1 if slow else repeats)
        results[name] = (t_min, t_med, 255 * np.abs(np.clip(out, 0, 1) - ref).max())
    # mode "fill" (the default) solves the swapped problem: compared with its own direct solution
    fill_ref = np.clip(blend_uv(uv_gt, uv_mask, uv_bfm, config=BlendConfig.paper_mirror(solver="direct"))[0], 0, 1)
    out, t_min, t_med = timed(lambda: blend_uv(uv_gt, uv_mask, uv_bfm, config=BlendConfig.paper_mirror())[0], repeats)
    results["blend_uv fill (default, mgcg)"] = (t_min, t_med, 255 * np.abs(np.clip(out, 0, 1) - fill_ref).max())
    base = results.get("loop-built + spsolve per channel", results["blend_uv paste (sym fill + splu)"])[0]
    label = f"{'profile' if profile else 'frontal'} {fmask.mean():.0%}"
    for name, (t_min, t_med, err) in results.items():
        print(f"{size:>5} {label:>12} {name:<34} {t_min:>9.1f} {t_med:>10.1f} {err:>12.3f} {t_min / base:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'size':>5} {'fill mask':>12} {'method':<34} {'min ms':>9} {'median ms':>10} {'max|d| /255':>12} "
          f"{'ratio':>7}")
    for size in args.sizes:
        for profile in (True, False):
            run_case(size, profile, args.repeats)


if __name__ == "__main__":
    main()
