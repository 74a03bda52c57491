"""Quality of the pseudo ground truth UV_bl (Eq. 9 + symmetric fill): plain mirror (the paper, earlier builds) vs the
relit, blended fill, on the synthetic world (exact ``uv_true``) and on real photos (seam gradient ratio).

Synthetic: a ``uvprep build`` store (``--store``, or one built here: ``--count 48 --seed 7``, U = S = 256). Every
variant re-blends the same UV_gt / UV_bfm (as :func:`preprocess.stages.run_stages` computes them) and is compared
with ``uv_true`` on the face texels, pooled per yaw band: observed / mirrored / model texels (by the variant's own
source map) and all unobserved texels, mean abs error and bias (mean signed error), x 255, next to the constant
fill (the mean colour of the observed texels). Real photos (``../shared/assets``, skipped when absent): the
3DDFA_V2 geometry stage as ``tests/test_real_faces.py`` runs it, a K = 2 basis learned from the photos, and the
seam ratio of :func:`preprocess.blend.seam_gradient_ratio` (observed | mirrored and photo | model) per photo,
median over photos.

    python benchmarks/blend_quality.py                       # builds /tmp/blend_quality_syn.zarr first (~40 s)
    python benchmarks/blend_quality.py --store syn.zarr --no-real
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from preprocess.blend import SOURCE_MIRRORED, SOURCE_MODEL, SOURCE_OBSERVED, blend_uv, seam_gradient_ratio
from preprocess.config import BlendConfig, ShadingConfig
from preprocess.shading import uv_normals

BANDS = (("all", 0, 91), ("|yaw|<30", 0, 30), ("30-60", 30, 60), (">60", 60, 91))
VARIANTS = {
    "mirror (paper, before)": BlendConfig.paper_mirror(),
    "mirror + cuts + blend": BlendConfig(fill_mode="mirror"),
    "relit sh9, no blend": BlendConfig(mirror_blend=False, shading=ShadingConfig(model="sh9")),
    "relit, no blend": BlendConfig(mirror_blend=False),
    "relit sh9 + blend": BlendConfig(shading=ShadingConfig(model="sh9")),
    "relit + blend (default, after)": BlendConfig(),
}


def _synthetic_store(path: Path, count: int, seed: int) -> Path:
    from common.synthetic import SyntheticConfig
    from preprocess.build import build_store
    from preprocess.config import BuildConfig, RunOptions
    from preprocess.sources import SyntheticSource

    if not (path / "zarr.json").exists():
        src = SyntheticSource(count=count, seed=seed, config=SyntheticConfig(image_size=256, uv_size=256))
        build_store(BuildConfig(source=src), RunOptions(out=str(path), workers=0))
    return path


def _texture_inputs(reader, idx):
    from preprocess.texture import match_greyscale

    b = reader.batch(idx, ["uv_gt", "uv_gt_mask", "uv_true", "params", "pose", "tex_coeff"])
    uv_gt = b["uv_gt"].astype(np.float32) / 255
    uv_bfm = match_greyscale(np.clip(reader.texture_basis().synthesize(b["tex_coeff"]), 0, 1), uv_gt, b["uv_gt_mask"])
    return b, uv_gt, uv_bfm


def synthetic_table(store: Path, variants: dict[str, BlendConfig]) -> None:
    from common.store import StoreReader
    from common.uvtools import model_uv_fragments, region_uv_mask

    reader = StoreReader(store)
    idx = reader.ok_indices()
    b, uv_gt, uv_bfm = _texture_inputs(reader, idx)
    model, mirror, valid = reader.face_model(), reader.mirror_index(), reader.texture_basis().valid
    u = uv_gt.shape[1]
    frags = model_uv_fragments(model, u)
    face, nose = region_uv_mask(model, "face", u, frags), region_uv_mask(model, "nose", u, frags)
    truth = b["uv_true"].astype(np.float32) / 255
    yaw = np.abs(b["pose"][:, 0])
    t0 = time.perf_counter()
    normals = uv_normals(model, b["params"], frags)
    ms_normals = (time.perf_counter() - t0) * 1000 / len(idx)
    # per variant, per sample: sums of |err|, err and counts for observed / mirrored / model / unobserved texels
    stats = {name: np.zeros((len(idx), 4, 3)) for name in variants}
    const = np.zeros((len(idx), 3))
    times = {name: [] for name in variants}
    for i in range(len(idx)):
        obs = b["uv_gt_mask"][i] & face
        hidden = face & ~b["uv_gt_mask"][i]
        c = uv_gt[i][obs].mean(0)
        e = c - truth[i][hidden]
        const[i] = [np.abs(e).sum(), e.sum(), e.size]
        for name, cfg in variants.items():
            t = time.perf_counter()
            bl, src = blend_uv(uv_gt[i], b["uv_gt_mask"][i], uv_bfm[i], face_mask=valid, mirror_index=mirror,
                               config=cfg, normals=normals[i], nose_mask=nose)
            times[name].append(time.perf_counter() - t)
            err = bl - truth[i]
            for k, sel in enumerate((src == SOURCE_OBSERVED, src == SOURCE_MIRRORED, src == SOURCE_MODEL, hidden)):
                sel = sel & face
                stats[name][i, k] = [np.abs(err[sel]).sum(), err[sel].sum(), err[sel].size]

    def cell(s: np.ndarray) -> str:
        return "   -        " if s[2] == 0 else f"{255 * s[0] / s[2]:5.1f} {255 * s[1] / s[2]:+6.1f}"

    print(f"\nSynthetic world: {store} ({len(idx)} samples, U = {u}); mean abs error / bias x 255 on face texels, "
          f"pooled per yaw band")
    for band, lo, hi in BANDS:
        sel = (yaw >= lo) & (yaw < hi)
        cs = const[sel].sum(0)
        print(f"\n{band} ({sel.sum()} samples)   constant fill on unobserved: {cell(cs)}")
        print(f"  {'variant':32s} {'observed':>12s} {'mirrored':>12s} {'model':>12s} {'unobserved':>12s}"
              f" {'unobs/const':>11s}")
        for name in variants:
            s = stats[name][sel].sum(0)
            ratio = (s[3, 0] / s[3, 2]) / (cs[0] / cs[2])
            print(f"  {name:32s} " + " ".join(f"{cell(s[k]):>12s}" for k in range(4)) + f" {ratio:11.2f}")
    base = np.median(times[next(iter(variants))])
    print(f"\nBlend time per sample (ms, min / median, ratio to the first row); normals {ms_normals:.1f} ms/sample")
    for name, t in times.items():
        print(f"  {name:32s} {1000 * np.min(t):7.1f} {1000 * np.median(t):7.1f}   x{np.median(t) / base:.2f}")


def real_photos(variants: dict[str, BlendConfig], assets: Path) -> None:
    from common.config import FitConfig
    from common.faces.assets import TDDFAAssets
    from common.imageio import read_image
    from common.uvtools import region_uv_mask
    from preprocess.config import MaskedPCAConfig, StageConfig, UVGTConfig
    from preprocess.sources import SampleInput
    from preprocess.stages import StageContext, Timer, run_geometry
    from preprocess.texture import learn_masked_pca, match_greyscale, ridge_texture_fit

    if not (assets / "3ddfa_v2").exists():
        print(f"\nReal photos: skipped ({assets / '3ddfa_v2'} is absent)")
        return
    u, s = 128, 256
    photos = {}
    for p in sorted((assets / "faces").glob("*.jpg")) + sorted((assets / "aflw2000").glob("*.jpg")):
        img = read_image(p)
        if p.stem == "emma":  # a collage of three photos side by side
            w = img.shape[1] // 3
            photos.update({f"emma_{k}": np.ascontiguousarray(img[:, k * w:(k + 1) * w]) for k in range(3)})
        else:
            photos[p.stem] = img
    v2 = assets / "3ddfa_v2"
    files = TDDFAAssets.from_dir(v2)
    fit = FitConfig(fitter="tddfa", image_size=s, tddfa_weights=files.mb05, param_stats=files.param_stats,
                    detector_weights=files.detector)
    cfg = StageConfig(face_model="bfm-public", bfm_v1_dir=assets / "3ddfa_v1", bfm_v2_dir=v2, fit=fit,
                      uvgt=UVGTConfig(uv_size=u))
    ctx = StageContext.build(cfg)
    inputs = [SampleInput(index=i, key=k, image=img) for i, (k, img) in enumerate(photos.items())]
    geo = run_geometry(inputs, ctx, Timer())
    ok = np.flatnonzero(geo.reason == 0)
    valid = ctx.uv_cache.uv_frags.tri_id[0].numpy() >= 0
    basis = learn_masked_pca(geo.uv_gt[ok], geo.uv_gt_mask[ok], valid, MaskedPCAConfig(n_components=2, fit_size=64),
                             mirror_index=ctx.mirror_index, name="pca:benchmark-photos")
    coeff = ridge_texture_fit(geo.uv_gt[ok], geo.uv_gt_mask[ok], basis, lam=1.0)
    uv_bfm = match_greyscale(np.clip(basis.synthesize(coeff), 0, 1), geo.uv_gt[ok], geo.uv_gt_mask[ok])
    normals = uv_normals(ctx.model, geo.params[ok], ctx.uv_cache.uv_frags)
    nose = region_uv_mask(ctx.model, "nose", u, ctx.uv_cache.uv_frags)
    print(f"\nReal photos ({len(ok)} of {len(inputs)} fitted; U = {u}): seam ratio = |grad| across the boundary / "
          f"|grad| inside the observed texture (1 = as smooth as the photo)")
    names = [inputs[k].key for k in ok]
    print(f"  {'variant':32s} {'obs|mirror median (range)':>28s} {'photo|model median':>19s}   per photo (obs|mirror)")
    print(f"  {'':32s} {'':28s} {'':19s}   " + " ".join(f"{n[:10]:>10s}" for n in names))
    for name, bcfg in variants.items():
        seam, model_seam = [], []
        for j, k in enumerate(ok):
            bl, src = blend_uv(geo.uv_gt[k], geo.uv_gt_mask[k], uv_bfm[j], face_mask=basis.valid,
                               mirror_index=ctx.mirror_index, config=bcfg, normals=normals[j], nose_mask=nose)
            seam.append(seam_gradient_ratio(bl, src))
            photo = np.where(src == SOURCE_MIRRORED, SOURCE_OBSERVED, src).astype(np.uint8)
            model_seam.append(seam_gradient_ratio(bl, photo, SOURCE_OBSERVED, SOURCE_MODEL))
        seam = np.array(seam)
        fin = seam[np.isfinite(seam)]
        rng = f"{np.median(fin):.2f} ({fin.min():.2f}-{fin.max():.2f})" if fin.size else "-"
        print(f"  {name:32s} {rng:>28s} {np.nanmedian(model_seam):19.2f}   "
              + " ".join(f"{x:10.2f}" for x in seam))
    print("  yaw: " + " ".join(f"{n}={geo.pose[k, 0]:+.0f}" for n, k in zip(names, ok, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/tmp/blend_quality_syn.zarr"),
                    help="synthetic uvprep store (built here when absent)")
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    ap.add_argument("--no-real", action="store_true", help="skip the real photos")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic world")
    args = ap.parse_args()
    if not args.no_synthetic:
        synthetic_table(_synthetic_store(args.store, args.count, args.seed), VARIANTS)
    if not args.no_real:
        real_photos(VARIANTS, args.assets)


if __name__ == "__main__":
    main()
