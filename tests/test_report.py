"""``uvprep show``: the overlay column (fitted mesh, landmarks, occlusion, eroded mask), the labels, the CLI."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from common.faces.fit import mesh_in_image
from common.imageio import image_grid
from common.store import FAILED, Reason, StoreReader
from preprocess.cli import app
from preprocess.config import ShowConfig
from preprocess.report import (
    LANDMARK_RGB,
    MASK_RGB,
    draw_overlays,
    fit_label,
    iso_segments,
    overlay_tile,
    pose_label,
    preview_rows,
    sample_row,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grid_mesh(n: int = 5, x0: float = 8.0, side: float = 16.0, front: bool = True):
    """A flat n x n vertex grid over [x0, x0 + side]² px: xy (V, 2), uv (V, 2) in [0, 1], triangles (F, 3) facing
    the camera (counter-clockwise with y down) or away from it."""
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    uv = np.stack([u.ravel(), v.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tri = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])
    return x0 + side * uv, uv, tri if front else tri[:, ::-1]


def test_iso_segments_lie_on_the_level_and_span_the_mesh():
    xy, uv, tri = grid_mesh(n=6)
    segs = iso_segments(xy, tri, uv[:, 0], np.array([0.3, 0.55]))
    assert segs.shape[1:] == (2, 2) and len(segs) > 0
    np.testing.assert_allclose(np.sort(np.unique(np.round(segs[..., 0], 9))), [8 + 16 * 0.3, 8 + 16 * 0.55])
    length = np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1).sum()
    assert length == pytest.approx(2 * 16.0)  # two vertical lines across the 16 px grid


def test_draw_overlays_pixels():
    grey = np.full((32, 32, 3), 100, np.uint8)
    xy, uv, tri = grid_mesh()
    keypoints = np.array([0, 12, 24])
    out = draw_overlays(grey, xy, tri, uv, keypoints, size=64, mesh_lines=4, alpha=0.5)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    kp = np.floor(xy[keypoints] * 2).astype(int)
    assert (out[kp[:, 1], kp[:, 0]] == LANDMARK_RGB).all()
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    changed = (out != 100).any(-1)
    assert changed[inside].mean() > 0.1  # the mesh grid
    assert not changed[~cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)].any()

    # a mesh facing away is culled: only the landmarks remain
    back = draw_overlays(grey, xy, grid_mesh(front=False)[2], uv, keypoints, size=64)
    assert ((back != 100).any(-1) == (back == LANDMARK_RGB).all(-1)).all()

    occ = np.zeros((32, 32), bool)
    occ[2:6, 2:6] = True
    mask = np.zeros((32, 32), bool)
    mask[10:22, 10:22] = True
    out = draw_overlays(grey, occlusion=occ, mask=mask, size=64, alpha=0.5)
    assert (out[5:11, 5:11] == (178, 50, 50)).all()  # (100 + 255) / 2, 100 / 2, 100 / 2
    assert (out[30:36, 30:36] == 100).all() and (out[40:50, 50:60] == 100).all()
    ring = np.zeros((64, 64), bool)
    ring[18:46, 18:46], ring[22:42, 22:42] = True, False
    assert (out[ring] == MASK_RGB).all(-1).sum() > 60  # the outline of the eroded mask


@pytest.fixture(scope="module")
def reader(train_store):
    return StoreReader(train_store)


def test_overlay_tile_draws_the_store_fit(reader):
    s, model = reader.sample(0), reader.face_model()
    h, size = s["image"].shape[0], 128
    plain = cv2.resize(s["image"], (size, size), interpolation=cv2.INTER_LINEAR)
    verts = mesh_in_image(model, s["params"][None], h)[0]

    lm = overlay_tile(s, model, ShowConfig(overlays=("landmarks",), height=size))
    kp = np.floor(verts[model.keypoints, :2] * size / h).astype(int)
    kp = kp[((kp >= 0) & (kp < size)).all(1)]
    assert len(kp) > 50 and (lm[kp[:, 1], kp[:, 0]] == LANDMARK_RGB).all()

    mesh = overlay_tile(s, model, ShowConfig(overlays=("mesh",), height=size))
    changed = (mesh != plain).any(-1)
    x0, y0 = np.floor(verts[:, :2].min(0) * size / h).astype(int) - 2
    x1, y1 = np.ceil(verts[:, :2].max(0) * size / h).astype(int) + 2
    in_box = np.zeros_like(changed)
    in_box[max(y0, 0):y1, max(x0, 0):x1] = True
    assert changed[in_box].mean() > 0.1 and not changed[~in_box].any()

    none = overlay_tile(s, model, ShowConfig(overlays=("occlusion",), height=size))  # no occlusion given
    assert np.array_equal(none, plain)


def test_labels_name_the_sample_and_its_pose(reader):
    cfg = ShowConfig(height=96)
    rows, labels = preview_rows(reader, [0, 3], cfg)
    assert len(rows) == 2 and all(len(r) == len(lab) for r, lab in zip(rows, labels, strict=True))
    s = reader.sample(3)
    assert labels[1][0].startswith("#3 ") and labels[1][0].endswith(s["path"][-4:])
    assert labels[1][1] == pose_label(s["pose"]) and labels[1][2] == "uv_gt"
    yaw, pitch, roll = s["pose"]
    assert pose_label(s["pose"]) == f"y{yaw:+.0f} p{pitch:+.0f} r{roll:+.0f}"

    with_labels, without = image_grid(rows, labels=labels, height=96), image_grid(rows, height=96)
    diff = (with_labels != without).any(-1)
    pad = 4
    assert diff[pad:pad + 14, pad:pad + 96].mean() > 0.05  # the label band of the first tile
    assert not diff[pad + 20:pad + 96].any()  # and nothing below it

    long = fit_label("folder/" * 40 + "IMG_0001.jpg", 96, 96, prefix="#7 ")
    assert long.startswith("#7 ...") and long.endswith("IMG_0001.jpg")
    assert cv2.getTextSize(long, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 3)[0][0] <= 96


def _grid_shape(reader, n_rows: int, h: int, overlay: bool, pad: int = 4) -> tuple[int, int, int]:
    lay = reader.layout
    (hc, wc), (hs, ws) = lay.ctr_shape, lay.sd_shape  # image, uv_gt, uv_bl, source, face region are square
    widths = [h] * (5 + overlay + lay.has_truth) + [round(wc * h / hc), round(ws * h / hs)]
    return n_rows * h + (n_rows + 1) * pad, sum(widths) + pad * (len(widths) + 1), 3


def test_cli_show_png_with_and_without_occlusion(train_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(train_store, store)
    group = zarr.open_group(str(store), mode="r+")
    if "occlusion" in group:
        del group["occlusion"]
    reader = StoreReader(store)
    runner = CliRunner()

    png = tmp_path / "grid.png"
    res = runner.invoke(app, ["show", str(store), "--index", "0,1,2", "--out", str(png), "--height", "96"])
    assert res.exit_code == 0, res.output
    img = cv2.imread(str(png))
    assert img.shape == _grid_shape(reader, 3, 96, overlay=True)
    res = runner.invoke(app, ["show", str(store), "--index", "0,1", "--out", str(png), "--overlay", "none"])
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(png)).shape == _grid_shape(reader, 2, 192, overlay=False)
    res = runner.invoke(app, ["show", str(store), "--out", str(png), "--overlay", "mesh,wireframe"])
    assert res.exit_code == 1 and "unknown overlay(s) ['wireframe']" in res.output

    # the occlusion array, once the store has one, is drawn red where it is set, and only there
    n, h = len(reader), reader.layout.image_size
    occ = group.create_array("occlusion", shape=(n, h, h), dtype=bool, chunks=(reader.layout.chunk, h, h),
                             fill_value=False)
    occ[1, 8:24, 8:24] = True
    cfg = ShowConfig(overlays=("occlusion",), height=h)
    rows, _ = preview_rows(StoreReader(store), [0, 1], cfg)
    plain = [reader.sample(i)["image"] for i in (0, 1)]
    assert np.array_equal(rows[0][1], plain[0])
    red = rows[1][1].astype(int) - plain[1].astype(int)
    assert (red[9:23, 9:23, 0] >= 0).all() and (red[9:23, 9:23, 1:] <= 0).all() and red[9:23, 9:23].any()
    red[7:25, 7:25] = 0
    assert not red.any()
    res = runner.invoke(app, ["show", str(store), "--index", "0,1", "--out", str(png)])
    assert res.exit_code == 0 and cv2.imread(str(png)).shape == _grid_shape(reader, 2, 192, overlay=True)

    # a failed sample is its image alone, labelled with the reason
    group["status"][2], group["reason"][2] = FAILED, int(Reason.NO_FACE)
    rows, labels = preview_rows(StoreReader(store), [1, 2], ShowConfig())
    assert len(rows[1]) == 1 and len(labels[1]) == 1 and labels[1][0].startswith("#2 failed: no_face ")
    rows, labels = preview_rows(StoreReader(store), [1], ShowConfig(overlays=()))
    assert len(rows[0]) == len(labels[0]) == len(sample_row(reader.sample(1))) and labels[0][0].startswith("#1 y")
