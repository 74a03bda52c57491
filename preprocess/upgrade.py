"""``uvprep upgrade``: bring a store written by an older schema (version 1) up to this one, in place.

A version-1 store lacks what the trainer needs to render and cut crops without ``preprocess/``. The upgrade

1. rebuilds the face model from the recorded build config (``bfm-public`` needs its asset folders: the
   recorded ones, or ``--bfm-v1-dir`` / ``--bfm-v2-dir`` when they moved) and checks it against the recorded
   ``face_model_hash``;
2. writes the ``model/`` and ``uv_layout/`` groups (crop layout at the recorded crop config, texel mirror
   index), as a new build does;
3. renames ``face_mask`` to ``face_mask_eroded`` (same chunks and codecs, copied chunk by chunk);
4. computes ``face_region`` for every completed chunk from the stored fits: the visible face triangles of
   the mesh at the stored pose (:func:`preprocess.unwrap.projected_face_region`), one task per chunk (Dask
   as in ``uvprep build``). A version-1 store kept no segmentation mask, so occluders (hands, hair) are
   not cut out: the root attribute ``face_region_source`` says ``"upgrade: projected mesh only"``;
5. sets ``schema_version`` to 2 (and an ``upgraded`` record) in one metadata write.

Each step checks what is already there, so an interrupted upgrade is finished by running it again, and an
up-to-date store is left untouched. The build lock keeps a build and an upgrade (or two upgrades) apart.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from common.config import CropConfig
from common.store import (
    ARRAY_DOCS,
    MODEL_GROUP,
    OK,
    SCHEMA_VERSION,
    UV_LAYOUT_GROUP,
    StoreLayout,
    StoreMismatch,
    acquire_build_lock,
    array_specs,
    completed_chunks,
    create_schema_array,
    location_of,
    open_store,
    package_version,
    store_exists,
    store_location,
    validate_store,
    write_face_model,
)
from common.uvlayout import crop_layout
from common.uvtools import model_uv_fragments, texel_mirror_index
from preprocess.config import RunOptions, StageConfig, UpgradeOptions
from preprocess.executor import Runner, set_compute_threads, worker_cache
from preprocess.stages import build_face_model

FACE_REGION_SOURCE = "upgrade: projected mesh only"
"""Root attribute ``face_region_source`` of an upgraded store."""
_DONE_ATTR = "upgrade_chunks_done"  # on face_region while the upgrade runs: chunks already computed


@dataclass
class UpgradeReport:
    """What an upgrade did: the versions, one line per step, how ``face_region`` was made, problems left."""

    store: str
    from_version: int
    to_version: int
    steps: list[str] = field(default_factory=list)
    face_region_source: str | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.from_version != self.to_version


def recorded_stages(config: dict, options: UpgradeOptions) -> StageConfig:
    """The parts of the recorded build config the upgrade needs (face model and its assets, crop config)."""
    try:
        st = config["stages"]
        kind, crops = st["face_model"], CropConfig(**st["crops"])
    except (KeyError, TypeError) as e:
        raise StoreMismatch(f"the store's recorded config has no usable stages.face_model / stages.crops ({e}); "
                            f"it was not written by uvprep build: rebuild it") from None
    v1 = options.bfm_v1_dir or (Path(st["bfm_v1_dir"]) if st.get("bfm_v1_dir") else None)
    v2 = options.bfm_v2_dir or (Path(st["bfm_v2_dir"]) if st.get("bfm_v2_dir") else None)
    if kind == "bfm-public":
        gone = [f"{flag} {d}" for flag, d in (("--bfm-v1-dir", v1), ("--bfm-v2-dir", v2))
                if d is None or not d.is_dir()]
        if gone:
            raise FileNotFoundError(
                f"the store was built with face model bfm-public, whose asset folders are needed to rebuild it, but "
                f"{' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} missing; pass the folders' new places "
                f"(uvprep upgrade STORE --bfm-v1-dir DIR --bfm-v2-dir DIR; see docs/real-photos.md)")
    return StageConfig(face_model=kind, bfm_v1_dir=v1, bfm_v2_dir=v2, crops=crops)


def face_region_chunk(out: str, chunk_index: int, stages: StageConfig, threads: int | None = None,
                      cache: dict | None = None) -> int:
    """Compute and write ``face_region`` of one chunk from its stored fits (a Dask task); returns the OK count.

    OK samples get the visible face triangles of their mesh at the stored pose; the others stay False.
    """
    from common.faces.fit import mesh_in_image
    from preprocess.unwrap import projected_face_region

    if threads is not None:
        set_compute_threads(threads)
    group = open_store(out, mode="r+")
    layout = StoreLayout.from_json(group.attrs["layout"])  # not layout_of: the store is still version 1
    start, stop = layout.chunk_bounds(chunk_index)
    params = group["params"][start:stop]
    ok = (group["status"][start:stop] == OK) & np.isfinite(params).all(1)
    region = np.zeros((stop - start, layout.image_size, layout.image_size), bool)
    if ok.any():
        model = _model(stages, cache if cache is not None else worker_cache())
        s = layout.image_size
        region[ok] = projected_face_region(mesh_in_image(model, params[ok], s), model, s)
    group["face_region"][start:stop] = region
    return int(ok.sum())


def _model(stages: StageConfig, cache: dict | None):
    key = ("upgrade-face-model", json.dumps(dataclasses.asdict(stages), sort_keys=True, default=str))
    if cache is None:
        return build_face_model(stages)
    if key not in cache:
        cache[key] = build_face_model(stages)
    return cache[key]


# ------------------------------------------------------------------- schema helpers (only the upgrade uses them)
def add_sample_array(group: zarr.Group, layout: StoreLayout, name: str) -> zarr.Array:
    """Create the schema's sample-aligned array ``name`` (all fill values) in an existing store, replacing
    one of that name (an interrupted earlier attempt). For upgrading a store to a schema that added it."""
    if name not in array_specs(layout):
        raise KeyError(f"{name} is not an array of store schema version {SCHEMA_VERSION}")
    if name in group:
        del group[name]
    return create_schema_array(group, layout, name)


def rename_array(group: zarr.Group, old: str, new: str) -> None:
    """Rename an array (zarr v3 has no rename): create ``new`` with the same shape, dtype, chunks, codecs and
    fill value, copy it chunk by chunk along the first axis, then delete ``old``. A ``new`` left by an
    interrupted rename is replaced; nothing happens when ``old`` is gone and ``new`` exists (already renamed)."""
    if old not in group:
        if new in group:
            return
        raise KeyError(f"{location_of(group)}: neither {old} nor {new} exists")
    a = group[old]
    if new in group:
        del group[new]
    b = group.create_array(new, shape=a.shape, dtype=a.dtype, chunks=a.chunks, fill_value=a.fill_value,
                           compressors=a.compressors, filters=a.filters, serializer=a.serializer,
                           attributes={**dict(a.attrs), "description": ARRAY_DOCS.get(new, a.attrs.get("description"))})
    step = a.chunks[0]
    for start in range(0, a.shape[0], step):
        b[start:start + step] = a[start:start + step]
    del group[old]


def finish_upgrade(group: zarr.Group, from_version: int, attrs: Mapping) -> None:
    """Last step of a schema upgrade: set ``attrs`` (JSON-able), an ``upgraded`` record (from, to, when, by
    which package version) and ``schema_version`` in one metadata write."""
    record = {"from": int(from_version), "to": SCHEMA_VERSION, "package_version": package_version(),
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    group.attrs.update({**json.loads(json.dumps(dict(attrs))), "upgraded": record, "schema_version": SCHEMA_VERSION})


def upgrade_store(options: UpgradeOptions) -> UpgradeReport:
    """Upgrade ``options.store`` to this schema version in place; returns the report.

    Raises FileNotFoundError (no store, or ``bfm-public`` assets gone), StoreLocked (a build or another
    upgrade holds the store), StoreMismatch (a newer or unknown schema, or a face model that no longer
    matches the recorded hash).
    """
    t0 = time.perf_counter()
    out = store_location(options.store)
    if not store_exists(out):
        raise FileNotFoundError(f"no store at {out} (expected a Zarr store written by uvprep build)")
    with acquire_build_lock(out, owner="uvprep upgrade"):
        group = open_store(out, mode="r+")
        version = group.attrs.get("schema_version")
        report = UpgradeReport(store=out, from_version=version, to_version=SCHEMA_VERSION)
        if version == SCHEMA_VERSION:
            report.steps.append(f"already at schema version {SCHEMA_VERSION}: nothing to do")
            report.face_region_source = group.attrs.get("face_region_source")
        elif version == 1:
            _upgrade_v1(group, options, report)
        elif isinstance(version, int) and version > SCHEMA_VERSION:
            raise StoreMismatch(f"{out} has schema version {version}, newer than this code's {SCHEMA_VERSION}; "
                                f"update uvtex (a store is never downgraded)")
        else:
            raise StoreMismatch(f"{out} has schema version {version!r}; uvprep upgrade knows versions 1 to "
                                f"{SCHEMA_VERSION}: rebuild it (uvprep build ... --overwrite)")
        report.problems = validate_store(group)
    report.seconds = time.perf_counter() - t0
    return report


def _upgrade_v1(group: zarr.Group, options: UpgradeOptions, report: UpgradeReport) -> None:
    attrs = dict(group.attrs)
    layout = StoreLayout.from_json(attrs["layout"])
    stages = recorded_stages(attrs["config"], options)
    model = build_face_model(stages)
    fp, want = model.fingerprint(), attrs.get("face_model_hash")
    if fp != want:
        raise StoreMismatch(f"the face model rebuilt from the recorded config ({model.name}, hash {fp}) is not the "
                            f"one the store was built with (face_model_hash {want}): the assets changed? Point "
                            f"--bfm-v1-dir / --bfm-v2-dir at the original files, or rebuild the store")
    u = layout.uv_size
    frags = model_uv_fragments(model, u)
    crops = crop_layout(model, u, stages.crops, frags)
    if (crops.ctr_region.shape, crops.sd_region.shape) != (layout.ctr_shape, layout.sd_shape):
        raise StoreMismatch(f"the crop layout rebuilt from the recorded config has crops {crops.ctr_region.shape} / "
                            f"{crops.sd_region.shape}, the store {layout.ctr_shape} / {layout.sd_shape}; rebuild it")
    done = all(g in group and group[g].attrs.get(k) == fp for g, k in ((MODEL_GROUP, "fingerprint"),
                                                                       (UV_LAYOUT_GROUP, "face_model")))
    if not done:
        write_face_model(group, layout, model, crops, texel_mirror_index(model, u, frags), stages.crops)
    report.steps.append(f"{'kept' if done else 'wrote'} model/ ({model.name}, {model.n_vertices} vertices, "
                        f"hash {fp}) and uv_layout/ (U = {u}, crops {layout.ctr_shape} / {layout.sd_shape})")
    renamed = "face_mask" in group
    rename_array(group, "face_mask", "face_mask_eroded")
    report.steps.append("renamed face_mask -> face_mask_eroded" if renamed else "face_mask_eroded already there")
    n_ok = _face_regions(group, layout, stages, options)
    report.steps.append(f"face_region: projected the fitted mesh of {n_ok} OK samples; a version-1 store kept no "
                        f"segmentation mask, so occluders (hands, hair) are inside the region (face_region_source = "
                        f"{FACE_REGION_SOURCE!r}; rebuild with --overwrite for the build's own face_region)")
    finish_upgrade(group, 1, {"face_region_source": FACE_REGION_SOURCE})
    report.face_region_source = FACE_REGION_SOURCE
    report.steps.append(f"schema_version 1 -> {SCHEMA_VERSION}")


def _face_regions(group: zarr.Group, layout: StoreLayout, stages: StageConfig, options: UpgradeOptions) -> int:
    """Fill ``face_region`` for the completed chunks, one task per chunk; resumes after an interruption."""
    from preprocess.progress import BuildProgress

    if "face_region" not in group or _DONE_ATTR not in group["face_region"].attrs:
        add_sample_array(group, layout, "face_region").attrs[_DONE_ATTR] = []
    region = group["face_region"]
    finished = set(region.attrs[_DONE_ATTR])
    todo = [(str(options.store), int(c), stages) for c in np.flatnonzero(completed_chunks(group)) if c not in finished]
    run = RunOptions(out=str(options.store), workers=options.workers, threads=options.threads,
                     scheduler=options.scheduler, progress=options.progress)
    runner = Runner(run)
    n_ok = 0
    try:
        with BuildProgress(enabled=options.progress) as progress:
            task = progress.add("face_region", sum(np.subtract(*layout.chunk_bounds(c)[::-1]) for _, c, _ in todo))
            for args, res in runner.map(face_region_chunk, todo, "face-region"):
                if isinstance(res, Exception):
                    raise RuntimeError(f"face_region of chunk {args[1]} failed: {res}; run the upgrade again to "
                                       f"finish it (completed chunks are kept)") from res
                n_ok += res
                finished.add(args[1])
                region.attrs[_DONE_ATTR] = sorted(finished)  # one writer: this process
                progress.advance(task, np.subtract(*layout.chunk_bounds(args[1])[::-1]))
    finally:
        runner.close()
    del region.attrs[_DONE_ATTR]
    return n_ok


def run_upgrade(options: UpgradeOptions, console=None) -> int:
    """``uvprep upgrade``: upgrade and print what was done; exit code 0 on success, 1 if the result does not
    validate, 2 when refused."""
    from rich.console import Console

    from common.store import StoreLocked

    console = console or Console()
    try:
        report = upgrade_store(options)
    except (StoreMismatch, StoreLocked, FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        console.print(f"[red]uvprep upgrade: {e}")
        return 2
    head = (f"{report.store}: schema version {report.from_version} -> {report.to_version}" if report.changed
            else f"{report.store}: schema version {report.to_version}")
    console.print(head, highlight=False)
    for step in report.steps:
        console.print(f"  - {step}", highlight=False)
    if report.problems:
        for p in report.problems:
            console.print(f"[red]  ! {p}")
        return 1
    console.print(f"[green]valid ({report.seconds:.1f} s)")
    return 0
