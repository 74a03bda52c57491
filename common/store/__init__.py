"""The training store: schema, writer, reader and build lock of the Zarr v3 store ``uvprep build`` writes.

One sample per photo, in manifest order (sorted source keys). Every sample-aligned array is chunked
along the sample axis only, ``chunk`` samples per chunk, so one build task owns one chunk of every
array and tasks never write the same object. A task writes its data arrays, then ``reason`` and
``status``, and *last* ``chunk_done[c] = 1`` (its own (1,)-chunked object): a chunk whose
``chunk_done`` is 0 is redone on resume, whatever it holds.

The store describes itself: besides the per-sample arrays it holds everything a trainer needs to
render and to cut crops, so the trainer reads only this store (and ``common/``), never ``preprocess/``.

Arrays (N samples, H = W = ``image_size``, U = ``uv_size``, K = ``n_tex``, (hc, wc) / (hs, ws) the crop
shapes; the table is made from :data:`common.store.schema.ARRAYS`, which also gives each array's
``description`` attribute and its shape in :func:`array_specs`):

{array_table}

Float arrays are filled with NaN, everything else with 0 (``status`` 0 is PENDING), so an OK sample
whose float arrays were never written shows up in :meth:`StoreReader.validate`.

Groups, written once when the store is created (before the root attributes, so a store with
attributes has them), read back by :class:`StoreReader`:

* ``model/`` -- the face model the store was built with (V vertices, F triangles, R regions), exact
  (float32 as the model holds it): ``mean_shape`` (V, 3) float32, ``id_basis`` (V, 3, Kid) float32,
  ``exp_basis`` (V, 3, Kexp) float32, ``triangles`` (F, 3) int64, ``uv`` (V, 2) float32, ``symmetry``
  (V,) int64, ``regions`` (R, V) bool, ``keypoints`` (68,) int64 when the model has them, ``tex_mean``
  (V, 3) / ``tex_basis`` (V, 3, Ktex) float32 when the model has a per-vertex texture basis (kept so
  that the read-back model has the same :meth:`~common.facemodel.FaceModel.fingerprint`; the UV
  texture basis the build fitted is ``texture/``). Attributes: ``name``, ``fingerprint`` (equal to the
  root ``face_model_hash``), ``region_names`` (the rows of ``regions``), ``meta`` (the model's
  JSON-able provenance entries) and ``meta_omitted`` (the names of the others). :meth:`StoreReader.face_model`.
* ``uv_layout/`` -- where the partial crops are cut and how texels mirror (:mod:`common.uvlayout`):
  ``ctr_region`` (hc, wc) bool, ``sd_region`` (hs, ws) bool, ``mirror_index`` (U*U,) int64
  (``common.uvtools.texel_mirror_index``, -1 where a texel has no mirror). Attributes: ``uv_size``,
  ``ctr_box``, ``sd_box`` (row0, row1, col0, col1, half-open), ``crop_config`` (the
  :class:`~common.config.CropConfig` values: frontal_yaw_max, profile_yaw_min, min_coverage, margin)
  and ``face_model`` (the fingerprint it was computed from). :meth:`StoreReader.crop_layout`,
  :meth:`StoreReader.mirror_index`, :meth:`StoreReader.crop_config`.
* ``texture/`` -- the linear UV texture basis of Eq. 8 (written by the build before any chunk):
  ``mean`` (U, U, 3) float32, ``basis`` (U, U, 3, K) float16, ``valid`` (U, U) bool.
  :meth:`StoreReader.texture_basis`.

Root attributes: ``schema_version``, ``layout`` (:class:`StoreLayout`), ``config`` (the build config),
``face_model_hash``, ``texture_basis_hash``, ``manifest`` (count, sha256), ``created``, ``package_version``,
and what the build adds (``face_model``, ``source_kind``, ``face_region_source``: how ``face_region``
was made -- with or without a segmentation mask; provenance, not compared when a build resumes).

Schema history: version 1 had no ``model/`` / ``uv_layout/`` groups and no ``face_region``, and called
``face_mask_eroded`` ``face_mask``; ``uvprep upgrade STORE`` turns such a store into version 2
(``face_region`` then comes from the projected mesh alone: ``face_region_source`` is
``"upgrade: projected mesh only"``, and ``upgraded`` records when and from which version).

Where a store lives: a local path, ``file://PATH`` or an fsspec URL (``s3://bucket/store.zarr``; zarr opens it
through fsspec, credentials and endpoint from the environment and config files, never from the URL: see
:func:`store_location`).

The build lock is a JSON file ``.uvprep-build.lock`` inside the store, created only if absent: with
``O_CREAT | O_EXCL`` on local and POSIX network file systems, with a conditional PUT (``If-None-Match: *``,
s3fs's ``open(..., "xb")``) on S3. Other URL schemes have no exclusive create the lock trusts:
:func:`acquire_build_lock` refuses them, and a build there runs without a lock (``uvprep build --no-lock``: the
user guarantees one build per store). While the lock exists, listing the group's members with zarr warns about
one unrecognised object; the lock is removed when the build ends.

Modules: :mod:`~common.store.schema` (version, codes, layout, the array table), :mod:`~common.store.location`
(paths, URLs, opening), :mod:`~common.store.lock` (the build lock), :mod:`~common.store.create` (create and
resume), :mod:`~common.store.chunks` (chunk writes, fencing, checksums, repair), :mod:`~common.store.groups`
(``model/``, ``uv_layout/``, ``texture/``), :mod:`~common.store.reader` (:class:`StoreReader`) and
:mod:`~common.store.validate`. Everything callers use is re-exported here: import from ``common.store``.
"""

from __future__ import annotations

from common.store.chunks import (
    GENERATION,
    ChunkVerifier,
    DamagedChunk,
    StaleWriter,
    completed_chunks,
    mark_pending,
    repair_for_resume,
    start_generation,
    verify_chunks,
    write_chunk,
)
from common.store.create import CREATING, create_store, creation_interrupted, open_for_build, package_version
from common.store.groups import (
    read_face_model,
    read_texture_basis,
    read_uv_layout,
    write_face_model,
    write_texture_basis,
)
from common.store.location import layout_of, location_of, open_store, store_exists, store_location
from common.store.lock import (
    EXCLUSIVE_CREATE,
    LOCK_NAME,
    UNREADABLE_LOCK_AGE,
    BuildLock,
    LockHeld,
    StoreLocked,
    acquire_build_lock,
    acquire_lock,
    read_build_lock,
    read_lock,
)
from common.store.reader import StoreReader
from common.store.schema import (
    ARRAY_DOCS,
    ARRAYS,
    FAILED,
    MANIFEST_ARRAYS,
    MODEL_GROUP,
    N_PARAMS,
    OK,
    PENDING,
    PER_CHUNK,
    RECORD_BYTES,
    SCHEMA_VERSION,
    TEXTURE_GROUP,
    UV_LAYOUT_GROUP,
    ArraySpec,
    Reason,
    Status,
    StoreLayout,
    StoreMismatch,
    array_specs,
    create_schema_array,
    manifest_sha256,
    manifest_specs,
    reason_name,
    schema_table,
)
from common.store.validate import validate_store

if __doc__:  # None under python -OO
    __doc__ = __doc__.replace("{array_table}", schema_table())

__all__ = [
    "ARRAYS", "ARRAY_DOCS", "CREATING", "EXCLUSIVE_CREATE", "FAILED", "GENERATION", "LOCK_NAME", "MANIFEST_ARRAYS",
    "MODEL_GROUP", "N_PARAMS", "OK", "PENDING", "PER_CHUNK", "RECORD_BYTES", "SCHEMA_VERSION", "TEXTURE_GROUP",
    "UNREADABLE_LOCK_AGE", "UV_LAYOUT_GROUP", "ArraySpec", "BuildLock", "ChunkVerifier", "DamagedChunk", "LockHeld",
    "Reason", "StaleWriter", "Status",
    "StoreLayout", "StoreLocked", "StoreMismatch", "StoreReader", "acquire_build_lock", "acquire_lock", "array_specs",
    "completed_chunks", "create_schema_array", "create_store", "creation_interrupted",
    "layout_of", "location_of", "manifest_sha256", "manifest_specs", "mark_pending", "open_for_build", "open_store",
    "package_version", "read_build_lock", "read_face_model", "read_lock", "read_texture_basis", "read_uv_layout",
    "reason_name",
    "repair_for_resume", "schema_table", "start_generation", "store_exists", "store_location", "validate_store",
    "verify_chunks", "write_chunk", "write_face_model", "write_texture_basis",
]
