"""``uvprep info / check / show``: read a store and report on it (presentation at the edge, no logic elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.imageio import image_grid, write_png
from common.store import StoreReader, validate_store


def print_info(store: Path, console: Console | None = None) -> None:
    """Schema, layout, counts, failures by reason, storage and the creation config."""
    console = console or Console()
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


def check_store(store: Path, console: Console | None = None) -> int:
    """Validate; print the problems. Returns 0 when sound, 1 otherwise."""
    console = console or Console()
    problems = validate_store(store)  # not StoreReader: it refuses other schema versions, check reports them
    if not problems:
        console.print(f"[green]{store}: OK")
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


def show_samples(store: Path, indices: list[int], out: Path) -> Path:
    """Write the preview grid of the given samples (failed ones are shown as their image only)."""
    r = StoreReader(store)
    rows, labels = [], []
    names = ["image", "uv_gt", "uv_bl", "source", "ctr crop", "side crop", "face region"]
    if "uv_true" in r.names:
        names.append("uv_true")
    for i in indices:
        s = r.sample(i)
        if int(s["status"]) != 1:
            continue
        rows.append(sample_row(s))
        yaw = float(s["pose"][0])
        labels.append([f"#{i} yaw {yaw:+.0f}"] + names[1:])
    if not rows:
        raise ValueError(f"none of the samples {indices} is ok in {store}; see `uvprep info {store}`")
    write_png(out, image_grid(rows, labels=labels, height=192))
    return out
