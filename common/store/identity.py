"""What a store is, as a small JSON-able record (:func:`store_identity`), and what changed between two such records
(:func:`identity_differences`): a trainer records the identity of the store a run trains on and refuses to resume on
another one.

The identity is the store's build settings (``config``, ``layout``, the face-model and texture-basis hashes, the
manifest hash), its completion (chunks built, OK samples) and, with ``layout.chunk_records``, the SHA-256 of its
chunks' data digests: two stores with the same ``data_sha256`` hold the same samples bit for bit (a deterministic
rebuild with the same settings gives the same digest; ``uvprep build --verify`` rebuilding a damaged chunk keeps it).
``created`` and ``generation`` change with every rebuild and every ``uvprep build`` run, so they tell whether the
data digest must be computed again (:func:`same_build`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import zarr

from common.configdiff import dotted_differences
from common.store.chunks import GENERATION
from common.store.location import as_group, layout_of
from common.store.schema import OK, RECORD_BYTES

IDENTITY_VERSION = 1
"""Version of the record :func:`store_identity` returns."""


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_sha256(group: zarr.Group, done: np.ndarray | None = None) -> str | None:
    """SHA-256 over the data digests (the first 32 bytes of ``chunk_record``) of the completed chunks, in chunk
    order, with their indices; None for a store without chunk records. done: (n_chunks,) bool, read when None."""
    layout = layout_of(group)
    if not layout.chunk_records:
        return None
    if done is None:
        done = group["chunk_done"][:] == 1
    records = np.asarray(group["chunk_record"][:], np.uint8).reshape(-1, RECORD_BYTES)[:, :32]
    h = hashlib.sha256()
    for c in np.flatnonzero(done):
        h.update(int(c).to_bytes(8, "little") + records[c].tobytes())
    return h.hexdigest()


def store_identity(path_or_group, with_data: bool = True) -> dict[str, Any]:
    """The identity record of a store: ``{"version", "created", "generation", "schema_version", "layout",
    "config", "config_sha256", "face_model_hash", "texture_basis_hash", "manifest": {count, sha256},
    "chunks_done", "n_chunks", "complete", "samples_ok", "data_sha256"}``; JSON-able.

    with_data: compute ``data_sha256`` (one small read per chunk: ``chunk_record`` is chunked per chunk); False
    leaves it None, for a caller that knows it from an earlier record of the same build (:func:`same_build`).
    """
    group = as_group(path_or_group, "r")
    attrs = dict(group.attrs)
    layout = layout_of(group)
    done = group["chunk_done"][:] == 1
    return {
        "version": IDENTITY_VERSION,
        "created": attrs.get("created"),
        "generation": attrs.get(GENERATION),
        "schema_version": attrs.get("schema_version"),
        "layout": layout.to_json(),
        "config": attrs.get("config"),
        "config_sha256": _sha256_json(attrs.get("config")),
        "face_model_hash": attrs.get("face_model_hash"),
        "texture_basis_hash": attrs.get("texture_basis_hash"),
        "manifest": {k: attrs.get("manifest", {}).get(k) for k in ("count", "sha256")},
        "chunks_done": int(done.sum()),
        "n_chunks": int(done.size),
        "complete": bool(done.all()),
        "samples_ok": int((group["status"][:] == OK).sum()),
        "data_sha256": data_sha256(group, done) if with_data else None,
    }


def same_build(recorded: dict, current: dict) -> bool:
    """Whether ``current`` (read with ``with_data=False``) comes from the very build ``recorded`` was taken from:
    same creation time and generation, no build has run since, so its data digest is unchanged."""
    return all(recorded.get(k) == current.get(k) and current.get(k) is not None
               for k in ("created", "generation", "chunks_done"))


def identity_differences(recorded: dict, current: dict, old_name: str = "run", new_name: str = "now") -> list[str]:
    """What differs between two identity records, most telling first (``KEY: OLD_NAME x, NEW_NAME y``): the build
    config keys, layout, model hashes and manifest; when those agree, the data digest (the store was rebuilt and
    its samples differ, or its chunks were rewritten). Empty when the two records describe the same data."""
    diffs: list[str] = []
    for top in ("schema_version", "layout", "config", "face_model_hash", "texture_basis_hash"):
        diffs += dotted_differences(recorded.get(top), current.get(top), old_name, new_name, prefix=top)
    rm, cm = recorded.get("manifest") or {}, current.get("manifest") or {}
    if rm.get("sha256") != cm.get("sha256"):
        diffs.append(f"manifest: {old_name} {rm.get('count')} photos (sha256 {str(rm.get('sha256'))[:12]}…), "
                     f"{new_name} {cm.get('count')} photos (sha256 {str(cm.get('sha256'))[:12]}…)")
    if not diffs and recorded.get("data_sha256") != current.get("data_sha256"):
        diffs.append(f"sample data (SHA-256 of the chunk records): {old_name} {str(recorded.get('data_sha256'))[:12]}… "
                     f"(created {recorded.get('created')}), {new_name} {str(current.get('data_sha256'))[:12]}… "
                     f"(created {current.get('created')})")
    return diffs


__all__ = ["IDENTITY_VERSION", "data_sha256", "identity_differences", "same_build", "store_identity"]
