"""Creating a store (:func:`create_store`: every array empty, the ``model/`` and ``uv_layout/`` groups, the root
attributes last) and reopening one to resume a build (:func:`open_for_build`), refused with :class:`StoreMismatch`
naming every setting that differs from this run's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from common.config import CropConfig
from common.configdiff import dotted_differences
from common.store.groups import check_model_inputs, model_differences, write_face_model
from common.store.location import local_path, open_store, quiet_listing, store_exists, store_location, url_fs
from common.store.lock import LOCK_NAME
from common.store.schema import (
    MANIFEST_ARRAYS,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    UPGRADABLE,
    UPGRADE_COMMAND,
    StoreLayout,
    StoreMismatch,
    array_specs,
    create_schema_array,
    manifest_sha256,
)
from common.uvlayout import CropLayout

if TYPE_CHECKING:  # common.facemodel imports torch; reading arrays from a store should not need it
    from common.facemodel import FaceModel

_PROVENANCE_ATTRS = ("face_region_source",)
"""Attributes that say how arrays were made, not with which settings: not compared when a build resumes."""
_RESERVED_ATTRS = ("schema_version", "layout", "manifest", "created", "package_version")
CREATING = "uvprep_creating"
"""Root attribute written before anything else when a store is created, replaced by the full attributes last: a
store that still carries it was interrupted while being created and holds no data."""


def package_version() -> str:
    """The installed uvtex version (recorded in a store's attributes), ``"unknown"`` when not installed."""
    try:
        from importlib.metadata import version

        return version("uvtex")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _check_attrs(attrs: Mapping) -> dict:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"store attrs: missing {missing}; expected at least {list(REQUIRED_ATTRS)} "
                         f"(config: the JSON-able build config, the two hashes: fingerprints of the models)")
    reserved = [k for k in _RESERVED_ATTRS if k in attrs]
    if reserved:
        raise ValueError(f"store attrs: {reserved} are set by common.store itself; remove them")
    if not isinstance(attrs["config"], Mapping):
        raise TypeError(f"store attrs['config']: expected a dict, found {type(attrs['config']).__name__}")
    try:
        return json.loads(json.dumps(dict(attrs)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"store attrs must be JSON-able (dicts, lists, str, numbers, bool, None): {e}") from None


def _manifest_arrays(manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accept ``(paths, sizes, mtimes)`` or an object with ``to_arrays()`` (``preprocess.sources.Manifest``)."""
    if hasattr(manifest, "to_arrays"):
        manifest = manifest.to_arrays()
    try:
        paths, sizes, mtimes = manifest
    except (TypeError, ValueError):
        raise TypeError("manifest: expected (paths, sizes, mtimes) or an object with to_arrays(), found "
                        f"{type(manifest).__name__}") from None
    paths = np.asarray([str(p) for p in paths], dtype=object)
    sizes, mtimes = np.asarray(sizes, np.int64), np.asarray(mtimes, np.float64)
    if not len(paths) == len(sizes) == len(mtimes):
        raise ValueError(f"manifest: {len(paths)} paths, {len(sizes)} sizes and {len(mtimes)} mtimes differ")
    return paths, sizes, mtimes


def _non_store_entries(path) -> list[str] | None:
    """Names at ``path`` other than the build lock (None: nothing there) -- for refusing to write into a folder or
    prefix that holds something else."""
    local = local_path(path)
    if local is not None:
        if not local.exists():
            return None
        return [local.name] if not local.is_dir() else _non_lock_entries(local)
    fs, where = url_fs(store_location(path))
    fs.invalidate_cache(where)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(where, detail=False)]
    except FileNotFoundError:
        return None
    return [n for n in names if n != LOCK_NAME] if names else None


def creation_interrupted(path) -> bool:
    """True for a store whose creation was interrupted (it carries :data:`CREATING` but no ``schema_version``)."""
    if not store_exists(path):
        return False
    try:
        a = dict(open_store(path, mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return CREATING in a and "schema_version" not in a


def create_store(path, layout: StoreLayout, attrs: Mapping, manifest, overwrite: bool = False, *,
                 face_model: FaceModel, crop_layout: CropLayout, mirror_index: np.ndarray,
                 crop_config: CropConfig) -> zarr.Group:
    """Create an empty store: every array of the schema (all samples PENDING), the ``model/`` and
    ``uv_layout/`` groups, and last the root attributes.

    attrs: JSON-able dict with at least ``config`` (the build config as a dict), ``face_model_hash``
    (``face_model.fingerprint()``) and ``texture_basis_hash``; other keys (model names, source kind, ...)
    are stored as given. manifest: ``(paths, sizes, mtimes)`` with ``layout.n_samples`` entries, or an
    object with ``to_arrays()``. Sample ``i`` of the store is manifest entry ``i``. face_model,
    crop_layout (at ``layout.uv_size``, crops of ``layout.ctr_shape`` / ``sd_shape``), mirror_index
    ((U*U,) int64) and crop_config: what the build cuts crops and mirrors with (see :func:`write_face_model`).
    An existing store is refused unless ``overwrite``; then its arrays are deleted and recreated
    (other files, like a held build lock, stay). A non-Zarr folder is never overwritten.
    """
    user = _check_attrs(attrs)
    paths, sizes, mtimes = _manifest_arrays(manifest)
    if len(paths) != layout.n_samples:
        raise ValueError(f"manifest has {len(paths)} entries, the layout {layout.n_samples} samples")
    check_model_inputs(layout, face_model, crop_layout, mirror_index, crop_config, user["face_model_hash"])
    if store_exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already holds a store; resume it with open_for_build or pass "
                                  f"--overwrite to rebuild")
        group = open_store(path, mode="r+")
        if "schema_version" not in group.attrs and CREATING not in group.attrs:
            raise FileExistsError(f"{path} is a Zarr group that uvprep did not create (it has no schema "
                                  f"attributes); refusing to delete its arrays: choose another --out")
        _mark_creating(group)  # first: it drops the old `generation`, so the old build's tasks are fenced off now
        with quiet_listing():
            members = list(group.keys())
        for name in members:
            del group[name]
    else:
        if _non_store_entries(path):
            raise FileExistsError(f"{path} exists and is not a Zarr store; refusing to write into it "
                                  f"(choose another --out or remove it yourself)")
        group = open_store(path, mode="a")
        _mark_creating(group)
    for name in (*array_specs(layout), *MANIFEST_ARRAYS):
        create_schema_array(group, layout, name)
    group["manifest_path"][:] = paths
    group["manifest_size"][:] = sizes
    group["manifest_mtime"][:] = mtimes
    write_face_model(group, layout, face_model, crop_layout, mirror_index, crop_config)
    root = {"schema_version": SCHEMA_VERSION, "layout": layout.to_json(), **user,
            "manifest": {"count": int(len(paths)), "sha256": manifest_sha256(paths, sizes, mtimes)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": package_version()}
    group.attrs.put(root)
    return group


def _mark_creating(group: zarr.Group) -> None:
    group.attrs.put({CREATING: {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "pid": os.getpid()}})


def _non_lock_entries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name != LOCK_NAME]


def _differences(stored: Mapping, layout: StoreLayout, user: Mapping, m_count: int, m_sha: str) -> list[str]:
    diffs = []
    if stored.get("schema_version") != SCHEMA_VERSION:
        hint = f" (upgrade it in place: {UPGRADE_COMMAND})" if stored.get("schema_version") in UPGRADABLE else ""
        diffs.append(f"schema_version: store {stored.get('schema_version')}, this code {SCHEMA_VERSION}{hint}")
    want = {"layout": layout.to_json(), "config": user["config"]}
    want.update({k: user[k] for k in user if k != "config" and k not in _PROVENANCE_ATTRS})
    stored = dict(stored)
    with contextlib.suppress(KeyError, TypeError, ValueError):  # a layout written before a field existed: its default
        stored["layout"] = StoreLayout.from_json(stored["layout"]).to_json()
    for top, value in want.items():
        diffs += dotted_differences(stored.get(top), value, "store", prefix=top)
    sm = stored.get("manifest", {})
    if sm.get("sha256") != m_sha:
        diffs.append(f"manifest: store {sm.get('count')} entries (sha256 {str(sm.get('sha256'))[:12]}...), "
                     f"this run {m_count} entries (sha256 {m_sha[:12]}...)")
    return diffs


def open_for_build(path, layout: StoreLayout, attrs: Mapping, manifest, *, face_model: FaceModel,
                   crop_layout: CropLayout, mirror_index: np.ndarray, crop_config: CropConfig) -> zarr.Group:
    """Open an existing store to resume a build; raise :class:`StoreMismatch` unless it was built the same way.

    Compared: schema version, every layout field, every (nested) config key, the face-model and
    texture-basis hashes (and any other attrs given), the manifest hash, and the stored ``model/`` and
    ``uv_layout/`` groups against the given model, crop layout, mirror index and crop config (arguments
    as in :func:`create_store`). The message names each differing field with both values, and, for the
    manifest, how many entries were added / removed / changed.
    """
    user = _check_attrs(attrs)
    paths, sizes, mtimes = _manifest_arrays(manifest)
    if not store_exists(path):
        raise FileNotFoundError(f"no store at {path}; create it with create_store")
    group = open_store(path, mode="r+")
    stored = dict(group.attrs)
    sha = manifest_sha256(paths, sizes, mtimes)
    diffs = _differences(stored, layout, user, len(paths), sha)
    if any(d.startswith("manifest:") for d in diffs) and all(n in group for n in MANIFEST_ARRAYS):
        old = (group["manifest_path"][:], group["manifest_size"][:], group["manifest_mtime"][:])
        added, removed, changed = _manifest_diff((paths, sizes, mtimes), old)
        diffs[-1] += (f": {len(added)} added, {len(removed)} removed, {len(changed)} changed"
                      + (f" (e.g. {(added + removed + changed)[0]})" if added or removed or changed else ""))
    if not diffs:
        diffs = model_differences(group, face_model, crop_layout, mirror_index, crop_config)
    if diffs:
        raise StoreMismatch(f"{path} was built with different settings than this run:\n  - "
                            + "\n  - ".join(diffs) + "\npass --overwrite to rebuild")
    return group


def _manifest_diff(new, old) -> tuple[list[str], list[str], list[str]]:
    """(added, removed, changed) keys of manifest ``new`` relative to ``old``; each is (paths, sizes, mtimes)."""
    a = {str(p): (int(s), float(m)) for p, s, m in zip(*new, strict=True)}
    b = {str(p): (int(s), float(m)) for p, s, m in zip(*old, strict=True)}
    return (sorted(set(a) - set(b)), sorted(set(b) - set(a)), sorted(k for k in set(a) & set(b) if a[k] != b[k]))

