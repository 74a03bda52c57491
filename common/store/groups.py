"""The store's groups besides the per-sample arrays, written once and read back whole: ``model/`` (the face model
the store was built with), ``uv_layout/`` (crop boxes and masks, texel mirror index) and ``texture/`` (the UV
texture basis of Eq. 8). Their contents are described in the :mod:`common.store` docstring.

Each group's attributes are written last, so a group with its attributes is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import zarr

from common.config import CropConfig
from common.store.location import as_group, location_of
from common.store.schema import MODEL_GROUP, TEXTURE_GROUP, UPGRADE_COMMAND, UV_LAYOUT_GROUP, StoreLayout
from common.uvlayout import CropLayout

if TYPE_CHECKING:  # common.facemodel imports torch; reading arrays from a store should not need it
    from common.facemodel import FaceModel

_MODEL_ARRAYS = {"mean_shape": np.float32, "id_basis": np.float32, "exp_basis": np.float32, "triangles": np.int64,
                 "uv": np.float32, "symmetry": np.int64}
_MODEL_OPTIONAL = {"keypoints": np.int64, "tex_mean": np.float32, "tex_basis": np.float32}


def check_model_inputs(layout: StoreLayout, model: FaceModel, crops: CropLayout, mirror_index: np.ndarray,
                        crop_config: CropConfig, model_hash: str | None = None) -> None:
    """Raise unless the model, crop layout and mirror index fit ``layout`` (and ``model_hash``, when given)."""
    for name, dt in {**_MODEL_ARRAYS, **_MODEL_OPTIONAL}.items():
        a = getattr(model, name)
        if a is not None and a.dtype != dt:  # stored as held: a cast would change the model's fingerprint
            raise TypeError(f"face model {model.name!r}: {name} is {a.dtype}, the store keeps {np.dtype(dt)}")
    if model_hash is not None and model.fingerprint() != model_hash:
        raise ValueError(f"face model {model.name!r} has fingerprint {model.fingerprint()}, the store attributes "
                         f"say face_model_hash {model_hash}; they must describe the same model")
    _check_uv_layout_inputs(layout, crops, mirror_index, crop_config)


def _check_uv_layout_inputs(layout: StoreLayout, crops: CropLayout, mirror_index: np.ndarray,
                            crop_config: CropConfig) -> None:
    u = layout.uv_size
    if not isinstance(crop_config, CropConfig):
        raise TypeError(f"crop_config: expected a common.config.CropConfig, found {type(crop_config).__name__}")
    if (crops.uv_size, crops.ctr_region.shape, crops.sd_region.shape) != (u, layout.ctr_shape, layout.sd_shape):
        raise ValueError(f"crop layout: expected U = {u} and crops {layout.ctr_shape} / {layout.sd_shape} (the store "
                         f"layout), found U = {crops.uv_size} and {crops.ctr_region.shape} / {crops.sd_region.shape}")
    mi = np.asarray(mirror_index)
    if mi.shape != (u * u,) or mi.dtype.kind not in "iu" or (mi.size and (mi.min() < -1 or mi.max() >= u * u)):
        raise ValueError(f"mirror_index: expected ({u * u},) integers in [-1, {u * u}) "
                         f"(common.uvtools.texel_mirror_index at U = {u}), found {mi.shape} {mi.dtype}")


def _json_meta(meta: Mapping) -> tuple[dict, list[str]]:
    """The JSON-able entries of a model's meta, and the names of the others (arrays, objects)."""
    kept, omitted = {}, []
    for k, v in meta.items():
        try:
            kept[str(k)] = json.loads(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError):
            omitted.append(str(k))
    return kept, sorted(omitted)


def _put_arrays(group: zarr.Group, arrays: Mapping[str, np.ndarray]) -> None:
    """Write each array whole (one chunk, zstd level 3), replacing one of that name."""
    for name, arr in arrays.items():
        if name in group:
            del group[name]
        group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape or None,
                           compressors=(zarr.codecs.ZstdCodec(level=3),))[...] = arr


def write_face_model(path_or_group, layout: StoreLayout, model: FaceModel, crop_layout: CropLayout,
                     mirror_index: np.ndarray, crop_config: CropConfig) -> None:
    """Write (or rewrite) the ``model/`` and ``uv_layout/`` groups (see :mod:`common.store`) of a store with ``layout``.

    model: the :class:`common.facemodel.FaceModel` (arrays stored exactly as held, float32 / int64);
    crop_layout: :func:`common.uvlayout.crop_layout` at ``layout.uv_size`` with ``crop_config``;
    mirror_index: (U*U,) int64 (:func:`common.uvtools.texel_mirror_index`). Each group's attributes are
    written last, so a group with its attributes is complete. Called by :func:`create_store` (and by
    ``uvprep upgrade`` for a version-1 store); everything is checked before anything is written.
    """
    check_model_inputs(layout, model, crop_layout, mirror_index, crop_config)
    group = as_group(path_or_group, "r+")
    fingerprint = model.fingerprint()
    for name in (MODEL_GROUP, UV_LAYOUT_GROUP):
        if name in group:
            del group[name]
    names = sorted(model.regions)
    arrays = {k: getattr(model, k) for k in (*_MODEL_ARRAYS, *_MODEL_OPTIONAL) if getattr(model, k) is not None}
    arrays["regions"] = np.stack([np.asarray(model.regions[n], bool) for n in names])
    m = group.create_group(MODEL_GROUP)
    _put_arrays(m, {k: np.ascontiguousarray(v) for k, v in arrays.items()})
    meta, omitted = _json_meta(model.meta)
    m.attrs.put({"name": model.name, "region_names": names, "meta": meta, "meta_omitted": omitted,
                 "fingerprint": fingerprint})
    uvl = group.create_group(UV_LAYOUT_GROUP)
    _put_arrays(uvl, {"ctr_region": np.asarray(crop_layout.ctr_region, bool),
                      "sd_region": np.asarray(crop_layout.sd_region, bool),
                      "mirror_index": np.asarray(mirror_index, np.int64)})
    uvl.attrs.put({"uv_size": int(crop_layout.uv_size), "ctr_box": [int(v) for v in crop_layout.ctr_box],
                   "sd_box": [int(v) for v in crop_layout.sd_box], "crop_config": asdict(crop_config),
                   "face_model": fingerprint})


def _complete_group(group: zarr.Group, name: str, key: str) -> zarr.Group:
    if name not in group:
        raise KeyError(f"{location_of(group)} has no {name}/ group (a version-1 store? see `{UPGRADE_COMMAND}`)")
    g = group[name]
    if key not in g.attrs:
        raise KeyError(f"{location_of(group)}: the {name}/ group is incomplete (its creation was interrupted); "
                       f"rebuild the store (--overwrite)")
    return g


def read_face_model(path_or_group) -> FaceModel:
    """The face model stored in ``model/``, as a :class:`common.facemodel.FaceModel` (no per-vertex texture
    basis unless the model had one); its ``fingerprint()`` equals the store's ``face_model_hash``."""
    from common.facemodel import FaceModel

    m = _complete_group(as_group(path_or_group, "r"), MODEL_GROUP, "fingerprint")
    attrs = dict(m.attrs)
    regions = m["regions"][...]
    if regions.shape[0] != len(attrs["region_names"]):
        raise ValueError(f"model/regions has {regions.shape[0]} rows for {len(attrs['region_names'])} region names")
    opt = {k: m[k][...] if k in m else None for k in _MODEL_OPTIONAL}
    return FaceModel(name=attrs["name"], **{k: m[k][...] for k in _MODEL_ARRAYS},
                     regions=dict(zip(attrs["region_names"], regions, strict=True)), meta=attrs.get("meta", {}), **opt)


def read_uv_layout(path_or_group) -> tuple[CropLayout, np.ndarray, CropConfig]:
    """The stored ``uv_layout/``: (crop layout, mirror index (U*U,) int64, crop config)."""
    g = _complete_group(as_group(path_or_group, "r"), UV_LAYOUT_GROUP, "face_model")
    a = dict(g.attrs)
    crops = CropLayout(int(a["uv_size"]), tuple(a["ctr_box"]), tuple(a["sd_box"]), g["ctr_region"][...],
                       g["sd_region"][...])
    return crops, g["mirror_index"][...], CropConfig(**a["crop_config"])


def model_differences(group: zarr.Group, model: FaceModel, crops: CropLayout, mirror_index: np.ndarray,
                       crop_config: CropConfig) -> list[str]:
    """How the stored model/ and uv_layout/ groups differ from this run's (empty: the same)."""
    try:
        stored_fp = _complete_group(group, MODEL_GROUP, "fingerprint").attrs["fingerprint"]
        s_crops, s_mirror, s_config = read_uv_layout(group)
    except (KeyError, ValueError, TypeError) as e:
        return [f"model/uv_layout: {e}"]
    diffs = []
    if stored_fp != model.fingerprint():
        diffs.append(f"model/: store {stored_fp}, this run {model.fingerprint()}")
    if not s_crops.equals(crops):
        diffs.append(f"uv_layout/: crop boxes or masks differ (store ctr {s_crops.ctr_box} sd {s_crops.sd_box}, "
                     f"this run ctr {tuple(crops.ctr_box)} sd {tuple(crops.sd_box)})")
    if not np.array_equal(s_mirror, np.asarray(mirror_index)):
        diffs.append("uv_layout/mirror_index: differs from this run's")
    if s_config != crop_config:
        diffs.append(f"uv_layout/crop_config: store {asdict(s_config)}, this run {asdict(crop_config)}")
    return diffs


def model_group_problems(group: zarr.Group) -> list[str]:
    """What is wrong with the ``model/`` group (for :func:`common.store.validate_store`; empty: sound)."""
    try:
        m = _complete_group(group, MODEL_GROUP, "fingerprint")
        model = read_face_model(group)
    except (KeyError, ValueError, TypeError) as e:
        return [f"model: {e}"]
    problems = []
    fp, want = m.attrs["fingerprint"], group.attrs.get("face_model_hash")
    if model.fingerprint() != fp:
        problems.append(f"model: the arrays hash to {model.fingerprint()}, the recorded fingerprint is {fp} "
                        f"(edited after creation?)")
    if fp != want:
        problems.append(f"model: fingerprint {fp} differs from the store's face_model_hash {want}")
    return problems


def uv_layout_group_problems(group: zarr.Group, layout: StoreLayout) -> list[str]:
    """What is wrong with the ``uv_layout/`` group (for :func:`common.store.validate_store`; empty: sound)."""
    try:
        crops, mirror, config = read_uv_layout(group)
        _check_uv_layout_inputs(layout, crops, mirror, config)
    except (KeyError, ValueError, TypeError) as e:
        return [f"uv_layout: {e}"]
    fp, want = group[UV_LAYOUT_GROUP].attrs["face_model"], group.attrs.get("face_model_hash")
    return [] if fp == want else [f"uv_layout: computed for face model {fp}, the store's face_model_hash is {want}"]


def write_texture_basis(path_or_group, mean: np.ndarray, basis: np.ndarray, valid: np.ndarray, name: str,
                        fingerprint: str) -> None:
    """Store the linear UV texture model the build used (``texture/{mean,basis,valid}``), written once.

    mean: (U, U, 3) float32; basis: (U, U, 3, K) float32 (stored float16); valid: (U, U) bool. The group's
    attributes hold ``name`` and ``fingerprint``; it is written last, so a present fingerprint means complete.
    """
    tex = as_group(path_or_group, "r+").require_group(TEXTURE_GROUP)
    _put_arrays(tex, {"mean": np.asarray(mean, np.float32), "basis": np.asarray(basis, np.float16),
                      "valid": np.asarray(valid, bool)})
    tex.attrs.put({"name": name, "fingerprint": fingerprint})


def read_texture_basis(path_or_group) -> dict | None:
    """The stored texture model as ``{mean, basis (float32), valid, name, fingerprint}``, or None if absent."""
    group = as_group(path_or_group, "r")
    if TEXTURE_GROUP not in group:
        return None
    tex = group[TEXTURE_GROUP]
    attrs = dict(tex.attrs)
    if "fingerprint" not in attrs:  # interrupted while writing
        return None
    return {"mean": tex["mean"][...], "basis": tex["basis"][...].astype(np.float32), "valid": tex["valid"][...],
            "name": attrs["name"], "fingerprint": attrs["fingerprint"]}
