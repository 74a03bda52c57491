"""Benchmark: how well does the occluder detector (:mod:`preprocess.occlusion`) find hair and hands, and what does
it do to UV_gt?

**Synthetic world** (occluders on every face: ``occluder_prob = 1``; the exact occluder masks are the truth and
are *not* given to the detector). Per face, inside the eroded projected-mesh mask (the mask a photo source gets):

* precision and recall of the rejected pixels against ``occluder_mask``;
* UV_gt against ``uv_true``, mean abs error x 255 on UV_gt's observed texels, read under

  - ``mesh only``: the eroded projected mesh (what photos got before this detector),
  - ``detector``: the mesh minus the detected occluders (what ``uvprep build`` does for photos),
  - ``exact``: the mesh and the synthetic world's exact face mask (the ceiling: a perfect face parser),

  with the share of the mesh-only texels each keeps;
* the same detector on the same faces without occluders (``occluder_prob = 0``): the share of the mask it
  rejects there is pure loss.

The baseline of the timing line is the UV_gt stage itself (rasterise + unwrap), on the same faces.

**Real photos** (``--real``, needs ``../shared/assets``): FaceBoxes + 3DDFA_V2 on the example photos and the
AFLW2000-3D samples, then ``--figure`` (default /tmp/occlusion_real.png; third-party photos and BFM fits: never
commit it): photo | eroded mesh mask | rejected pixels in red.

    python benchmarks/occlusion_quality.py --count 48 --image-size 256 --uv-size 128 --real
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common.config import FitConfig
from common.faces.assets import TDDFAAssets
from common.faces.fit import mesh_in_image
from common.imageio import image_grid
from common.procedural import build_procedural_model
from common.synthetic import SyntheticConfig, generate_batch
from preprocess.config import OcclusionConfig, UVGTConfig
from preprocess.occlusion import occluders_from_fit, part_labels
from preprocess.unwrap import erode, erosion_radius, layout_cache, projected_face_region, uv_gt_from_images

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def _mae(uv: np.ndarray, mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) mean abs error x 255 over each map's masked texels ((N, U, U, 3) maps, (N, U, U) masks)."""
    err = np.abs(uv - truth).mean(-1) * 255.0
    return np.array([e[m].mean() if m.any() else np.nan for e, m in zip(err, mask, strict=True)])


def synthetic(count: int, image_size: int, uv_size: int, seed: int, config: OcclusionConfig) -> dict:
    """Precision / recall and UV_gt errors on ``count`` synthetic faces with occluders (see the module doc)."""
    model = build_procedural_model()
    uvgt = UVGTConfig(uv_size=uv_size)
    cache = layout_cache(model, uvgt)
    labels = part_labels(model, config)
    out = {}
    for prob in (1.0, 0.0):
        faces = generate_batch(range(count), SyntheticConfig(image_size=image_size, uv_size=uv_size, seed=seed,
                                                             occluder_prob=prob), model)
        images = np.stack([f.image for f in faces])
        verts = mesh_in_image(model, np.stack([f.params for f in faces]), image_size)
        face = projected_face_region(verts, model, image_size, cache)
        eroded = np.stack([erode(m, erosion_radius(m, uvgt)) for m in face])
        t0 = time.perf_counter()
        occ = occluders_from_fit(images, verts, model, uvgt, config, labels, cache)
        t_det = time.perf_counter() - t0
        truth = np.stack([f.occluder_mask for f in faces]) & eroded
        inside = eroded.reshape(count, -1).sum(1)
        rec = {"occ": occ, "truth": truth, "area": inside, "rejected": occ.reshape(count, -1).sum(1) / inside,
               "tp": (occ & truth).reshape(count, -1).sum(1), "fp": (occ & ~truth).reshape(count, -1).sum(1),
               "fn": (~occ & truth).reshape(count, -1).sum(1), "t_det": t_det}
        if prob == 1.0:
            uv_true = np.stack([f.uv_true for f in faces])
            t0 = time.perf_counter()
            g = {"mesh only": uv_gt_from_images(images, verts, model, uvgt, cache=cache)}
            rec["t_uvgt"] = time.perf_counter() - t0
            g["detector"] = uv_gt_from_images(images, verts, model, uvgt, seg_mask=~occ, cache=cache)
            g["exact"] = uv_gt_from_images(images, verts, model, uvgt, seg_mask=np.stack([f.face_mask for f in faces]),
                                           cache=cache)
            base = g["mesh only"].mask.reshape(count, -1).sum(1)
            rec["uv"] = {k: (_mae(v.uv, v.mask, uv_true), v.mask.reshape(count, -1).sum(1) / np.maximum(base, 1))
                         for k, v in g.items()}
            rec["yaw"] = np.degrees(np.arcsin(np.clip([-f.params[8] / np.linalg.norm(f.params[8:11])
                                                       for f in faces], -1, 1)))
        out[prob] = rec
    return out


def print_synthetic(res: dict, per_sample: bool) -> None:
    occ, clean = res[1.0], res[0.0]
    n = len(occ["tp"])
    prec = occ["tp"] / np.maximum(occ["tp"] + occ["fp"], 1)
    rec = occ["tp"] / np.maximum(occ["tp"] + occ["fn"], 1)
    uv = occ["uv"]
    if per_sample:
        print("| face | yaw | occluded share of mask | rejected share | precision | recall | UV_gt MAE x255: mesh "
              "only / detector / exact |")
        print("|---|---|---|---|---|---|---|")
        share = occ["truth"].reshape(n, -1).sum(1) / occ["area"]
        for i in range(n):
            print(f"| {i} | {occ['yaw'][i]:.0f} | {share[i]:.2f} | {occ['rejected'][i]:.2f} | {prec[i]:.2f} | "
                  f"{rec[i]:.2f} | {uv['mesh only'][0][i]:.1f} / {uv['detector'][0][i]:.1f} / "
                  f"{uv['exact'][0][i]:.1f} |")
    tp, fp, fn = occ["tp"].sum(), occ["fp"].sum(), occ["fn"].sum()
    print(f"\n{n} synthetic faces with occluders, inside the eroded projected-mesh mask:")
    print("| | precision | recall |")
    print("|---|---|---|")
    print(f"| pooled over pixels | {tp / max(tp + fp, 1):.3f} | {tp / max(tp + fn, 1):.3f} |")
    print(f"| mean over faces | {prec.mean():.3f} | {rec.mean():.3f} |")
    print(f"| median over faces | {np.median(prec):.3f} | {np.median(rec):.3f} |")
    print(f"\nUV_gt vs uv_true, MAE x255 on the observed texels ({n} faces with occluders):")
    print("| mask UV_gt is read under | mean | median | worst face | texels kept (share of mesh only) |")
    print("|---|---|---|---|---|")
    for k, (mae, kept) in uv.items():
        print(f"| {k} | {np.nanmean(mae):.1f} | {np.nanmedian(mae):.1f} | {np.nanmax(mae):.1f} | {kept.mean():.2f} |")
    r = clean["rejected"]
    print(f"\nsame faces without occluders: share of the mask rejected: mean {r.mean():.4f}, median "
          f"{np.median(r):.4f}, max {r.max():.3f}; faces above 2 %: {(r > 0.02).sum()} of {len(r)}")
    print(f"time: detector {occ['t_det'] / n * 1e3:.0f} ms/face, UV_gt stage {occ['t_uvgt'] / n * 1e3:.0f} ms/face: "
          f"ratio {occ['t_det'] / occ['t_uvgt']:.2f}")


def real_photos(image_size: int, out: Path, config: OcclusionConfig) -> None:
    """FaceBoxes + 3DDFA_V2 on the example photos and the AFLW2000-3D samples -> the overlay figure."""
    from common.imageio import read_image
    from preprocess.config import StageConfig
    from preprocess.sources import SampleInput
    from preprocess.stages import StageContext, Timer, run_geometry

    v1, v2 = ASSETS / "3ddfa_v1", ASSETS / "3ddfa_v2"
    if not (v1.exists() and v2.exists()):
        print(f"--real: needs {v1} and {v2}; skipped")
        return
    files = TDDFAAssets.from_dir(v2, require=("regressor",))
    fit = FitConfig(fitter="tddfa", image_size=image_size, tddfa_weights=files.regressor,
                    param_stats=files.param_stats, detector_weights=files.detector)
    cfg = StageConfig(face_model="bfm-public", bfm_v1_dir=v1, bfm_v2_dir=v2, fit=fit, uvgt=UVGTConfig(uv_size=64),
                      occlusion=config)
    ctx = StageContext.build(cfg)
    photos = {}
    for p in sorted((ASSETS / "faces").glob("*.jpg")):
        img = read_image(p)
        if p.stem == "emma":  # a collage of three photos side by side
            w = img.shape[1] // 3
            photos.update({f"emma_{k}": np.ascontiguousarray(img[:, k * w:(k + 1) * w]) for k in range(3)})
        elif p.stem == "trump_hillary":  # two people: one crop each
            w = img.shape[1] // 2
            photos.update({f"trump_hillary_{k}": np.ascontiguousarray(img[:, k * w:(k + 1) * w]) for k in range(2)})
        else:
            photos[p.stem] = img
    for p in sorted((ASSETS / "aflw2000").glob("*.jpg")):
        photos[p.stem] = read_image(p)
    inputs = [SampleInput(index=i, key=k, image=v) for i, (k, v) in enumerate(photos.items())]
    t0 = time.perf_counter()
    geo = run_geometry(inputs, ctx, Timer())
    print(f"\nreal photos: {len(inputs)} fitted in {time.perf_counter() - t0:.1f} s")
    rows, labels = [], []
    print("| photo | yaw | eroded mesh mask (px) | rejected share |")
    print("|---|---|---|---|")
    for k, key in enumerate(photos):
        if geo.reason[k]:
            print(f"| {key} | failed (reason {geo.reason[k]}) | | |")
            continue
        verts = mesh_in_image(ctx.model, geo.params[k:k + 1], image_size)
        face = projected_face_region(verts, ctx.model, image_size, ctx.uv_cache)[0]
        eroded = erode(face, erosion_radius(face, cfg.uvgt))
        occ = geo.occlusion[k]
        img = geo.image[k]
        mask_img = np.where(eroded[..., None], img, (img * 0.25).astype(np.uint8))
        over = mask_img.copy()
        over[occ] = (0.45 * over[occ] + [140, 0, 0]).astype(np.uint8)
        rows.append([img, mask_img, over])
        labels.append([f"{key} yaw {geo.pose[k, 0]:.0f}", "eroded mesh mask",
                       f"rejected {occ.sum() / max(1, eroded.sum()):.2f}"])
        print(f"| {key} | {geo.pose[k, 0]:.0f} | {int(eroded.sum())} | {occ.sum() / max(1, eroded.sum()):.3f} |")
    half = (len(rows) + 1) // 2  # two columns of triples keep the figure readable
    left, right = rows[:half], rows[half:] + [[np.zeros_like(rows[0][0])] * 3] * (2 * half - len(rows))
    lab_r = labels[half:] + [["", "", ""]] * (2 * half - len(rows))
    grid = image_grid([a + b for a, b in zip(left, right, strict=True)],
                      labels=[a + b for a, b in zip(labels[:half], lab_r, strict=True)])
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=48, help="synthetic faces (each with and without occluders)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--uv-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-sample", action="store_true", help="one table row per synthetic face")
    ap.add_argument("--real", action="store_true", help="also the real photos -> --figure")
    ap.add_argument("--figure", type=Path, default=Path("/tmp/occlusion_real.png"),
                    help="the real-photo sheet (third-party photos, BFM fits: keep it outside the repository)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cv2.setNumThreads(a.threads)
    cfg = OcclusionConfig()
    t0 = time.perf_counter()
    print_synthetic(synthetic(a.count, a.image_size, a.uv_size, a.seed, cfg), a.per_sample)
    print(f"(synthetic part: {time.perf_counter() - t0:.0f} s)")
    if a.real:
        real_photos(a.image_size, a.figure, cfg)


if __name__ == "__main__":
    main()
