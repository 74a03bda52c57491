"""Figures for the README (``docs/``) and local inspection sheets.

    python scripts/make_figures.py                     # docs/crop_regions.png, docs/pipeline_synthetic.png
    python scripts/make_figures.py --synthetic-sheet /tmp/synthetic_stages.png
    python scripts/make_figures.py --real-sheet /tmp/real_faces.png --assets ../shared/assets
    python scripts/make_figures.py --no-docs --real-before-after /tmp/real_uv_bl.png   # UV_bl before / after

The ``docs/`` figures come only from the licence-free procedural face model and the synthetic world.
``--real-sheet`` runs the public dense BFM and 3DDFA_V2 on the example photos in the asset folder; its output
is BFM-derived (non-commercial) and shows third-party photos: write it outside the repository, never to docs/.

Each row of a stage sheet: photo (mesh dots and the 68 keypoints drawn over it) | UV_gt (grey = unobserved) |
UV_bfm (Eq. 8) | UV_bl (Eq. 9) | source map (green observed, blue mirrored, grey model, black outside) |
centre crop | side crop (black = not valid for this pose).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from common.config import FitConfig
from common.facemodel import FaceModel
from common.faces.assets import TDDFAAssets
from common.faces.fit import mesh_in_image
from common.imageio import image_grid, read_image, write_png
from common.procedural import build_procedural_model
from common.synthetic import SyntheticConfig, generate
from common.uvlayout import crop_layout
from common.uvtools import region_uv_mask, uv_vertex_attribute_image
from preprocess.config import MaskedPCAConfig, StageConfig, UVGTConfig
from preprocess.report import sample_row
from preprocess.sources import SampleInput
from preprocess.stages import StageContext, Timer, run_geometry, run_stages
from preprocess.texture import UVTextureBasis, learn_masked_pca

DOCS = Path(__file__).resolve().parents[1] / "docs"
COLUMNS = ["photo + mesh", "UV_gt", "UV_bfm", "UV_bl", "source", "ctr crop", "side crop"]
REGION_COLOURS = {  # RGB in [0, 1], drawn in this order (later ones on top)
    "face": (0.95, 0.85, 0.35), "nose": (0.2, 0.75, 0.3), "nostrils": (0.9, 0.1, 0.1),
    "mouth": (0.7, 0.2, 0.8), "eyes": (0.15, 0.5, 0.95),
}


# --------------------------------------------------------------------------------------------- sheets
def overlay_mesh(image: np.ndarray, verts_px: np.ndarray, keypoints: np.ndarray | None, step: int = 15) -> np.ndarray:
    """image (S, S, 3) uint8 with every ``step``-th vertex (green dots) and the keypoints (red) drawn on it."""
    out = image.copy()
    pts = np.round(verts_px[::step, :2]).astype(int)
    ok = (pts >= 0).all(1) & (pts < np.array(out.shape[1::-1])).all(1)
    out[pts[ok, 1], pts[ok, 0]] = (60, 230, 60)
    if keypoints is not None:
        for x, y in verts_px[keypoints, :2]:
            cv2.circle(out, (int(x), int(y)), 2, (230, 40, 40), -1, cv2.LINE_AA)
    return out


def stage_rows(arrays: dict, ctx: StageContext, labels: list[str]) -> tuple[list, list]:
    """Tiles and labels of a stage sheet for the ok samples of ``run_stages`` output."""
    rows, names = [], []
    verts = mesh_in_image(ctx.model, np.nan_to_num(arrays["params"]), ctx.config.fit.image_size)
    uv_bfm = np.clip(ctx.basis.synthesize(np.nan_to_num(arrays["tex_coeff"])), 0, 1)
    for k in np.flatnonzero(arrays["status"] == 1):
        s = {name: a[k] for name, a in arrays.items()}
        tiles = sample_row(s)
        photo = overlay_mesh(s["image"], verts[k], ctx.model.keypoints)
        rows.append([photo, tiles[1], np.where(ctx.basis.valid[..., None], uv_bfm[k], 0), *tiles[2:6]])
        names.append([f"{labels[k]} yaw {float(s['pose'][0]):+.0f}", *COLUMNS[1:]])
    return rows, names


def synthetic_stages(indices, uv_size: int = 128, image_size: int = 192, seed: int = 3,
                     yaws=None) -> tuple[list, list]:
    """Synthetic faces (procedural model, the model's own texture basis) through every stage."""
    model = build_procedural_model()
    cfg = StageConfig(fit=FitConfig(image_size=image_size), uvgt=UVGTConfig(uv_size=uv_size), texture_model="model")
    ctx = StageContext.build(cfg, basis=UVTextureBasis.from_face_model(model, uv_size), model=model)
    inputs = []
    for j, i in enumerate(indices):
        syn = SyntheticConfig(image_size=image_size, uv_size=uv_size, seed=seed, occluder_prob=0.0)
        if yaws is not None:  # a pose band per row: frontal / three-quarter / profile
            syn = SyntheticConfig(image_size=image_size, uv_size=uv_size, seed=seed, occluder_prob=0.0,
                                  yaw_min_deg=yaws[j][0], yaw_max_deg=yaws[j][1])
        f = generate(int(i), syn, model)
        inputs.append(SampleInput(index=j, key=f"#{i}", image=f.image, given_params=f.params,
                                  truth={"face_mask": f.face_mask}))
    arrays, errors = run_stages(inputs, ctx)
    if errors:
        raise RuntimeError(f"stage errors: {errors}")
    return stage_rows(arrays, ctx, [s.key for s in inputs])


def real_stages(assets: Path, uv_size: int = 256) -> tuple[list, list]:
    """The example photos through the real chain (FaceBoxes, 3DDFA_V2, dense public BFM) with a tiny PCA basis
    learned from their own UV_gt (+ mirrors): see tests/test_real_faces.py for why."""
    v2 = TDDFAAssets.from_dir(assets / "3ddfa_v2")
    fit = FitConfig(fitter="tddfa", image_size=256, tddfa_weights=v2.mb05, param_stats=v2.param_stats,
                    detector_weights=v2.detector)
    cfg = StageConfig(face_model="bfm-public", bfm_v1_dir=assets / "3ddfa_v1", bfm_v2_dir=assets / "3ddfa_v2",
                      fit=fit, uvgt=UVGTConfig(uv_size=uv_size))
    ctx = StageContext.build(cfg)
    emma = read_image(assets / "faces/emma.jpg")
    w = emma.shape[1] // 3
    photos = {"JianzhuGuo": read_image(assets / "faces/JianzhuGuo.jpg"),
              **{f"emma {p}": np.ascontiguousarray(emma[:, i * w:(i + 1) * w]) for i, p in enumerate("LMR")},
              "trump_hillary": read_image(assets / "faces/trump_hillary.jpg")}
    inputs = [SampleInput(index=i, key=k, image=v) for i, (k, v) in enumerate(photos.items())]
    geo = run_geometry(inputs, ctx, Timer())
    ok = geo.reason == 0
    valid = ctx.uv_cache.uv_frags.tri_id[0].numpy() >= 0
    ctx.basis = learn_masked_pca(geo.uv_gt[ok], geo.uv_gt_mask[ok], valid,
                                 MaskedPCAConfig(n_components=min(4, int(ok.sum())), fit_size=64),
                                 mirror_index=ctx.mirror_index, name="pca:example-photos")
    arrays, _ = run_stages(inputs, ctx)
    return stage_rows(arrays, ctx, list(photos))


# ---------------------------------------------------------------------------------------- crop regions
def real_before_after(assets: Path, workdir: Path) -> tuple[list, list]:
    """Rows photo | UV_bl before (plain mirror, no occluder rejection) | UV_bl after (the defaults) for the example
    photos and the AFLW2000-3D samples, each built into a store under ``workdir`` with the public BFM."""
    import dataclasses
    import shutil

    from common.store import OK, StoreReader
    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    photos = workdir / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for folder in ("faces", "aflw2000"):
        for jpg in sorted((assets / folder).glob("*.jpg")):
            shutil.copy(jpg, photos / jpg.name)
    stores = {}
    for name, extra in (("before", {"occlusion": False, "fill_mode": "mirror"}), ("after", {})):
        args = BuildArgs(out=workdir / f"{name}.zarr", src="folder", images=photos, bfm_v1_dir=assets / "3ddfa_v1",
                         bfm_v2_dir=assets / "3ddfa_v2", pca_samples=64, n_tex=6, overwrite=True, **extra)
        cfg, run = make_config(args)
        build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
        stores[name] = StoreReader(workdir / f"{name}.zarr")
    rows, labels = [], []
    for i in range(len(stores["after"])):
        b, a = stores["before"].sample(i), stores["after"].sample(i)
        if b["status"] == OK and a["status"] == OK:
            rows.append([a["image"], b["uv_bl"], a["uv_bl"]])
            labels.append([Path(a["path"]).name, "UV_bl before", "UV_bl after"])
    return rows, labels


def crop_regions_figure(model: FaceModel, uv_size: int = 256, scale: int = 2) -> np.ndarray:
    """The named UV regions over the mean texture, with the centre and side crop boxes: (H, W, 3) uint8."""
    mean, cover = uv_vertex_attribute_image(model, model.tex_mean, uv_size)
    img = np.where(cover[..., None], mean, 1.0)
    for name, col in REGION_COLOURS.items():
        m = region_uv_mask(model, name, uv_size)
        alpha = 0.25 if name == "face" else 0.6
        img[m] = (1 - alpha) * img[m] + alpha * np.array(col)
    big = cv2.resize((img * 255).astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    for name, col in (("centre", (255, 255, 255)), ("left", (40, 40, 40))):
        m = region_uv_mask(model, name, uv_size) & region_uv_mask(model, "face", uv_size)
        contours, _ = cv2.findContours(cv2.resize(m.astype(np.uint8), None, fx=scale, fy=scale,
                                                  interpolation=cv2.INTER_NEAREST), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(big, contours, -1, col, 1, cv2.LINE_AA)
    layout = crop_layout(model, uv_size)
    for box, col, text in ((layout.ctr_box, (255, 255, 255), "centre crop (UV_ctr)"),
                           (layout.sd_box, (20, 20, 20), "side crop (UV_sd)")):
        r0, r1, c0, c1 = (v * scale for v in box)
        cv2.rectangle(big, (c0, r0), (c1 - 1, r1 - 1), col, 2, cv2.LINE_AA)
        _label(big, text, (c0 + 4, r1 - 8 if col[0] < 128 else r0 + 18), col)
    legend = np.full((big.shape[0], 210, 3), 255, np.uint8)
    entries = [*REGION_COLOURS.items(), ("centre region (outline)", (1, 1, 1)), ("left half (outline)", (0.15,) * 3)]
    for i, (name, col) in enumerate(entries):
        y = 24 + 26 * i
        cv2.rectangle(legend, (10, y - 12), (28, y + 4), tuple(int(255 * c) for c in col), -1)
        cv2.rectangle(legend, (10, y - 12), (28, y + 4), (0, 0, 0), 1)
        cv2.putText(legend, name, (36, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([big, legend], 1)


def _label(img: np.ndarray, text: str, org: tuple[int, int], col) -> None:
    halo = (0, 0, 0) if col[0] > 128 else (255, 255, 255)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, halo, 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, col, 1, cv2.LINE_AA)


# ------------------------------------------------------------------------------------------------ main
def _sheet(rows_labels, height: int) -> np.ndarray:
    rows, labels = rows_labels
    return image_grid(rows, labels=labels, height=height)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=DOCS, help="where the README figures go")
    ap.add_argument("--no-docs", action="store_true", help="skip the README figures")
    ap.add_argument("--synthetic-sheet", type=Path, help="also write a sheet of synthetic faces through the stages")
    ap.add_argument("--real-sheet", type=Path, help="also write the example photos through the stages (BFM-derived: "
                                                    "keep it out of the repository)")
    ap.add_argument("--real-before-after", type=Path, help="also write photo | UV_bl before | after for the example "
                    "photos (BFM-derived, third-party photos: write it outside the repository)")
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    args = ap.parse_args()
    if not args.no_docs:
        model = build_procedural_model()
        print(write_png(args.docs / "crop_regions.png", crop_regions_figure(model)))
        bands = [(0, 8), (30, 45), (60, 75)]
        print(write_png(args.docs / "pipeline_synthetic.png",
                        _sheet(synthetic_stages([1, 2, 3], uv_size=96, image_size=128, yaws=bands), height=112)))
    if args.synthetic_sheet:
        print(write_png(args.synthetic_sheet, _sheet(synthetic_stages(range(6)), height=160)))
    repo = Path(__file__).resolve().parents[1]
    for out in (args.real_sheet, args.real_before_after):
        if out is not None and out.resolve().is_relative_to(repo):
            raise SystemExit(f"{out}: real-photo sheets are BFM-derived and show third-party photos; write them "
                             f"outside the repository")
    if args.real_sheet:
        print(write_png(args.real_sheet, _sheet(real_stages(args.assets), height=160)))
    if args.real_before_after:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            rows, labels = real_before_after(args.assets, Path(work))
        print(write_png(args.real_before_after, image_grid(rows, labels=labels, height=200)))


if __name__ == "__main__":
    main()
