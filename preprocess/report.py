"""``uvprep info / check / show``: read a store and report on it (presentation at the edge, no logic elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from common.faces.fit import describe_fit, mesh_in_image
from common.imageio import image_grid, write_png
from common.store import (
    FAILED,
    OK,
    Reason,
    StoreReader,
    creation_interrupted,
    open_store,
    validate_store,
    verify_chunks,
)
from preprocess.config import ShowConfig


def print_info(store: str | Path, console: Console | None = None) -> None:
    """Schema, layout, counts, failures by reason, storage and the creation config."""
    console = console or Console()
    if creation_interrupted(store):
        console.print(f"{store}: its creation was interrupted (no data yet); rerun the same `uvprep build` command")
        return
    r = StoreReader(store)
    attrs, counts = r.attrs, r.counts()
    table = Table(title=f"{store}", show_header=False)
    table.add_row("schema version", str(attrs.get("schema_version")))
    table.add_row("source", str(attrs.get("source_kind")))
    model = r.group["model"]
    table.add_row("face model", f"{attrs.get('face_model')} ({attrs.get('face_model_hash')}): "
                                f"{model['mean_shape'].shape[0]} vertices, {model['triangles'].shape[0]} triangles")
    crops = r.crop_layout()
    table.add_row("uv layout", f"U {crops.uv_size}, centre crop {crops.ctr_box} {crops.ctr_region.shape}, side crop "
                               f"{crops.sd_box} {crops.sd_region.shape}, {int((r.mirror_index() >= 0).sum())} "
                               f"mirrored texels")
    table.add_row("fitter", describe_fit(attrs.get("config", {}).get("stages", {}).get("fit", {})))
    table.add_row("face_region", str(attrs.get("face_region_source")))
    table.add_row("texture model", str(attrs.get("texture_basis_hash"))[:60])
    table.add_row("layout", json.dumps(attrs.get("layout")))
    table.add_row("samples", f"{len(r)}: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending")
    table.add_row("chunks", f"{counts['chunks_done']} / {counts['n_chunks']} complete")
    for reason, n in sorted(counts["failed_by_reason"].items()):
        table.add_row(f"  failed: {reason}", str(n))
    storage = r.storage().values()
    stored, raw = sum(s for s, _ in storage), sum(b for _, b in storage)
    table.add_row("storage", f"{stored / 1e6:.1f} MB stored / {raw / 1e6:.1f} MB raw ({stored / max(raw, 1):.2f})")
    console.print(table)
    console.print_json(json.dumps(attrs.get("config", {})))


def check_store(store: str | Path, console: Console | None = None, deep: bool = False) -> int:
    """Validate; print the problems. Returns 0 when sound and complete, 1 otherwise.

    The completed chunks' data is compared with their SHA-256 records: all of them with ``deep``, else a sample
    of at most 8 spread over the store (stores written before chunk records cannot be checked this way).
    """
    console = console or Console()
    if creation_interrupted(store):
        console.print(f"[yellow]{store}: its creation was interrupted (no data yet); rerun the same `uvprep build` "
                      f"command to create it", soft_wrap=True)
        return 1
    if "schema_version" not in open_store(store).attrs:
        raise KeyError("the 'schema_version' attribute")  # a Zarr group, but not one uvprep wrote
    problems = validate_store(store)  # not StoreReader: it refuses other schema versions, check reports them
    if not problems:
        done = np.flatnonzero(np.asarray(open_store(store)["chunk_done"][...]) == 1)
        sample = done if deep else done[np.unique(np.linspace(0, len(done) - 1, min(8, len(done))).astype(int))]
        problems = [f"chunk {c}: {why}; `uvprep build --verify` (the same command) rebuilds it"
                    for c, why in verify_chunks(store, sample).items()]
    if not problems:
        done = np.asarray(open_store(store)["chunk_done"][...]).astype(bool)
        if not done.all():
            console.print(f"[yellow]{store}: sound but INCOMPLETE: {int(done.sum())} of {done.size} chunks built "
                          f"(a build is running or was interrupted; rerun the same `uvprep build` to finish)",
                          soft_wrap=True)
            return 1
        console.print(f"[green]{store}: OK ({done.size} of {done.size} chunks built)")
        return 0
    for p in problems:
        console.print(f"[red]- {p}")
    return 1


def _rgb(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 255.0


def source_map_rgb(src: np.ndarray) -> np.ndarray:
    """uv_source codes (U, U) -> colours: observed green, mirrored blue, model grey, outside black."""
    lut = np.zeros((256, 3), np.float32)
    lut[0], lut[1], lut[2] = (0.5, 0.5, 0.5), (0.2, 0.8, 0.2), (0.2, 0.4, 0.9)
    return lut[src]


def masked_input(s: dict) -> np.ndarray:
    """The masked input I^m: the photo inside ``face_region``, at half brightness in the ring the erosion removed
    (outside ``face_mask_eroded``), black elsewhere. (H, W, 3) float32."""
    weight = np.where(s["face_mask_eroded"], 1.0, np.where(s["face_region"], 0.5, 0.0)).astype(np.float32)
    return _rgb(s["image"]) * weight[..., None]


def sample_row(s: dict) -> list[np.ndarray]:
    """One preview row: image | UV_gt (grey where unobserved) | UV_bl | source map | centre crop | side crop
    [| face region (:func:`masked_input`) when ``s`` has it] [| true UV for synthetic stores]."""
    grey = np.float32(0.5)
    uv_gt = np.where(s["uv_gt_mask"][..., None], _rgb(s["uv_gt"]), grey)
    ctr = np.where(s["uv_ctr_mask"][..., None], _rgb(s["uv_ctr"]), grey) if s["ctr_valid"] else \
        np.zeros((*s["uv_ctr"].shape[:2], 3), np.float32)
    sd = np.where(s["uv_sd_mask"][..., None], _rgb(s["uv_sd"]), grey) if s["sd_valid"] else \
        np.zeros((*s["uv_sd"].shape[:2], 3), np.float32)
    row = [_rgb(s["image"]), uv_gt, _rgb(s["uv_bl"]), source_map_rgb(s["uv_source"]), ctr, sd]
    if "face_region" in s:
        row.append(masked_input(s))
    if "uv_true" in s:
        row.append(_rgb(s["uv_true"]))
    return row


MESH_RGB, LANDMARK_RGB, OCCLUSION_RGB, MASK_RGB = (60, 255, 90), (255, 220, 0), (255, 0, 0), (0, 190, 255)


def _blend(out: np.ndarray, where: np.ndarray, rgb, alpha: float) -> None:
    """out (S, S, 3) uint8, in place: ``alpha`` of ``rgb`` over the pixels where ``where`` (S, S) bool."""
    out[where] = (out[where] * (1.0 - alpha) + np.asarray(rgb, np.float32) * alpha + 0.5).astype(np.uint8)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) bool, bilinear then thresholded (smooth edges when enlarging)."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5


def iso_segments(xy: np.ndarray, triangles: np.ndarray, f: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Where the piecewise-linear field ``f`` crosses each level, as line segments (marching triangles).

    xy: (V, 2) vertex positions; triangles: (F, 3) int; f: (V,) values; levels: (L,) ascending. Returns (M, 2, 2):
    one segment per (triangle, level) pair the level crosses, from one crossed edge to the other.
    """
    levels = np.asarray(levels, np.float64)
    fv, pv = f[triangles], xy[triangles]  # (F, 3), (F, 3, 2)
    # the levels l with min f <= l < max f cross a triangle (exactly two of its edges): list those pairs only
    lo = np.searchsorted(levels, fv.min(1), "left")
    n = np.searchsorted(levels, fv.max(1), "left") - lo
    tid = np.repeat(np.arange(len(fv)), n)
    lid = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n - lo, n)
    lv, fv, pv = levels[lid, None], fv[tid], pv[tid]  # (M, 1), (M, 3), (M, 3, 2)
    a, b = np.array([0, 1, 2]), np.array([1, 2, 0])  # the three edges
    fa, fb = fv[:, a], fv[:, b]
    crossed = (fa > lv) != (fb > lv)  # (M, 3), two per row
    t = (lv - fa) / np.where(fa == fb, 1.0, fb - fa)
    pts = pv[:, a] + t[..., None] * (pv[:, b] - pv[:, a])  # (M, 3, 2)
    return pts[crossed].reshape(-1, 2, 2)


def draw_overlays(image: np.ndarray, verts_px: np.ndarray | None = None, triangles: np.ndarray | None = None,
                  uv: np.ndarray | None = None, keypoints: np.ndarray | None = None,
                  occlusion: np.ndarray | None = None, mask: np.ndarray | None = None, *, size: int | None = None,
                  mesh_lines: int = 16, alpha: float = 0.5) -> np.ndarray:
    """The photo with the fit and the masks drawn over it, at ``size`` pixels (default: the photo's).

    image: (H, H, 3) uint8 RGB. verts_px: (V, 2+) projected vertices in the photo's pixels (x right, y down,
    pixel j covers [j, j+1), e.g. :func:`common.faces.fit.mesh_in_image`). triangles (F, 3) int and uv (V, 2) in
    [0, 1]: with ``verts_px``, the front-facing part of the mesh as a grid of ``mesh_lines`` iso-u and iso-v lines
    (:func:`iso_segments`; ``MESH_RGB`` at ``alpha``). keypoints: (K,) vertex ids drawn as opaque
    ``LANDMARK_RGB`` dots. occlusion: (H, H) bool, red at ``alpha``. mask: (H, H) bool, its outline in
    ``MASK_RGB`` (the eroded face mask). Any of them None: not drawn. Returns (size, size, 3) uint8, drawn in the
    order occlusion, mask outline, mesh, landmarks.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_overlays: expected an (H, W, 3) uint8 photo, found {image.shape} {image.dtype}")
    h = image.shape[0]
    size = int(size or h)
    scale = size / h
    interp = cv2.INTER_AREA if size < h else cv2.INTER_LINEAR
    out = np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=interp) if size != h else image.copy())
    if occlusion is not None:
        _blend(out, _resize_mask(occlusion, size), OCCLUSION_RGB, alpha)
    if mask is not None:
        contours, _ = cv2.findContours(_resize_mask(mask, size).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, MASK_RGB, max(1, size // 192), cv2.LINE_8)
    if verts_px is None:
        return out
    xy = np.asarray(verts_px, np.float64)[:, :2] * scale
    if triangles is not None and uv is not None:
        tri = np.asarray(triangles)
        e1, e2 = xy[tri[:, 1]] - xy[tri[:, 0]], xy[tri[:, 2]] - xy[tri[:, 0]]
        tri = tri[(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) < 0]  # y down: counter-clockwise faces the camera
        levels = (np.arange(mesh_lines) + 0.5) / mesh_lines
        segs = np.concatenate([iso_segments(xy, tri, np.asarray(uv, np.float64)[:, k], levels) for k in (0, 1)])
        if len(segs):
            wire = out.copy()
            shift = 2  # sub-pixel end points: 1/4 px
            cv2.polylines(wire, np.round(segs * (1 << shift)).astype(np.int32), False, MESH_RGB, 1, cv2.LINE_AA,
                          shift)
            cv2.addWeighted(wire, alpha, out, 1.0 - alpha, 0.0, dst=out)
    if keypoints is not None:
        pts = np.floor(xy[np.asarray(keypoints)]).astype(np.int64)  # pixel j covers [j, j+1)
        pts = pts[((pts >= 0) & (pts < size)).all(1)]
        dots = np.zeros((size, size), np.uint8)
        dots[pts[:, 1], pts[:, 0]] = 1
        r = max(1, round(size / 256))
        dots = cv2.dilate(dots, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        out[dots.astype(bool)] = LANDMARK_RGB
    return out


def fit_label(text: str, width: int, height: int, prefix: str = "") -> str:
    """``prefix + text``, ``text`` shortened from the left (``...tail``) so that the label fits a ``width`` px tile
    whose labels :func:`common.imageio.image_grid` draws for tiles ``height`` px high."""
    scale = max(0.3, height / 400)  # image_grid's label scale

    def fits(t: str) -> bool:
        return cv2.getTextSize(prefix + t, cv2.FONT_HERSHEY_SIMPLEX, scale, 3)[0][0] + 6 <= width

    if fits(text):
        return prefix + text
    keep = len(text)
    while keep > 1 and not fits("..." + text[-keep:]):
        keep -= 1
    return prefix + "..." + text[-keep:]


def pose_label(pose: np.ndarray) -> str:
    """(3,) yaw, pitch, roll in degrees -> ``"y+12 p-3 r+1"``."""
    return "y{:+.0f} p{:+.0f} r{:+.0f}".format(*(float(a) for a in pose))


def overlay_tile(s: dict, model, config: ShowConfig, occlusion: np.ndarray | None = None) -> np.ndarray:
    """The overlay column of one ok sample: :func:`draw_overlays` of its fitted mesh (``s["params"]`` through the
    store's face ``model``), the model's keypoints, ``occlusion`` (H, W) bool and ``s["face_mask_eroded"]``, as
    selected by ``config.overlays``. Returns (config.height, config.height, 3) uint8."""
    on = set(config.overlays)
    verts = None
    if on & {"mesh", "landmarks"}:
        verts = mesh_in_image(model, np.asarray(s["params"], np.float32)[None], s["image"].shape[0])[0]
    return draw_overlays(s["image"], verts, model.triangles if "mesh" in on else None, model.uv,
                         model.keypoints if "landmarks" in on else None,
                         occlusion if "occlusion" in on else None,
                         s["face_mask_eroded"] if "mask" in on else None,
                         size=config.height, mesh_lines=config.mesh_lines, alpha=config.mesh_alpha)


def preview_rows(reader: StoreReader, indices: list[int], config: ShowConfig = ShowConfig()) -> tuple[list, list]:
    """Tiles and labels of the preview grid: per ok sample, :func:`sample_row` with the overlay column
    (:func:`overlay_tile`) after the photo; the photo is labelled ``#index source key`` and the overlay with the
    pose (:func:`pose_label`). A failed sample is its stored image alone, labelled with its failure reason;
    pending samples are left out. The ``occlusion`` array is drawn where the store has one."""
    names = ["image", "uv_gt", "uv_bl", "source", "ctr crop", "side crop", "face region"]
    if "uv_true" in reader.names:
        names.append("uv_true")
    overlay = bool(config.overlays)
    model = reader.face_model() if overlay else None
    has_occ = "occlusion" in reader.group
    h = config.height
    rows, labels = [], []
    for i in indices:
        s = reader.sample(i)
        if int(s["status"]) == FAILED:
            reason = int(s["reason"])
            why = Reason(reason).short if reason in Reason._value2member_map_ else f"reason {reason}"
            rows.append([_rgb(s["image"])])
            labels.append([fit_label(s["path"], h, h, prefix=f"#{s['index']} failed: {why} ")])
            continue
        if int(s["status"]) != OK:
            continue
        row = sample_row(s)
        row_labels = [fit_label(s["path"], h, h, prefix=f"#{s['index']} "), *names[1:len(row)]]
        if overlay:
            occ = reader.group["occlusion"][s["index"]] if has_occ else None
            row.insert(1, overlay_tile(s, model, config, occ))
            row_labels.insert(1, pose_label(s["pose"]))
        else:
            row_labels[0] = fit_label(s["path"], h, h, prefix=f"#{s['index']} {pose_label(s['pose'])} ")
        rows.append(row)
        labels.append(row_labels)
    return rows, labels


def show_samples(store: str | Path, indices: list[int], out: Path, config: ShowConfig = ShowConfig()) -> Path:
    """Write the preview grid of the given samples (:func:`preview_rows`) as a PNG."""
    r = StoreReader(store)
    bad = [i for i in indices if not -len(r) <= i < len(r)]
    if bad:
        raise IndexError(f"samples {bad} out of range for {store}, which holds {len(r)} samples")
    if not np.isin(np.mod(indices, len(r)), r.ok_indices()).any():
        raise ValueError(f"none of the samples {indices} is ok in {store}; see `uvprep info {store}`")
    rows, labels = preview_rows(r, indices, config)
    write_png(out, image_grid(rows, labels=labels, height=config.height))
    return out
