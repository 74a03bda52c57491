"""Benchmark: ``uvprep build`` per-sample cost against decoding the FFHQ-size input, worker scaling, storage.

Inputs: N synthetic faces rendered at 256², upscaled to 1024² with a little sensor-like noise and saved as
PNGs laid out like FFHQ (``00000/00000.png``). Measured in one process, on the same inputs:

(a) baseline: decoding those PNGs (``cv2.imdecode``, one thread), per sample;
(b) the whole per-sample build (working size 256, UV 256): on the synthetic source (its ``decode`` stage
    renders the face) and, when ``../shared/assets`` holds 3DDFA_V2 and the BFM files, on the ``ffhq`` source
    over the same PNGs with the ``tddfa`` fitter (aligned path; without the pre-pass reuse, which would skip the
    fit of every sample here, and once more with it for the whole build's wall). Per-stage ms/sample come from the build
    summary (chunk tasks only: the PCA pre-pass, learned once per store from ``pca_samples`` maps, is
    reported as a fixed cost per build; a chunk's setup -- face model, fitter, layout caches -- is reported
    per chunk and amortised over the CLI's default 64-sample chunk). Ratio: that / PNG decode (target <= 5x);
(c) chunk throughput with 1 and 2 Dask workers (one thread each, cluster started and warmed beforehand;
    texture model = the face model's basis, so there is no pre-pass), target >= 1.8x;
(d) stored bytes / raw array bytes of the stores of (b) (target <= 0.7).

    python benchmarks/bench_build.py [--n 32] [--size 1024] [--build-n 16] [--repeats 2]

Absolute times depend on the machine (and on whatever else runs on its cores); compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from common.faces.assets import TDDFAAssets

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("UVTEX_SHARED_ASSETS", ROOT.parent / "shared" / "assets"))


def write_ffhq_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """N synthetic 256² faces -> size² PNGs (bicubic, + N(0, 2²) noise) at ``folder/00000/00000.png`` ..."""
    from common.procedural import build_procedural_model
    from common.synthetic import SyntheticConfig, generate_batch

    faces = generate_batch(list(range(n)), SyntheticConfig(image_size=256, uv_size=64, seed=seed),
                           build_procedural_model())
    rng = np.random.default_rng(seed)
    paths = []
    for i, f in enumerate(faces):
        big = cv2.resize(f.image, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        big = np.clip(big + rng.normal(0.0, 2.0, big.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i // 1000 * 1000:05d}" / f"{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
        assert ok
        p.write_bytes(buf.tobytes())
        paths.append(p)
    return paths


def time_decode(paths: list[Path], repeats: int) -> list[float]:
    """Seconds per sample of cv2.imdecode over all files (bytes read beforehand), one per repeat."""
    data = [p.read_bytes() for p in paths]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    out = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for d in data:
                img = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED)
                assert img is not None
            out.append((time.perf_counter() - t0) / len(data))
    finally:
        cv2.setNumThreads(threads)
    return out


def _build(cfg, out: Path, workers: int = 0, scheduler: str | None = None, reuse: bool = True):
    from common.store import StoreReader
    from preprocess.build import build_store
    from preprocess.config import RunOptions

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = build_store(cfg, RunOptions(out=str(out), workers=workers, scheduler=scheduler, progress=False,
                                          reuse_prepass=reuse))
    wall = time.perf_counter() - t0
    if not summary.complete:
        raise RuntimeError(f"build of {out} failed: {summary.failed_chunks}")
    storage = StoreReader(out).storage()
    return summary, wall, sum(s for s, _ in storage.values()), sum(r for _, r in storage.values())


def synthetic_config(n: int, size: int, uv: int, chunk: int, texture_model: str = "pca", n_tex: int = 8):
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, _ = make_config(BuildArgs(out=Path("unused"), count=n, image_size=size, uv_size=uv, chunk=chunk,
                                   pca_samples=n, n_tex=n_tex, texture_model=texture_model, workers=0))
    return cfg


def ffhq_config(folder: Path, n_pca: int, size: int, uv: int, chunk: int):
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, _ = make_config(BuildArgs(out=Path("unused"), src="ffhq", images=folder, fitter="tddfa",
                                   face_model="bfm-public", bfm_v1_dir=ASSETS / "3ddfa_v1",
                                   bfm_v2_dir=ASSETS / "3ddfa_v2", image_size=size, uv_size=uv, chunk=chunk,
                                   pca_samples=n_pca, n_tex=8, workers=0))
    return cfg


def _warm(x):
    import preprocess.build  # noqa: F401 - import torch, zarr and the stages once per worker

    return x


def _spin(i: int) -> int:
    """About 0.3 s of pure-Python work: what the cores give two processes, with nothing shared."""
    x = 0
    for k in range(3_000_000):
        x ^= k * i
    return x


def throughput(cfg, out: Path, workers: int, n: int, repeats: int) -> tuple[list[float], float]:
    """Samples/s of the chunk tasks on a started, warmed local cluster of ``workers`` single-thread workers,
    and tasks/s of the CPU-only control (:func:`_spin`, 8 tasks) on the same cluster."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.gather(client.map(_warm, range(workers)))
        t0 = time.perf_counter()
        client.gather(client.map(_spin, range(8), pure=False))
        control = 8 / (time.perf_counter() - t0)
        rates = []
        for _ in range(repeats):
            summary, wall, _, _ = _build(cfg, out, scheduler=cluster.scheduler_address)
            rates.append(n / wall)
        return rates, control


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, values: list[float] | float, unit: str, note: str = "") -> None:
        v = values if isinstance(values, list) else [values]
        fmt = "{:.1f}" if max(abs(x) for x in v) >= 10 else "{:.3f}"
        lo, med = fmt.format(min(v)), fmt.format(statistics.median(v))
        self.rows.append((name, f"{lo} {unit}", f"{med} {unit}" if len(v) > 1 else "", note))

    def print(self) -> None:
        head = ("measure", "min", "median", "ratio / note")
        w = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        line = "  ".join("-" * x for x in w)
        print(line)
        for r in [head, *self.rows]:
            print("  ".join(c.ljust(x) for c, x in zip(r, w, strict=True)).rstrip())
            if r is head:
                print(line)
        print(line)


def _build_rows(table: Table, label: str, summary, wall: float, n: int, chunk: int, base: float, note: str) -> dict:
    """Per-stage ms/sample; per-chunk setup (model, fitter, layout caches) separately, amortised over 64. Returns the
    stage ms/sample (setup amortised over 64, ``total`` the whole per sample) for :func:`stage_table`."""
    sec = dict(summary.stage_seconds)
    setup = sec.pop("setup", 0.0) / max(summary.done_chunks, 1)
    for stage, s in sorted(sec.items(), key=lambda kv: -kv[1]):
        table.add(f"  {label}: {stage}", 1000 * s / n, "ms/sample")
    table.add(f"  {label}: setup per chunk", setup, "s/chunk", f"{1000 * setup / chunk:.0f} ms/sample at chunk {chunk}")
    per = sum(sec.values()) / n + setup / 64
    table.add(f"(b) {label}: per sample (chunk 64)", 1000 * per, "ms/sample",
              f"{per / base:.1f}x decode (target <= 5x){note}")
    fixed = wall - sum(summary.stage_seconds.values())
    table.add(f"(b) {label}: fixed cost per build", fixed, "s", "model load, PCA pre-pass, store creation")
    return {**{k: 1000 * v / n for k, v in sec.items()}, "setup": 1000 * setup / 64, "total": 1000 * per,
            "fixed": fixed}


STAGES = ("decode", "fit", "uv_gt", "texture", "blend", "crops", "write", "setup")


def stage_table(builds: dict[str, dict], base_ms: float, size: int) -> str:
    """The per-stage table for docs/measurements.md (markdown): ms per sample of each build and its ratio to
    decoding the PNG (measured in the same run); the synthetic build's 'decode' renders the face, so its total is
    also given against that render (target <= 8x)."""
    names = list(builds)
    head = "| stage | " + " | ".join(f"{k} ms/sample | × PNG decode" for k in names) + " |"
    lines = [head, "|---|" + "---|---|" * len(names)]
    for stage in STAGES:
        label = "setup (per chunk, over 64)" if stage == "setup" else stage
        cells = [f"{b.get(stage, 0.0):.1f} | {b.get(stage, 0.0) / base_ms:.2f}×" for b in builds.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for k, b in builds.items():
        extra = f" ({b['total'] / b['decode']:.1f}× its render)" if k == "synthetic" and b.get("decode") else ""
        cells.append(f"**{b['total']:.1f}** | **{b['total'] / base_ms:.1f}×**{extra}")
    lines.append("| whole per sample | " + " | ".join(cells) + " |")
    lines.append("| fixed cost per build (s) | " + " | ".join(f"{b['fixed']:.1f} s | " for b in builds.values()) + " |")
    return "\n".join(lines) + f"\n\nPNG decode: {base_ms:.1f} ms per {size}² photo (one thread)."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="PNGs to write and decode")
    ap.add_argument("--size", type=int, default=1024, help="PNG side (FFHQ: 1024)")
    ap.add_argument("--build-n", type=int, default=16, help="samples per build")
    ap.add_argument("--work", type=int, default=256, help="working image size of the builds")
    ap.add_argument("--uv", type=int, default=256, help="UV size of the builds")
    ap.add_argument("--chunk", type=int, default=4, help="samples per chunk")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the decode and worker-scaling runs")
    args = ap.parse_args()
    bn = min(args.build_n, args.n)
    table = Table()
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        t0 = time.perf_counter()
        paths = write_ffhq_pngs(tmp / "ffhq", args.n, args.size)
        mb = np.mean([p.stat().st_size for p in paths]) / 1e6
        print(f"wrote {args.n} {args.size}² PNGs ({mb:.2f} MB each) in {time.perf_counter() - t0:.0f} s")

        dec = time_decode(paths, max(args.repeats, 3))
        table.add(f"(a) decode {args.size}² PNG (1 thread)", [1000 * d for d in dec], "ms/sample", "baseline")
        base = min(dec)

        print(f"(b) synthetic build: {bn} samples at {args.work}² / UV {args.uv}² ...")
        syn, wall, stored, raw = _build(synthetic_config(bn, args.work, args.uv, args.chunk), tmp / "syn.zarr")
        stages = {"synthetic": _build_rows(table, "synthetic", syn, wall, bn, args.chunk, base,
                                           "; its 'decode' renders the face")}
        table.add("(d) synthetic store: stored / raw", stored / raw, "", f"{stored / 1e6:.1f} / {raw / 1e6:.1f} MB "
                  f"(target <= 0.7)")

        if TDDFAAssets.from_dir(ASSETS / "3ddfa_v2").regressor is not None and (ASSETS / "3ddfa_v1").is_dir():
            print(f"(b) ffhq + tddfa build over {bn} of the PNGs ...")
            sub = tmp / "ffhq_sub"
            for p in paths[:bn]:
                (sub / p.relative_to(tmp / "ffhq")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, sub / p.relative_to(tmp / "ffhq"))
            fcfg = ffhq_config(sub, bn, args.work, args.uv, args.chunk)
            # every sample here is also a pre-pass sample: without the reuse, so that the chunks pay what each photo
            # of a large build (pre-pass samples a small part of it) costs
            ff, wall, stored, raw = _build(fcfg, tmp / "ffhq.zarr", reuse=False)
            stages["ffhq+tddfa"] = _build_rows(table, "ffhq+tddfa", ff, wall, bn, args.chunk, base,
                                               f"; {ff.ok}/{bn} ok {dict(ff.failed)}")
            _, wall_reuse, _, _ = _build(fcfg, tmp / "ffhq_reuse.zarr", reuse=True)
            table.add("(b) ffhq+tddfa: whole build, pre-pass reuse on", wall_reuse, "s",
                      f"{wall_reuse / wall:.2f}x of the build without (all {bn} samples are pre-pass samples)")
            table.add("(d) ffhq store: stored / raw", stored / raw, "", f"{stored / 1e6:.1f} / {raw / 1e6:.1f} MB "
                      f"(target <= 0.7)")
        else:
            print(f"(b) ffhq + tddfa skipped: no 3DDFA assets under {ASSETS}")

        print(f"(c) worker scaling: {bn} synthetic samples, texture model = face model's basis ...")
        cfg = synthetic_config(bn, args.work, args.uv, args.chunk, texture_model="model")
        r1, c1 = throughput(cfg, tmp / "w1.zarr", 1, bn, args.repeats)
        r2, c2 = throughput(cfg, tmp / "w2.zarr", 2, bn, args.repeats)
        table.add("(c) 1 worker", r1, "samples/s")
        table.add("(c) 2 workers", r2, "samples/s", f"{statistics.median(r2) / statistics.median(r1):.2f}x of 1 worker "
                  f"(target >= 1.8x; {os.cpu_count()} cores)")
        table.add("(c) control: CPU-only tasks, 2 vs 1 worker", c2 / c1, "x", "the cores' own ceiling right now "
                  f"(load average {os.getloadavg()[0]:.1f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench_build: {args.n} PNGs of {args.size}², builds of {bn} samples at {args.work}² / UV {args.uv}², "
          f"chunk {args.chunk}")
    table.print()
    print("\nper stage (for docs/measurements.md):\n")
    print(stage_table(stages, 1000 * base, args.size))


if __name__ == "__main__":
    main()
