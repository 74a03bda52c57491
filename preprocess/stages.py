"""The per-sample stage chain of ``uvprep build``, as pure functions over a batch of decoded samples.

decode (the source) -> crop/align + shape fit (:mod:`common.faces.fit`) -> UV_gt under the eroded face mask
(:mod:`preprocess.unwrap`) -> texture fit, Eq. 8 (:mod:`preprocess.texture`) -> symmetric fill + Poisson
blend, Eq. 9 (:mod:`preprocess.blend`) -> partial crops (:mod:`preprocess.crops`).

:func:`run_stages` turns a list of :class:`preprocess.sources.SampleInput` into the arrays of one store
chunk. A sample that fails at any stage gets ``status = FAILED`` and a reason code; the others go on.
The samples may also come as a sized iterable that decodes each when it is asked for
(:class:`preprocess.build.LazyInputs`): the fit keeps only the working crop of each photo and no stage keeps a
reference to a decoded photo, so a chunk's peak memory is its output plus one full-size photo.
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from common.facemodel import FaceModel
from common.faces.fit import ShapeFitter
from common.imageio import to_uint8
from common.render import Fragments
from common.store import FAILED, OK, Reason
from common.texbasis import UVTextureBasis
from common.uvlayout import CropLayout, crop_layout
from common.uvtools import region_uv_mask, texel_mirror_index
from preprocess.blend import blend_uv, relit_shadings
from preprocess.config import StageConfig
from preprocess.crops import cut_partial_crops
from preprocess.occlusion import occluders_from_fit, part_labels
from preprocess.shading import uv_normals
from preprocess.texture import match_greyscale, ridge_texture_fit
from preprocess.unwrap import UVLayoutCache, layout_cache, rasterize_fitted, uv_gt_from_images

NORMALS_BLOCK = 16
"""Samples whose UV normals (:func:`preprocess.shading.uv_normals`) and relit-fill lighting fits
(:func:`preprocess.blend.relit_shadings`) are computed in one call: the per-call setup and the fit's iterations are
shared, the memory stays at 2 x 16 x U^2 x 3 float32 (25 MB at U = 256)."""


def build_face_model(cfg: StageConfig) -> FaceModel:
    """The face model named by the config (deterministic: every worker builds the same one)."""
    if cfg.face_model == "procedural":
        from common.procedural import build_procedural_model

        return build_procedural_model()
    if cfg.face_model == "bfm-public":
        if cfg.bfm_v1_dir is None or cfg.bfm_v2_dir is None:
            raise ValueError("face model 'bfm-public' needs --bfm-v1-dir and --bfm-v2-dir (3DDFA / 3DDFA_V2 asset "
                             "folders; see docs/real-photos.md)")
        from common.loaders import load_tddfa_dense_public

        return load_tddfa_dense_public(cfg.bfm_v1_dir, cfg.bfm_v2_dir)
    raise ValueError(f"unknown face model {cfg.face_model!r}; expected 'procedural' or 'bfm-public'")


@dataclass(eq=False)
class StageContext:
    """What a worker builds once per task: model, fitter, per-layout caches, crop layout, texture basis."""

    config: StageConfig
    model: FaceModel
    fitter: ShapeFitter
    uv_cache: UVLayoutCache
    crop_layout: CropLayout
    mirror_index: np.ndarray
    basis: UVTextureBasis | None = None
    occlusion_labels: np.ndarray | None = None  # (P + 1, V) bool, preprocess.occlusion.part_labels when on

    @classmethod
    def build(cls, config: StageConfig, basis: UVTextureBasis | None = None,
              model: FaceModel | None = None) -> StageContext:
        model = build_face_model(config) if model is None else model
        u = config.uvgt.uv_size
        cache = layout_cache(model, config.uvgt)
        return cls(config=config, model=model, fitter=ShapeFitter(model, config.fit), uv_cache=cache,
                   crop_layout=crop_layout(model, u, config.crops, cache.uv_frags),
                   mirror_index=texel_mirror_index(model, u, cache.uv_frags), basis=basis,
                   occlusion_labels=None if config.occlusion is None else part_labels(model, config.occlusion))


class Timer:
    """Accumulates wall time per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - t0
        return now


@dataclass(eq=False)
class GeometryResult:
    """Output of the fit + UV_gt stages for n samples (failed samples keep zeros and a reason)."""

    reason: np.ndarray  # (n,) uint8
    image: np.ndarray  # (n, S, S, 3) uint8
    face_region: np.ndarray  # (n, S, S) bool: visible face triangles (∩ the segmentation when known)
    face_mask_eroded: np.ndarray  # (n, S, S) bool: face_region eroded, the mask UV_gt was read under
    params: np.ndarray  # (n, 62) float32 (NaN when failed)
    pose: np.ndarray  # (n, 3) float32
    uv_gt: np.ndarray  # (n, U, U, 3) float32 in [0, 1]
    uv_gt_mask: np.ndarray  # (n, U, U) bool
    errors: list[str] = field(default_factory=list)
    occlusion: np.ndarray | None = None  # (n, S, S) bool: pixels of the eroded mesh mask rejected as occluders
    keys: list[str] = field(default_factory=list)  # (n,) the samples' keys, for error messages of later stages


def run_geometry(inputs, ctx: StageContext, timer: Timer) -> GeometryResult:
    """Fit every decoded sample, then unwrap UV_gt for the fitted ones in one batch.

    inputs: a list of :class:`preprocess.sources.SampleInput`, or any sized iterable of them (iterated once; a lazy
    one decodes each photo when it is asked for, and this keeps none of them: only its working crop, so the peak
    is one full-size photo). The time spent waiting for the next sample is the ``decode`` stage.
    """
    cfg = ctx.config
    n, s, u = len(inputs), cfg.fit.image_size, cfg.uvgt.uv_size
    out = GeometryResult(reason=np.zeros(n, np.uint8), image=np.zeros((n, s, s, 3), np.uint8),
                         face_region=np.zeros((n, s, s), bool), face_mask_eroded=np.zeros((n, s, s), bool),
                         params=np.full((n, 62), np.nan, np.float32),
                         pose=np.full((n, 3), np.nan, np.float32), uv_gt=np.zeros((n, u, u, 3), np.float32),
                         uv_gt_mask=np.zeros((n, u, u), bool))
    verts, good, seg = [], [], []
    samples = iter(inputs)
    for k in range(n):
        t0 = time.perf_counter()
        sample = next(samples, None)
        if sample is None:
            raise ValueError(f"run_geometry: inputs gave {k} samples, expected len(inputs) = {n}")
        t0 = timer.add("decode", t0)
        fitted = _fit_one(sample, k, out, ctx)
        del sample  # the decoded photo goes before the next one is decoded (only its crop is kept, in out.image)
        if fitted is not None:
            verts.append(fitted[0])
            seg.append(fitted[1])
            good.append(k)
        timer.add("fit", t0)
    t0 = time.perf_counter()
    if good:
        seg_mask = np.stack(seg) if all(m is not None for m in seg) else None
        frags = None
        if cfg.occlusion is not None:  # rejected pixels leave the face region before it is eroded, as a parser's
            try:  # one rasterisation of the fitted meshes for both stages (None: each redoes its own)
                frags = rasterize_fitted(np.stack(verts), ctx.model, s)
            except Exception:  # noqa: BLE001 - the stages below rasterise sample by sample and record the failure
                frags = None
            _occlusion(out, good, verts, ctx, frags)
            seg_mask = ~out.occlusion[good] if seg_mask is None else seg_mask & ~out.occlusion[good]
        try:
            _unwrap(out, good, np.stack(verts), seg_mask, ctx, frags)
        except Exception:  # noqa: BLE001 - one bad sample must not fail the batch: redo it sample by sample
            for j, k in enumerate(good):
                try:
                    _unwrap(out, [k], verts[j][None], None if seg_mask is None else seg_mask[j:j + 1], ctx)
                except Exception:  # noqa: BLE001
                    out.reason[k] = Reason.STAGE_ERROR
                    out.errors.append(f"{out.keys[k]}: uv_gt: {traceback.format_exc(limit=3)}")
    timer.add("uv_gt", t0)
    return out


def _fit_one(sample, k: int, out: GeometryResult, ctx: StageContext) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Fit sample ``k`` and write its row of ``out`` (crop, parameters, pose; or its failure reason); returns its
    mesh in working pixels (V, 3) and segmentation (S, S) or None, or None when it failed. Keeps no reference to
    the decoded photo."""
    out.keys.append(sample.key)
    if not sample.ok:
        out.reason[k] = int(sample.failure)
        return None
    fit = ctx.config.fit
    try:
        if fit.fitter == "given":
            if sample.given_params is None:
                out.reason[k] = Reason.BAD_ANNOTATION
                return None
            res = ctx.fitter.fit_given(sample.image, sample.given_params)
        else:
            res = ctx.fitter.fit_photo(sample.image, aligned=sample.aligned)
    except Exception:  # noqa: BLE001 - a bad sample must not stop the chunk
        out.reason[k] = Reason.STAGE_ERROR
        out.errors.append(f"{sample.key}: fit: {traceback.format_exc(limit=3)}")
        return None
    if not res.ok:
        out.reason[k] = Reason.from_short(res.reason)
        return None
    out.image[k], out.params[k], out.pose[k] = res.image, res.params, res.pose
    return res.verts_px, _segmentation(sample, fit.image_size)


def _unwrap(out: GeometryResult, rows: list[int], verts: np.ndarray, seg_mask, ctx: StageContext,
            frags: Fragments | None = None) -> None:
    g = uv_gt_from_images(out.image[rows], verts, ctx.model, ctx.config.uvgt, seg_mask=seg_mask, cache=ctx.uv_cache,
                          fragments=frags)
    out.uv_gt[rows], out.uv_gt_mask[rows] = g.uv, g.mask
    out.face_region[rows], out.face_mask_eroded[rows] = g.face_mask, g.eroded
    empty = [k for k, m in zip(rows, g.mask, strict=True) if not m.any()]
    out.reason[empty] = Reason.LOW_COVERAGE


def _occlusion(out: GeometryResult, rows: list[int], verts: list[np.ndarray], ctx: StageContext,
               frags: Fragments | None = None) -> None:
    """``out.occlusion`` (n, S, S) bool for the fitted rows (:func:`preprocess.occlusion.occluders_from_fit`); a
    sample it fails on gets STAGE_ERROR (its UV_gt would hold the occluders)."""
    out.occlusion = np.zeros(out.face_region.shape, bool)
    cfg = ctx.config
    try:
        out.occlusion[rows] = occluders_from_fit(out.image[rows], np.stack(verts), ctx.model, cfg.uvgt, cfg.occlusion,
                                                 ctx.occlusion_labels, ctx.uv_cache, frags)
    except Exception:  # noqa: BLE001 - redo it sample by sample
        for j, k in enumerate(rows):
            try:
                out.occlusion[k] = occluders_from_fit(out.image[k:k + 1], verts[j][None], ctx.model, cfg.uvgt,
                                                      cfg.occlusion, ctx.occlusion_labels, ctx.uv_cache)[0]
            except Exception:  # noqa: BLE001
                out.reason[k] = Reason.STAGE_ERROR
                out.errors.append(f"{out.keys[k]}: occlusion: {traceback.format_exc(limit=3)}")


def _segmentation(sample, size: int) -> np.ndarray | None:
    """The pixels that may be face, when the source knows them (the synthetic world's exact face mask plays the
    part of the paper's face-parsing network, which excludes hair, hands and glasses). None otherwise."""
    if sample.truth is None or "face_mask" not in sample.truth:
        return None
    m = np.asarray(sample.truth["face_mask"], bool)
    return m if m.shape == (size, size) else None


def run_stages(inputs, ctx: StageContext, timer: Timer | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The whole chain for one chunk: inputs (list of SampleInput, or a sized iterable of them: see
    :func:`run_geometry`) -> (store arrays, error messages).

    Arrays follow :func:`common.store.array_specs` (uint8 images/UVs, bool masks, float32 params); failed
    samples have ``status = FAILED`` and a ``reason``; the rest of their rows keep fill values.
    """
    if ctx.basis is None:
        raise ValueError("run_stages needs the texture basis (StageContext.basis)")
    timer = Timer() if timer is None else timer
    return finish_stages(run_geometry(inputs, ctx, timer), ctx, timer)


GEOMETRY_ROWS = ("image", "face_region", "face_mask_eroded", "params", "pose", "uv_gt", "uv_gt_mask")
"""The per-sample arrays of :class:`GeometryResult` (and ``occlusion`` when on)."""


def merge_geometry(n: int, ctx: StageContext, fresh_rows: np.ndarray, fresh: GeometryResult, kept_rows: np.ndarray,
                   kept: dict[str, np.ndarray], kept_keys: list[str]) -> GeometryResult:
    """One chunk's :class:`GeometryResult` (n rows) from the rows ``fresh_rows`` computed now (``fresh``) and the
    rows ``kept_rows`` computed earlier and kept (fitted samples: reason 0; arrays name -> (k, ...), their keys)."""
    s, u = ctx.config.fit.image_size, ctx.config.uvgt.uv_size
    out = GeometryResult(reason=np.zeros(n, np.uint8), image=np.zeros((n, s, s, 3), np.uint8),
                         face_region=np.zeros((n, s, s), bool), face_mask_eroded=np.zeros((n, s, s), bool),
                         params=np.full((n, 62), np.nan, np.float32),
                         pose=np.full((n, 3), np.nan, np.float32), uv_gt=np.zeros((n, u, u, 3), np.float32),
                         uv_gt_mask=np.zeros((n, u, u), bool), errors=list(fresh.errors))
    if ctx.config.occlusion is not None:
        out.occlusion = np.zeros((n, s, s), bool)
        if fresh.occlusion is not None:
            out.occlusion[fresh_rows] = fresh.occlusion
        if "occlusion" in kept:
            out.occlusion[kept_rows] = kept["occlusion"]
    out.reason[fresh_rows] = fresh.reason
    for name in GEOMETRY_ROWS:
        getattr(out, name)[fresh_rows] = getattr(fresh, name)
        getattr(out, name)[kept_rows] = kept[name]
    keys = [""] * n
    for k, key in zip(fresh_rows, fresh.keys, strict=True):
        keys[k] = key
    for k, key in zip(kept_rows, kept_keys, strict=True):
        keys[k] = key
    out.keys = keys
    return out


def finish_stages(geo: GeometryResult, ctx: StageContext, timer: Timer) -> tuple[dict[str, np.ndarray], list[str]]:
    """The chain after :func:`run_geometry`: Eq. 8, Eq. 9, crops -> (store arrays, error messages) (as
    :func:`run_stages`)."""
    if ctx.basis is None:
        raise ValueError("finish_stages needs the texture basis (StageContext.basis)")
    n, u = len(geo.reason), ctx.config.uvgt.uv_size
    ok = geo.reason == 0
    hc, wc = ctx.crop_layout.ctr_region.shape
    hs, ws = ctx.crop_layout.sd_region.shape
    arrays = {
        "image": geo.image, "face_region": geo.face_region, "face_mask_eroded": geo.face_mask_eroded,
        "params": geo.params, "pose": geo.pose,
        "uv_gt": to_uint8(geo.uv_gt), "uv_gt_mask": geo.uv_gt_mask,
        "uv_bl": np.zeros((n, u, u, 3), np.uint8), "uv_source": np.zeros((n, u, u), np.uint8),
        "tex_coeff": np.full((n, ctx.basis.n_components), np.nan, np.float32),
        "uv_ctr": np.zeros((n, hc, wc, 3), np.uint8), "uv_ctr_mask": np.zeros((n, hc, wc), bool),
        "ctr_valid": np.zeros(n, bool), "uv_sd": np.zeros((n, hs, ws, 3), np.uint8),
        "uv_sd_mask": np.zeros((n, hs, ws), bool), "sd_valid": np.zeros(n, bool),
    }
    if geo.occlusion is not None:
        arrays["occlusion"] = geo.occlusion
    idx = np.flatnonzero(ok)
    t0 = time.perf_counter()
    if idx.size:
        coeff = ridge_texture_fit(geo.uv_gt[idx], geo.uv_gt_mask[idx], ctx.basis, lam=ctx.config.ridge_lambda)
        arrays["tex_coeff"][idx] = coeff
        uv_bfm = match_greyscale(np.clip(ctx.basis.synthesize(coeff), 0.0, 1.0), geo.uv_gt[idx], geo.uv_gt_mask[idx])
        t0 = timer.add("texture", t0)
        geo.reason[idx[~np.isfinite(coeff).all(1)]] = Reason.NAN
        nose = region_uv_mask(ctx.model, "nose", u, ctx.uv_cache.uv_frags)  # Eq. 9 fill: no mirror on the nose ridge
        row = {int(k): j for j, k in enumerate(idx)}
        todo = [int(k) for k in idx if not geo.reason[k]]
        for b0 in range(0, len(todo), NORMALS_BLOCK):
            block = todo[b0:b0 + NORMALS_BLOCK]
            try:  # the relit symmetric fill's normals and lighting fits, a block of samples at once
                normals = uv_normals(ctx.model, geo.params[block], ctx.uv_cache.uv_frags)
                shadings = relit_shadings(geo.uv_gt[block], geo.uv_gt_mask[block], normals, ctx.basis.valid,
                                          ctx.config.blend)
            except Exception:  # noqa: BLE001 - redone sample by sample below, where a bad one records its error
                normals = shadings = None
            for i, k in enumerate(block):
                try:
                    n = normals[i] if normals is not None else uv_normals(ctx.model, geo.params[k:k + 1],
                                                                          ctx.uv_cache.uv_frags)[0]
                    bl, src = blend_uv(geo.uv_gt[k], geo.uv_gt_mask[k], uv_bfm[row[k]], face_mask=ctx.basis.valid,
                                       mirror_index=ctx.mirror_index, config=ctx.config.blend, normals=n,
                                       nose_mask=nose, shading=None if shadings is None else shadings[i])
                    arrays["uv_bl"][k], arrays["uv_source"][k] = to_uint8(bl), src
                except Exception:  # noqa: BLE001 - recorded per sample, the chunk goes on
                    geo.reason[k] = Reason.STAGE_ERROR
                    geo.errors.append(f"{geo.keys[k]}: blend: {traceback.format_exc(limit=3)}")
        t0 = timer.add("blend", t0)
        for k in idx[geo.reason[idx] == 0]:
            c = cut_partial_crops(arrays["uv_gt"][k], geo.uv_gt_mask[k], float(geo.pose[k, 0]), ctx.crop_layout,
                                  ctx.config.crops, ctx.mirror_index)
            arrays["uv_ctr"][k], arrays["uv_ctr_mask"][k], arrays["ctr_valid"][k] = c.uv_ctr, c.ctr_mask, c.ctr_valid
            arrays["uv_sd"][k], arrays["uv_sd_mask"][k], arrays["sd_valid"][k] = c.uv_sd, c.sd_mask, c.sd_valid
        timer.add("crops", t0)
    return _finalise(arrays, geo), geo.errors


def _finalise(arrays: dict[str, np.ndarray], geo: GeometryResult) -> dict[str, np.ndarray]:
    """Status from the reasons; failed rows are reset to fill values so a failed sample holds no partial data."""
    failed = geo.reason != 0
    for name, a in arrays.items():
        if name in ("image",):  # the decoded/cropped photo is kept for inspection when a later stage failed
            continue
        a[failed] = np.nan if a.dtype.kind == "f" else 0
    arrays["status"] = np.where(failed, FAILED, OK).astype(np.uint8)
    arrays["reason"] = geo.reason
    return arrays
