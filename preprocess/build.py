"""``uvprep build``: a photo collection -> a resumable Zarr training store, in parallel with Dask.

Plan of a build:

1. enumerate the source once into a sorted manifest (stored: sample ``i`` is always the same image);
2. create the store, or reopen it to resume (refused if config, face model, texture model or manifest differ);
3. texture model: the face model's own basis, a saved basis file, or -- the default -- a masked PCA basis
   learned from the UV_gt of ``pca_samples`` samples spread over the manifest (a deterministic pre-pass);
   it is written into the store before any chunk, so a resumed build reuses it;
4. one task per chunk of samples that is not yet complete: decode -> fit -> UV_gt -> Eq. 8 -> Eq. 9 -> crops,
   written to that chunk's own region (no two tasks share a Zarr chunk: no locks, no races); the chunk's
   completion record is written last, so a build killed at any point resumes to the same arrays.

Workers receive only the store path and the frozen config; they open the store themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.store import (
    FAILED,
    OK,
    Reason,
    StoreLayout,
    StoreMismatch,
    StoreReader,
    acquire_build_lock,
    completed_chunks,
    create_store,
    creation_interrupted,
    mark_pending,
    open_for_build,
    open_store,
    read_texture_basis,
    repair_for_resume,
    start_generation,
    verify_chunks,
    write_chunk,
    write_texture_basis,
)
from common.texbasis import UVTextureBasis
from common.uvlayout import crop_layout
from common.uvtools import model_uv_fragments, texel_mirror_index
from preprocess import geocache
from preprocess.config import BuildConfig, RunOptions, StageConfig
from preprocess.executor import BuildProfile, Runner, set_compute_threads, worker_cache
from preprocess.sources import ManifestEntry
from preprocess.stages import (
    StageContext,
    Timer,
    build_face_model,
    finish_stages,
    merge_geometry,
    run_geometry,
    run_stages,
)
from preprocess.texture import downsample_maps, learn_masked_pca

FACE_REGION_SEGMENTED = "build: projected mesh & the source's segmentation"
"""Root attribute ``face_region_source`` of a store whose source knows the face pixels (synthetic)."""
FACE_REGION_PROJECTED = "build: projected mesh only"
"""... of a store whose source has no segmentation, built without occluder rejection (``--no-occlusion``)."""
FACE_REGION_OCCLUSION = "build: projected mesh minus detected occluders"
"""... of a store whose source has no segmentation, with occluders rejected (:mod:`preprocess.occlusion`)."""
FACE_REGION_SEGMENTED_OCCLUSION = "build: projected mesh & the source's segmentation, minus detected occluders"
"""... of a synthetic store built with ``--occlusion`` forced on (for measuring the detector)."""


@dataclass
class BuildSummary:
    """What a build did: sample counts by outcome, time per stage (summed over tasks), chunks."""

    n_samples: int
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    skipped_chunks: int = 0
    done_chunks: int = 0
    failed_chunks: dict[int, str] = field(default_factory=dict)
    stage_seconds: Counter = field(default_factory=Counter)
    wall_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    profile: BuildProfile = field(default_factory=lambda: BuildProfile())
    """Where the time went: this process's phases and the tasks' CPU (benchmarks/bench_scaling.py models it)."""

    @property
    def complete(self) -> bool:
        return not self.failed_chunks


@dataclass(frozen=True)
class ChunkReport:
    chunk: int
    n: int
    ok: int
    failed: dict[str, int]
    seconds: dict[str, float]
    errors: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- config
def config_record(cfg: BuildConfig) -> dict:
    """The JSON-able config stored in the store (paths as strings, the source with its kind)."""
    def clean(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    recorded = {f.name for f in dataclasses.fields(cfg.source) if f.metadata.get("recorded", True)}
    src = {k: v for k, v in dataclasses.asdict(cfg.source).items() if k in recorded}  # read limits are not
    src["kind"] = cfg.source.kind
    return clean({"source": src, "stages": dataclasses.asdict(cfg.stages), "chunk": cfg.chunk,
                  "compressor": cfg.compressor})


def _texture_identity(cfg: StageConfig, model) -> str:
    tm = cfg.texture_model
    if tm == "pca":
        return "pca:" + json.dumps({"pca": dataclasses.asdict(cfg.pca), "samples": cfg.pca_samples}, sort_keys=True)
    if tm == "model":
        return f"model:{model.fingerprint()}"
    return f"file:{UVTextureBasis.load(tm).fingerprint()}"


def _n_tex(cfg: StageConfig, model) -> int:
    tm = cfg.texture_model
    if tm == "pca":
        return cfg.pca.n_components
    if tm == "model":
        if model.tex_basis is None:
            raise ValueError(f"--texture-model model: face model {model.name!r} has no texture basis; use pca")
        return model.n_tex
    return UVTextureBasis.load(tm).n_components


class _ManifestView:
    """Read-only manifest rows [start, stop) read from the store (tasks never pickle the whole manifest)."""

    def __init__(self, group, start: int, stop: int):
        self.start = start
        self.paths = group["manifest_path"][start:stop]
        self.sizes = group["manifest_size"][start:stop]
        self.mtimes = group["manifest_mtime"][start:stop]

    def __getitem__(self, i: int) -> ManifestEntry:
        k = int(i) - self.start
        return ManifestEntry(str(self.paths[k]), int(self.sizes[k]), float(self.mtimes[k]))


class LazyInputs:
    """The samples of one task, read and decoded one at a time while they are iterated.

    A chunk used to decode all of its photos before fitting any of them: 64 photos of 20 MP held ~4 GB at once.
    Iterating this yields each :class:`preprocess.sources.SampleInput` in turn (``source.iter_many``: a zip is opened
    once) and drops it before decoding the next, so with :func:`preprocess.stages.run_geometry` (which keeps only the
    working crop) a task's peak is its output plus one full-size photo. ``records`` holds, after an iteration, every
    sample without its photo (key, failure, truth, parameters) for what runs after the fit.
    """

    def __init__(self, source, indices, manifest):
        self.source = source
        self.indices = [int(i) for i in indices]
        self.manifest = manifest
        self.records: list = []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        self.records = []
        with contextlib.closing(self.source.iter_many(self.indices, self.manifest)) as samples:
            for sample in samples:
                self.records.append(sample.without_image())
                yield sample
                del sample  # before the next photo is decoded


def _load_inputs(out: str, cfg: BuildConfig, indices: np.ndarray) -> LazyInputs:
    group = open_store(out)
    view = _ManifestView(group, int(indices.min()), int(indices.max()) + 1)
    return LazyInputs(cfg.source, indices, view)


def _basis_from_store(out: str) -> UVTextureBasis:
    basis = StoreReader(out).texture_basis()
    if basis is None:
        raise RuntimeError(f"{out} has no texture basis yet; the build writes it before any chunk")
    return basis


# -------------------------------------------------------------------------------------------- tasks
def _context(out: str | None, cfg: BuildConfig, with_basis: bool, cache: dict | None,
             model=None) -> StageContext:
    """A StageContext for this build, reused from ``cache`` when it matches.

    The cache holds the context without a basis (face model, fitter, layout caches: what the build config alone
    decides, keyed by it) and the one with the texture basis of store ``out``, which shares everything but the basis
    with the first: the pre-pass and the chunks of one build set the model up once per worker, not once per kind of
    task (0.7 s procedural, 3 s BFM + 3DDFA each). model: the build's face model when the caller has it (an eager
    build's driver: 1.5 s of BFM lifting not done twice).
    """
    record = json.dumps(config_record(cfg), sort_keys=True)
    key = (out if with_basis else None, with_basis, record)
    if cache is not None and key in cache:
        return cache[key]
    base_key = (None, False, record)
    base = cache.get(base_key) if cache is not None else None
    if base is None:
        base = StageContext.build(cfg.stages, model=model)
    ctx = dataclasses.replace(base, basis=_basis_from_store(out)) if with_basis else base
    if cache is not None:
        for old in [k for k in cache if k[2] != record or (k[1] and k[0] != out)]:  # one config, one store
            del cache[old]
        cache[base_key] = base
        cache[key] = ctx
    return ctx


def process_chunk(out: str, chunk_index: int, cfg: BuildConfig, generation: str | None = None,
                  threads: int | None = None, cache: dict | None = None) -> ChunkReport:
    """Build one chunk of the store end to end and write it (the unit of work of a Dask task).

    generation: the build's token (:func:`common.store.start_generation`); the write is refused
    (:class:`common.store.StaleWriter`) once a newer build owns the store.

    cache: where reusable setup is kept between calls (the eager runner passes its own; on Dask the worker's).
    """
    from common.store import layout_of

    if threads is not None:
        set_compute_threads(threads)
    t0 = time.perf_counter()
    layout = layout_of(open_store(out))
    start, stop = layout.chunk_bounds(chunk_index)
    timer = Timer()
    ctx = _context(out, cfg, True, cache if cache is not None else worker_cache())
    t0 = timer.add("setup", t0)
    kept_rows, kept = np.zeros(0, np.int64), {}
    if not layout.has_truth:  # the samples the pre-pass fitted and unwrapped already (preprocess.geocache)
        kept_rows, kept = geocache.read_rows(out, geocache.config_token(config_record(cfg)), start, stop)
        t0 = timer.add("reuse", t0)
    if kept_rows.size:
        fresh_rows = np.setdiff1d(np.arange(start, stop), kept_rows)
        view = _ManifestView(open_store(out), start, stop)
        inputs = _load_inputs(out, cfg, fresh_rows) if fresh_rows.size else []
        geo = merge_geometry(stop - start, ctx, fresh_rows - start, run_geometry(inputs, ctx, timer), kept_rows - start,
                             kept, [view[i].path for i in kept_rows])
        arrays, errors = finish_stages(geo, ctx, timer)
    else:
        inputs = _load_inputs(out, cfg, np.arange(start, stop))
        arrays, errors = run_stages(inputs, ctx, timer)  # decodes the samples one at a time
    if layout.has_truth:
        u = layout.uv_size
        arrays["uv_true"] = np.stack([s.truth["uv_true"] if s.truth is not None else np.zeros((u, u, 3), np.uint8)
                                      for s in inputs.records])
    t0 = time.perf_counter()
    write_chunk(out, chunk_index, arrays, generation=generation)
    timer.add("write", t0)
    status, reason = arrays["status"], arrays["reason"]
    failed = Counter(Reason(int(r)).short for r in reason[status == FAILED])
    return ChunkReport(chunk_index, stop - start, int((status == OK).sum()), dict(failed), dict(timer.seconds),
                       tuple(errors[:5]))


def prepass_batch(out: str, indices: np.ndarray, cfg: BuildConfig, fit_size: int,
                  threads: int | None = None, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """UV_gt of some samples, downsampled for the PCA: (n, fs*fs*3) float32 values and observed flags."""
    if threads is not None:
        set_compute_threads(threads)
    inputs = _load_inputs(out, cfg, np.asarray(indices))
    geo = run_geometry(inputs, _context(out, cfg, False, cache if cache is not None else worker_cache()), Timer())
    geocache.write_rows(out, geocache.config_token(config_record(cfg)), np.asarray(indices), geo)  # for the chunks
    keep = geo.reason == 0
    if not keep.any():  # no usable sample in this batch: no rows (other batches may have enough)
        return np.zeros((0, fit_size * fit_size * 3), np.float32), np.zeros((0, fit_size * fit_size * 3), bool)
    return downsample_maps(geo.uv_gt[keep], geo.uv_gt_mask[keep], fit_size)


# ------------------------------------------------------------------------------------------ running
def _learn_basis(out: str, cfg: BuildConfig, model, runner: Runner, n: int, progress,
                 warnings: list[str] | None = None, reuse: bool = True) -> UVTextureBasis:
    stages = cfg.stages
    if stages.texture_model == "model":
        return UVTextureBasis.from_face_model(model, stages.uvgt.uv_size)
    if stages.texture_model != "pca":
        return UVTextureBasis.load(stages.texture_model)
    fs = min(stages.pca.fit_size or stages.uvgt.uv_size, stages.uvgt.uv_size)  # as learn_masked_pca: never up
    idx = np.unique(np.linspace(0, n - 1, min(stages.pca_samples, n)).round().astype(np.int64))
    if reuse and cfg.source.kind != "synthetic":  # the chunks read these samples' fits back (preprocess.geocache)
        geocache.create(out, idx, geocache.config_token(config_record(cfg)), stages.fit.image_size,
                        stages.uvgt.uv_size, stages.occlusion is not None)
    # the pre-pass ends in a barrier (the PCA needs every map): batches of a chunk each left all but a few workers idle
    # on a large cluster (1024 maps = 16 tasks) and one worker finishing alone on a small one; with several batches per
    # worker thread they finish together. A sample's UV_gt does not depend on the batch it is fitted in (tested).
    size = max(1, min(cfg.chunk, -(-len(idx) // (4 * runner.slots()))))
    batches = [(out, idx[i:i + size], cfg, fs) for i in range(0, len(idx), size)]
    results = {}
    task = progress.add("learning the texture basis (pre-pass)", len(idx))
    with runner.profile.phase("prepass"):
        for args, res in runner.map(prepass_batch, batches, "prepass"):
            if isinstance(res, Exception):
                raise RuntimeError(f"texture-basis pre-pass failed on samples {args[1][0]}..{args[1][-1]}: "
                                   f"{res}") from res
            results[int(args[1][0])] = res
            progress.advance(task, len(args[1]))
    with runner.profile.phase("pca"):
        return _fit_basis(results, cfg, model, fs, len(idx), warnings)


def _fit_basis(results: dict, cfg: BuildConfig, model, fs: int, n_asked: int,
               warnings: list[str] | None) -> UVTextureBasis:
    """The masked-PCA basis from the pre-pass batches ``results`` (first sample index -> (values, observed))."""
    stages = cfg.stages
    # manifest order, not completion order: the randomised SVD of the PCA depends on the row order
    x = np.concatenate([results[k][0] for k in sorted(results)])
    m = np.concatenate([results[k][1] for k in sorted(results)])
    if len(x) < 2:
        raise RuntimeError(f"only {len(x)} of the {n_asked} pre-pass samples could be fitted; cannot learn a PCA "
                           f"texture basis (use --texture-model model or a basis file)")
    valid_full = model_uv_fragments(model, stages.uvgt.uv_size).tri_id[0].numpy() >= 0
    import cv2

    valid_fs = cv2.resize(valid_full.astype(np.float32), (fs, fs), interpolation=cv2.INTER_AREA) > 0.5
    pca_cfg = dataclasses.replace(stages.pca, fit_size=None)
    basis = learn_masked_pca(x.reshape(-1, fs, fs, 3), m.reshape(-1, fs, fs, 3)[..., 0], valid_fs, pca_cfg,
                             mirror_index=texel_mirror_index(model, fs), name=f"pca:{len(x)}", out_valid=valid_full)
    k = stages.pca.n_components
    if basis.n_components < k:  # fewer maps than components: pad with zero components (their coefficients stay 0)
        if warnings is not None:
            warnings.append(f"the texture basis has {basis.n_components} usable components of the {k} requested "
                            f"(--n-tex): {len(x)} UV maps are too few; learn it from more photos (--pca-samples: "
                            f"at least {k + 1}, about {10 * k} for a stable basis) or lower --n-tex")
        pad = np.zeros((*basis.basis.shape[:3], k - basis.n_components), np.float32)
        basis = UVTextureBasis(basis.mean, np.concatenate([basis.basis, pad], 3), basis.valid, basis.name)
    return basis


def _has_chunk_records(out: str) -> bool:
    """False for an existing store created before chunk records (resumed without them); True otherwise."""
    from common.store import layout_of

    try:
        return layout_of(open_store(out)).chunk_records
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return True


def build_store(cfg: BuildConfig, run: RunOptions) -> BuildSummary:
    """Run (or resume) a build; returns the summary. Raises on config mismatch or a held lock."""
    from preprocess.progress import BuildProgress

    t_start, c_start = time.perf_counter(), time.process_time()
    manifest = cfg.source.manifest()
    n = len(manifest)
    if n == 0:
        raise ValueError(f"source {cfg.source.kind!r} has no samples (empty folder or zip?)")
    model = build_face_model(cfg.stages)
    u = cfg.stages.uvgt.uv_size
    frags = model_uv_fragments(model, u)
    crops = crop_layout(model, u, cfg.stages.crops, frags)
    described = {"face_model": model, "crop_layout": crops, "mirror_index": texel_mirror_index(model, u, frags),
                 "crop_config": cfg.stages.crops}  # the store's model/ and uv_layout/ groups
    layout = StoreLayout(n_samples=n, image_size=cfg.stages.fit.image_size, uv_size=cfg.stages.uvgt.uv_size,
                         ctr_shape=crops.ctr_region.shape, sd_shape=crops.sd_region.shape,
                         n_tex=_n_tex(cfg.stages, model), chunk=cfg.chunk, has_truth=cfg.source.kind == "synthetic",
                         has_occlusion=cfg.stages.occlusion is not None, chunk_records=True,
                         compressor=cfg.compressor)
    attrs = {"config": config_record(cfg), "face_model_hash": model.fingerprint(),
             "texture_basis_hash": _texture_identity(cfg.stages, model), "face_model": model.name,
             "source_kind": cfg.source.kind,
             "face_region_source": _face_region_source(cfg)}
    summary = BuildSummary(n_samples=n)
    lock = acquire_build_lock(run.out) if run.lock else contextlib.nullcontext()
    with lock, BuildProgress(enabled=run.progress) as progress:
        overwrite = run.overwrite
        try:
            if creation_interrupted(run.out):  # killed while being created: it holds no data, create it again
                overwrite = True
                raise FileNotFoundError(run.out)
            if not _has_chunk_records(run.out):  # created before chunk records: resume it as it is
                layout = dataclasses.replace(layout, chunk_records=False)
            open_for_build(run.out, layout, attrs, manifest, **described)
            create = False
        except FileNotFoundError:
            create = True
        except StoreMismatch:
            if not run.overwrite:
                raise
            create = True
        if create:
            layout = dataclasses.replace(layout, chunk_records=True)
            create_store(run.out, layout, attrs, manifest, overwrite=overwrite, **described)
        else:  # redo what is not provably complete (missing arrays, damaged chunks with --verify)
            summary.errors.extend(repair_for_resume(run.out, verify=run.verify))
        prof = summary.profile
        prof.phase_wall["setup"] += time.perf_counter() - t_start
        prof.phase_cpu["setup"] += time.process_time() - c_start
        with prof.phase("cluster"):
            runner = Runner(run, prof)
        if runner.client is None:  # eager: the tasks run here, with the face model this build has loaded already
            _context(None, cfg, False, runner.cache, model)
        try:
            if read_texture_basis(run.out) is None:
                basis = _learn_basis(run.out, cfg, model, runner, n, progress, summary.errors, run.reuse_prepass)
                with prof.phase("pca"):
                    write_texture_basis(run.out, basis.mean, basis.basis, basis.valid, basis.name,
                                        basis.fingerprint())
            done = completed_chunks(run.out)
            summary.skipped_chunks = int(done.sum())
            # a new generation before any task of this run writes: tasks of an earlier, dead client are fenced off
            # (a complete store is left untouched, not even its metadata)
            generation = start_generation(run.out) if not done.all() else None
            todo = [(run.out, c, cfg, generation) for c in np.flatnonzero(~done)]
            task = progress.add("building", sum(layout.chunk_bounds(c)[1] - layout.chunk_bounds(c)[0]
                                                for _, c, _, _ in todo))
            with prof.phase("chunks"):
                for args, rep in runner.map(process_chunk, todo, "chunk"):
                    _record(summary, args[1], rep)
                    progress.advance(task, rep.n if isinstance(rep, ChunkReport) else
                                     np.subtract(*layout.chunk_bounds(args[1])[::-1]))
            written = [c for _, c, _, _ in todo if int(c) not in summary.failed_chunks]
            with prof.phase("recheck"):
                _recheck_written(run.out, cfg, layout, generation, written, runner, summary, progress)
            if summary.complete and completed_chunks(run.out).all():  # a resumed build no longer needs them
                geocache.drop(run.out)
        finally:
            with prof.phase("close"):
                runner.close()
        summary.wall_seconds = time.perf_counter() - t_start
    return summary


def check_chunk(out: str, chunk_index: int, threads: int | None = None, cache: dict | None = None) -> str | None:
    """Re-read one chunk written by this build: what is wrong with it, or None (a Dask task)."""
    if open_store(out)["chunk_done"][chunk_index] != 1:
        return "marked pending again by a writer of an earlier build"
    return verify_chunks(out, [chunk_index]).get(chunk_index)


RECHECK_ROUNDS = 3


def _recheck_written(out: str, cfg: BuildConfig, layout: StoreLayout, generation: str | None, written: list,
                     runner: Runner, summary: BuildSummary, progress) -> None:
    """Re-read the chunks this run wrote and rewrite those that changed since (about 0.5 % of a build's time).

    Fencing refuses the writes of an earlier build's tasks (a killed client's, still running on a shared cluster)
    from the moment a newer build owns the store, but a task that passed its generation check just before can
    still put its data out after ours: the check and the write are not one atomic step. Such a chunk no longer
    matches its record (or was marked pending by that writer); it is rewritten, up to ``RECHECK_ROUNDS`` times,
    then reported as failed. A write that lands after this check is left to ``uvprep check --deep`` / ``--verify``.
    """
    for round_ in range(RECHECK_ROUNDS + 1):
        if not written:
            return
        size = {c: np.subtract(*layout.chunk_bounds(c)[::-1]) for c in written}
        task = progress.add("checking what was written", sum(size.values()))
        bad = {}
        for args, why in runner.map(check_chunk, [(out, c) for c in written], "check"):
            if why is not None:
                bad[int(args[1])] = why if isinstance(why, str) else f"unreadable ({type(why).__name__}: {why})"
            progress.advance(task, size[args[1]])
        if not bad or round_ == RECHECK_ROUNDS:
            summary.failed_chunks.update({c: f"changed after it was written: {why}" for c, why in bad.items()})
            return
        mark_pending(out, bad)
        summary.errors.extend(f"chunk {c}: {why} after this build wrote it (a late write of an earlier, killed "
                              f"build?): rewritten" for c, why in sorted(bad.items()))
        written = []
        for args, rep in runner.map(process_chunk, [(out, c, cfg, generation) for c in sorted(bad)], "chunk"):
            if isinstance(rep, Exception):
                summary.failed_chunks[int(args[1])] = f"{type(rep).__name__}: {rep}"
            else:
                written.append(int(args[1]))


def _face_region_source(cfg: BuildConfig) -> str:
    segmented, occlusion = cfg.source.kind == "synthetic", cfg.stages.occlusion is not None
    if segmented:
        return FACE_REGION_SEGMENTED_OCCLUSION if occlusion else FACE_REGION_SEGMENTED
    return FACE_REGION_OCCLUSION if occlusion else FACE_REGION_PROJECTED


def _record(summary: BuildSummary, chunk: int, rep) -> None:
    if isinstance(rep, Exception):
        summary.failed_chunks[int(chunk)] = f"{type(rep).__name__}: {rep}"
        return
    summary.done_chunks += 1
    summary.ok += rep.ok
    summary.failed.update(rep.failed)
    summary.stage_seconds.update(rep.seconds)
    summary.errors.extend(rep.errors)
