"""A trained run on held-out synthetic faces: what each stage makes of a photo, against the synthetic world's truth.

    python scripts/heldout_figure.py --run RUN_DIR --store STORE --out PNG [--index 0,1,2,3] [--checkpoint best|last]
    python scripts/heldout_figure.py --run /tmp/exp/g_res --store /tmp/exp/val64.zarr --out /tmp/exp/heldout.png

One row per store sample (``--index``: store indices, status OK), the column names on the top row:

    photo #i yaw +y | UV_spl | UV_pred | UV_bl | UV_bfm | UV_true | yaw -60 | yaw -30 | yaw +0 | yaw +30 | yaw +60

- photo: the store's input image (S x S), labelled with its store index and fitted yaw in degrees;
- UV_spl: the sampler alone (Section 3.1), as the generator sees it: black where it samples outside the photo;
- UV_pred: the sampler and the generator, G(UV_spl, inside) clamped to [0, 1] (Section 3.2), as ``uvtrain eval``'s
  ``generator`` method. A checkpoint taken before any generator step (``--generator-steps 0``, or a ``best.pt`` from
  the sampler phase) has an untrained generator: the column then shows ``uvtrain eval``'s ``sampler`` method instead
  (UV_spl, UV_bfm where it samples outside the photo), labelled ``UV_spl+bfm (no G)``, and so do the renders;
- UV_bl: the store's pseudo ground truth (Eq. 9 + symmetric fill); UV_bfm: the store's texture-basis fit (Eq. 8);
- UV_true: the synthetic world's exact texture (``uv_true``; only stores built from the synthetic world have it);
- yaw -60 ... +60: UV_pred rendered on the sample's fitted shape with its pitch and roll, turned to that yaw
  (:func:`train.render.rotated_params`, the trainer's rotate-and-render), at the store's image size S, black
  background; cut to the square around the face in all five poses (the same square along a row).

UV maps are shown on the store's face texels only (the layout's ``valid`` mask; grey elsewhere). Every tile is
enlarged by nearest neighbour (the renders from their crop) to a height of at least 128 px, a whole multiple of S,
so the pixels of 64 x 64 faces stay visible as they are.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from common.imageio import image_grid, write_png
from common.store import OK, StoreReader
from train.bundle import layout_valid, read_bundle
from train.data import images_to_tensor, resize_images
from train.evaluate import UVMethods, check_compatible
from train.render import PosedMesh, render_lookup, rotated_params
from train.runs import BEST, RunError, load_run_config, load_trained, predict_uv, weights_file

YAWS = (-60.0, -30.0, 0.0, 30.0, 60.0)
COLUMNS = ["UV_spl", "UV_pred", "UV_bl", "UV_bfm", "UV_true", *(f"yaw {y:+.0f}" for y in YAWS)]
NO_GENERATOR = "UV_spl+bfm (no G)"
MIN_TILE = 128
GREY = 0.5


def load_run(run: Path, which: str, reader: StoreReader, store: Path):
    """(train config, sampler, generator, step, generator steps trained) of ``run``'s ``best.pt`` or last
    checkpoint, on the CPU, after checking that the run's UV layout is the store's."""
    cfg = load_run_config(run)
    bundle = read_bundle(run, cfg.store)
    path = run / BEST if which == "best" else weights_file(run)
    if which == "best" and not path.is_file():
        raise RunError(f"{run}: no {BEST} (it is written by runs with --val-store); pass --checkpoint last")
    cfg, sampler, generator, step = load_trained(run, "cpu", bundle, checkpoint=path, config=cfg)
    check_compatible(reader, str(store), bundle.face_model.fingerprint(), bundle.uv_size, f"the run {run}")
    return cfg, sampler, generator, step, max(0, step - cfg.sampler_steps)


def check_indices(reader: StoreReader, indices: list[int], store: Path) -> None:
    """A SystemExit naming the indices that are out of range or not status OK."""
    bad = [i for i in indices if not 0 <= i < len(reader)]
    if bad:
        raise SystemExit(f"--index {bad}: {store} has samples 0..{len(reader) - 1}")
    status = reader.batch(np.asarray(indices), ["status"])["status"]
    bad = [i for i, s in zip(indices, status, strict=True) if s != OK]
    if bad:
        raise SystemExit(f"--index {bad}: not usable (status not OK) in {store}; pick others, e.g. "
                         f"{reader.ok_indices()[:4].tolist()}")
    if not reader.layout.has_truth:
        raise SystemExit(f"{store} has no uv_true (not built from the synthetic world): the UV_true column needs it")


def face_box(cover: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """The square (rows, columns) of an (S, S) bool mask around its True pixels, ``margin`` pixels wider on each
    side and shifted to lie inside the image; the whole image when the mask is empty."""
    size = cover.shape[0]
    if not cover.any():
        return slice(0, size), slice(0, size)
    (r0, c0), (r1, c1) = np.argwhere(cover).min(0), np.argwhere(cover).max(0) + 1
    side = min(size, max(r1 - r0, c1 - c0) + 2 * margin)
    start = [int(np.clip((lo + hi - side) // 2, 0, size - side)) for lo, hi in ((r0, r1), (c0, c1))]
    return slice(start[0], start[0] + side), slice(start[1], start[1] + side)


@torch.no_grad()
def heldout_rows(reader: StoreReader, cfg, sampler, generator, trained_g: int, indices: list[int]
                 ) -> tuple[list[list[np.ndarray]], list[list[str]]]:
    """Tiles (H, W, 3) float in [0, 1] and labels of the figure's rows (see the module docstring)."""
    a = reader.batch(np.asarray(indices), ["image", "uv_bl", "uv_true", "params", "pose", "tex_coeff"])
    s, u = reader.layout.image_size, reader.layout.uv_size
    image = images_to_tensor(a["image"])
    methods = UVMethods(reader, torch.device("cpu"), sampler, generator, cfg.image_size, reader.texture_basis())
    uv_spl, uv_pred = predict_uv(sampler, generator, resize_images(image, cfg.image_size), u)
    if trained_g:
        uv_pred = uv_pred.clamp(0.0, 1.0)
    else:  # an untrained generator's output means nothing: show (and render) what eval's sampler method scores
        uv_pred = methods("sampler", {"image": image, "tex_coeff": a["tex_coeff"]})
    mesh = PosedMesh(reader.face_model())
    renders, covers = [], []
    for yaw in YAWS:
        p = rotated_params(a["params"], np.full(len(indices), yaw), s, mesh.model)
        grid, cover = mesh.lookup(mesh.verts(torch.from_numpy(p), s, s), s)
        renders.append(render_lookup(uv_pred, grid, cover))
        covers.append(cover[:, 0].numpy() > 0)
    boxes = [face_box(np.any([c[k] for c in covers], 0)) for k in range(len(indices))]
    valid = torch.from_numpy(layout_valid(reader))[None, None]
    uvs = [uv_spl, uv_pred, images_to_tensor(a["uv_bl"]), methods.uv_bfm(a["tex_coeff"]),
           images_to_tensor(a["uv_true"])]
    uvs = [torch.where(valid, t, torch.full_like(t, GREY)) for t in uvs]
    rows = [[image[k], *(t[k] for t in uvs), *(r[k][(slice(None), *boxes[k])] for r in renders)]
            for k in range(len(indices))]
    rows = [[t.permute(1, 2, 0).clamp(0, 1).numpy() for t in r] for r in rows]
    columns = [COLUMNS[0], COLUMNS[1] if trained_g else NO_GENERATOR, *COLUMNS[2:]]
    labels = [[f"{'photo ' if k == 0 else ''}#{i} yaw {float(y):+.0f}", *(columns if k == 0 else [])]
              for k, (i, y) in enumerate(zip(indices, a["pose"][:, 0], strict=True))]
    return rows, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a `uvtrain fit` run directory (or `uvtrain export`)")
    ap.add_argument("--store", type=Path, required=True, help="a held-out store built from the synthetic world")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--index", default="0,1,2,3", help="comma-separated store indices, one row each")
    ap.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="best.pt (best held-out validation) or the last checkpoint")
    args = ap.parse_args()
    try:
        indices = [int(v) for v in args.index.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--index {args.index}: expected comma-separated integers, e.g. 0,1,2,3") from None
    torch.set_grad_enabled(False)
    reader = StoreReader(args.store)
    check_indices(reader, indices, args.store)
    try:
        cfg, sampler, generator, step, trained_g = load_run(args.run, args.checkpoint, reader, args.store)
    except RunError as e:
        raise SystemExit(str(e)) from None
    rows, labels = heldout_rows(reader, cfg, sampler, generator, trained_g, indices)
    s = reader.layout.image_size
    height = s * math.ceil(MIN_TILE / s)
    print(write_png(args.out, image_grid(rows, labels=labels, height=height)))
    print(f"{args.run} {args.checkpoint}: step {step}, {trained_g} generator steps"
          + ("" if trained_g else f" (none: the UV_pred column shows {NO_GENERATOR})"))


if __name__ == "__main__":
    main()
