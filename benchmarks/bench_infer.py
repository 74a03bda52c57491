"""Photos per second of ``uvtrain infer``'s stages on real photos, and batched against one-at-a-time networks.

Stages, timed separately on the same photos (``../shared/assets`` faces, aflw2000 and faces_pairs):
detection + framing (FaceBoxes, :func:`common.faces.fit.frame_face`), fitting (the 3DDFA_V2 regressor on the
framed crop), the UV sampler and the UV generator (a run directory's networks, any face model: their cost does
not depend on it). Baseline for the ratio: the networks at batch 1; candidate: at ``--batch`` photos.

    python benchmarks/bench_infer.py --run RUN_DIR [--assets ../shared/assets] [--device cpu] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.faces.assets import TDDFAAssets
from common.faces.detect import FaceBoxesDetector
from common.faces.fit import frame_face
from common.faces.tddfa import TDDFARegressor
from common.imageio import read_image
from train.bundle import read_bundle
from train.runs import load_run_config, load_trained, sampled_inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a uvtrain fit run directory")
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    a, dev = args.assets, torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    photos = [read_image(p) for folder in ("faces", "aflw2000", "faces_pairs")
              for p in sorted((a / folder).glob("*.jpg"))]
    run_cfg = load_run_config(args.run)
    bundle = read_bundle(args.run, run_cfg.store)
    cfg, sampler, generator, _ = load_trained(args.run, str(dev), bundle, config=run_cfg)
    s, u = bundle.image_size, bundle.uv_size
    v2 = TDDFAAssets.from_dir(a / "3ddfa_v2", require=("detector", "mb05", "param_stats"))
    det = FaceBoxesDetector.from_path(v2.detector, device=str(dev))
    reg = TDDFARegressor.from_paths(v2.mb05, v2.param_stats, device=str(dev))
    t = time.perf_counter()
    framed = [frame_face(p, det, s) for p in photos]
    t_detect = time.perf_counter() - t
    framed = [f for f in framed if f.ok]
    t = time.perf_counter()
    for f in framed:
        reg.predict(f.image, f.box[None])
    t_fit = time.perf_counter() - t
    x = torch.from_numpy(np.stack([f.image for f in framed])).permute(0, 3, 1, 2).float().div(255).to(dev)
    x = F.interpolate(x, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True)

    def nets(batch: int) -> tuple[float, float]:
        ts_s, ts_g = [], []
        for _ in range(args.repeats):
            t_s = t_g = 0.0
            with torch.inference_mode():
                for i in range(0, len(x), batch):
                    t0 = time.perf_counter()
                    spl, grid = sampler(x[i:i + batch], out_size=u)
                    sync()
                    t1 = time.perf_counter()
                    generator(spl, sampled_inside(grid))
                    sync()
                    t_s, t_g = t_s + t1 - t0, t_g + time.perf_counter() - t1
            ts_s.append(t_s)
            ts_g.append(t_g)
        return statistics.median(ts_s), statistics.median(ts_g)

    nets(args.batch)  # warm-up
    s1, g1 = nets(1)
    sb, gb = nets(args.batch)
    n = len(framed)
    print(f"{len(photos)} photos, {n} framed; working size {s}, network input {cfg.image_size}, UV {u}; "
          f"device {dev}, torch threads {torch.get_num_threads()}\n")
    print(f"{'stage':<28} {'ms/photo':>9} {'share (batch ' + str(args.batch) + ')':>20}")
    total = t_detect / len(photos) + (t_fit + sb + gb) / n
    for name, sec in (("detection + framing", t_detect / len(photos)), ("fitting (3DDFA_V2)", t_fit / n),
                      (f"sampler, batch {args.batch}", sb / n), (f"generator, batch {args.batch}", gb / n)):
        print(f"{name:<28} {sec * 1e3:>9.1f} {100 * sec / total:>19.0f}%")
    print(f"\nwhole pipeline: {1 / total:.1f} photos/s; networks only: batch 1 {n / (s1 + g1):.1f} photos/s, "
          f"batch {args.batch} {n / (sb + gb):.1f} photos/s ({(s1 + g1) / (sb + gb):.2f}x)")


if __name__ == "__main__":
    main()
