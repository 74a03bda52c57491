"""The training store: schema, writer, reader and build lock of the Zarr v3 store ``uvprep build`` writes.

One sample per photo, in manifest order (sorted source keys). Every sample-aligned array is chunked
along the sample axis only, ``chunk`` samples per chunk, so one build task owns one chunk of every
array and tasks never write the same object. A task writes its data arrays, then ``reason`` and
``status``, and *last* ``chunk_done[c] = 1`` (its own (1,)-chunked object): a chunk whose
``chunk_done`` is 0 is redone on resume, whatever it holds.

The store describes itself: besides the per-sample arrays it holds everything a trainer needs to
render and to cut crops, so the trainer reads only this store (and ``common/``), never ``preprocess/``.

Arrays (N samples, H = W = ``image_size``, U = ``uv_size``, K = ``n_tex``):

====================  ===================  =======  ==================================================
name                  shape                dtype    meaning
====================  ===================  =======  ==================================================
image                 (N, H, W, 3)         uint8    the photo at the working resolution, RGB
face_region           (N, H, W)            bool     projected face region before erosion: the visible face
                                                    triangles (``face | eyes`` minus ``mouth``), intersected
                                                    with the source's segmentation mask when it has one
face_mask_eroded      (N, H, W)            bool     ``face_region`` eroded: the mask UV_gt was read under
uv_gt                 (N, U, U, 3)         uint8    incomplete UV texture unwrapped from the photo
uv_gt_mask            (N, U, U)            bool     observed texels of ``uv_gt``
uv_bl                 (N, U, U, 3)         uint8    blended complete UV texture (pseudo ground truth)
uv_source             (N, U, U)            uint8    per-texel source label of ``uv_bl`` (blend stage)
params                (N, 62)              float32  3DDFA 62-parameter fit (see common.geometry)
pose                  (N, 3)               float32  yaw, pitch, roll in degrees
tex_coeff             (N, K)               float32  texture-basis coefficients (Eq. 8)
uv_ctr, uv_ctr_mask   (N, hc, wc, 3 | -)   u8/bool  centre crop (Section 3.4) and its mask
ctr_valid             (N,)                 bool     the sample yields a centre crop
uv_sd, uv_sd_mask     (N, hs, ws, 3 | -)   u8/bool  side crop and its mask
sd_valid              (N,)                 bool     the sample yields a side crop
uv_true               (N, U, U, 3)         uint8    synthetic stores only: the exact UV texture
occlusion             (N, H, W)            bool     only when ``layout.has_occlusion`` (built with occluder
                                                    rejection): pixels inside the eroded projected mesh mask
                                                    rejected as occluders (``preprocess.occlusion``); they are
                                                    outside ``face_region`` and ``face_mask_eroded``
status                (N,)                 uint8    PENDING / OK / FAILED
reason                (N,)                 uint8    :class:`Reason` of a failed sample, 0 otherwise
chunk_done            (n_chunks,)          uint8    1 once chunk c is completely written
manifest_path         (N,)                 str      source key of sample i (variable-length UTF-8)
manifest_size         (N,)                 int64    its size in bytes
manifest_mtime        (N,)                 float64  its modification time (POSIX seconds)
====================  ===================  =======  ==================================================

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
  :class:`~common.uvlayout.CropConfig` values: frontal_yaw_max, profile_yaw_min, min_coverage, margin)
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
"""

from __future__ import annotations

import contextlib
import enum
import getpass
import hashlib
import json
import os
import socket
import struct
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import zarr

from common.texbasis import UVTextureBasis
from common.uvlayout import CropConfig, CropLayout

if TYPE_CHECKING:  # common.facemodel imports torch; reading arrays from a store should not need it
    from common.facemodel import FaceModel

SCHEMA_VERSION = 2
"""Bumped whenever an array, dtype, shape rule or attribute changes meaning; old stores are then refused
(version 1 can be upgraded in place: ``uvprep upgrade STORE``)."""
N_PARAMS = 62
LOCK_NAME = ".uvprep-build.lock"


class Status(enum.IntEnum):
    """Per-sample processing state stored in ``status`` (uint8)."""

    PENDING = 0
    OK = 1
    FAILED = 2


PENDING, OK, FAILED = Status.PENDING, Status.OK, Status.FAILED


class Reason(enum.IntEnum):
    """Why a sample failed, stored in ``reason`` (uint8). Values are part of the schema: never renumber."""

    NONE = 0
    READ_ERROR = 1
    NOT_AN_IMAGE = 2
    DECODE_ERROR = 3
    TRUNCATED = 4
    UNSUPPORTED_MODE = 5
    TOO_SMALL = 6
    BAD_ANNOTATION = 7
    TOO_LARGE = 8
    NOT_A_FILE = 9
    BAD_NAME = 10
    UNSUPPORTED_ARCHIVE = 11
    DUPLICATE_NAME = 12
    NO_FACE = 20
    FIT_DIVERGED = 21
    NAN = 22
    LOW_COVERAGE = 23
    STAGE_ERROR = 40

    @property
    def short(self) -> str:
        """Short lower-case name, e.g. ``"no_face"``."""
        return self.name.lower()

    @property
    def description(self) -> str:
        return _REASON_TEXT[self]

    @classmethod
    def from_short(cls, name: str) -> Reason:
        """Inverse of :attr:`short`; raises ValueError listing the known names."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown failure reason {name!r}; known: {', '.join(r.short for r in cls)}") from None


_REASON_TEXT = {
    Reason.NONE: "no failure",
    Reason.READ_ERROR: "the file could not be read (missing, permission denied, I/O error)",
    Reason.NOT_AN_IMAGE: "the bytes are not in any image format we read (empty, text, unknown signature)",
    Reason.DECODE_ERROR: "an image signature, but the decoder rejected the data (corrupt)",
    Reason.TRUNCATED: "the file ends early (no JPEG EOI after the last scan / no PNG IEND chunk)",
    Reason.UNSUPPORTED_MODE: "decoded, but the pixel type or channel count is not one we convert",
    Reason.TOO_SMALL: "decoded, but the image is smaller than the source's min_size",
    Reason.BAD_ANNOTATION: "the sample's annotation file (e.g. AFLW2000 .mat) is missing or malformed",
    Reason.TOO_LARGE: "over a read limit (bytes per file or zip member, pixels per image): not decoded",
    Reason.NOT_A_FILE: "not a regular file (FIFO, device, folder, dangling or looping link): not read",
    Reason.BAD_NAME: "the file name is not valid UTF-8 (stored with replacement characters): rename the file",
    Reason.UNSUPPORTED_ARCHIVE: "a zip member that is encrypted or uses a compression method we cannot read",
    Reason.DUPLICATE_NAME: "a zip member whose name an earlier member already has (only the first is read)",
    Reason.NO_FACE: "the detector found no face",
    Reason.FIT_DIVERGED: "the 3DMM fit did not converge or left the image",
    Reason.NAN: "a stage produced NaN or infinite values",
    Reason.LOW_COVERAGE: "too few UV texels were observed to be useful",
    Reason.STAGE_ERROR: "a stage raised an unexpected exception (see the build log)",
}

_COMPRESSORS = ("zstd", "blosc-zstd", "blosc-lz4", "none")


class StoreMismatch(ValueError):
    """An existing store was built with different settings than this run."""


class StoreLocked(RuntimeError):
    """Another build holds the store's build lock."""


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class StoreLayout:
    """Shapes and storage settings of a store (recorded in its attributes)."""

    n_samples: int
    """N: samples (manifest entries) in the store."""
    image_size: int
    """H = W: working resolution of ``image``, ``face_region`` and ``face_mask_eroded``."""
    uv_size: int
    """U: side of the UV maps."""
    ctr_shape: tuple[int, int]
    """(hc, wc) of the centre crop (``common.uvlayout.CropLayout.ctr_region.shape``)."""
    sd_shape: tuple[int, int]
    """(hs, ws) of the side crop."""
    n_tex: int
    """K: texture-basis coefficients per sample."""
    chunk: int = 64
    """Samples per chunk (one build task writes one chunk)."""
    has_truth: bool = False
    """Synthetic stores also hold ``uv_true``."""
    has_occlusion: bool = False
    """The store holds ``occlusion`` (the build rejected occluders; stores written before it never do)."""
    chunk_records: bool = False
    """The store holds ``chunk_record``: per chunk, the SHA-256 of its data and the generation that wrote it
    (stores written before it never do; their chunks cannot be verified)."""
    compressor: str = "zstd"
    """One of zstd | blosc-zstd | blosc-lz4 | none."""
    clevel: int = 3
    """Compression level (zstd 1..22, blosc 1..9)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ctr_shape", tuple(int(v) for v in self.ctr_shape))
        object.__setattr__(self, "sd_shape", tuple(int(v) for v in self.sd_shape))
        for name in ("n_samples", "image_size", "uv_size", "chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"StoreLayout.{name}: expected >= 1, found {getattr(self, name)}")
        if self.n_tex < 0:
            raise ValueError(f"StoreLayout.n_tex: expected >= 0, found {self.n_tex}")
        for name in ("ctr_shape", "sd_shape"):
            shp = getattr(self, name)
            if len(shp) != 2 or min(shp) < 1:
                raise ValueError(f"StoreLayout.{name}: expected two positive sizes, found {shp}")
        if self.compressor not in _COMPRESSORS:
            raise ValueError(f"StoreLayout.compressor: expected one of {', '.join(_COMPRESSORS)}, "
                             f"found {self.compressor!r}")
        top = 22 if self.compressor == "zstd" else 9
        if self.compressor != "none" and not 1 <= self.clevel <= top:
            raise ValueError(f"StoreLayout.clevel: {self.compressor} takes 1..{top}, found {self.clevel}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk)

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``chunk_index``."""
        if not 0 <= chunk_index < self.n_chunks:
            raise IndexError(f"chunk index {chunk_index} out of range: the store has {self.n_chunks} chunks")
        start = chunk_index * self.chunk
        return start, min(start + self.chunk, self.n_samples)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ctr_shape"], d["sd_shape"] = list(self.ctr_shape), list(self.sd_shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> StoreLayout:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"store layout has unknown fields {sorted(unknown)}; written by a newer uvtex?")
        return cls(**{k: tuple(v) if k.endswith("_shape") else v for k, v in d.items()})


class ArraySpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


ARRAY_DOCS = {
    "image": "photo at the working resolution, (N, H, W, 3) uint8 RGB",
    "face_region": "projected face region before erosion (visible face triangles, and the segmentation when "
                   "the source has one), (N, H, W) bool",
    "face_mask_eroded": "face_region eroded: the mask uv_gt was read under, (N, H, W) bool",
    "uv_gt": "incomplete UV texture from the photo, (N, U, U, 3) uint8 RGB",
    "uv_gt_mask": "observed texels of uv_gt, (N, U, U) bool",
    "uv_bl": "blended complete UV texture, (N, U, U, 3) uint8 RGB",
    "uv_source": "per-texel source label of uv_bl, (N, U, U) uint8",
    "params": "62 3DMM parameters [sR|t](12) id(40) exp(10), (N, 62) float32",
    "pose": "yaw, pitch, roll in degrees, (N, 3) float32",
    "tex_coeff": "texture-basis coefficients, (N, K) float32",
    "uv_ctr": "centre UV crop, (N, hc, wc, 3) uint8",
    "uv_ctr_mask": "centre crop mask, (N, hc, wc) bool",
    "ctr_valid": "sample yields a centre crop, (N,) bool",
    "uv_sd": "side UV crop (mirrored to the face's left), (N, hs, ws, 3) uint8",
    "uv_sd_mask": "side crop mask, (N, hs, ws) bool",
    "sd_valid": "sample yields a side crop, (N,) bool",
    "uv_true": "synthetic ground-truth UV texture, (N, U, U, 3) uint8",
    "occlusion": "pixels inside the eroded projected mesh mask rejected as occluders (outside face_region), "
                 "(N, H, W) bool",
    "status": "0 pending, 1 ok, 2 failed, (N,) uint8",
    "reason": "failure reason code (common.store.Reason), (N,) uint8",
    "chunk_done": "1 once the chunk is completely written, (n_chunks,) uint8",
    "chunk_record": "per chunk: SHA-256 of its arrays as written (32 bytes) + the writing build's generation "
                    "(16 bytes), (n_chunks, 48) uint8",
    "manifest_path": "source key of each sample, (N,) variable-length UTF-8",
    "manifest_size": "source file size in bytes, (N,) int64",
    "manifest_mtime": "source modification time in POSIX seconds, (N,) float64",
}

MANIFEST_ARRAYS = ("manifest_path", "manifest_size", "manifest_mtime")
_MANIFEST_CHUNK = 65536


def array_specs(layout: StoreLayout) -> dict[str, ArraySpec]:
    """Every sample-aligned array of the schema plus ``chunk_done``: name -> (shape, dtype, chunks).

    Sample-aligned arrays are chunked ``(chunk, *full_rest)``; ``chunk_done`` is chunked (1,).
    The manifest arrays are described by :func:`manifest_specs`.
    """
    n, h, u, k, c = layout.n_samples, layout.image_size, layout.uv_size, layout.n_tex, layout.chunk
    hc, wc = layout.ctr_shape
    hs, ws = layout.sd_shape
    u8, b, f4 = np.dtype(np.uint8), np.dtype(bool), np.dtype(np.float32)
    rest: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "image": ((h, h, 3), u8), "face_region": ((h, h), b), "face_mask_eroded": ((h, h), b),
        "uv_gt": ((u, u, 3), u8), "uv_gt_mask": ((u, u), b), "uv_bl": ((u, u, 3), u8), "uv_source": ((u, u), u8),
        "params": ((N_PARAMS,), f4), "pose": ((3,), f4), "tex_coeff": ((k,), f4),
        "uv_ctr": ((hc, wc, 3), u8), "uv_ctr_mask": ((hc, wc), b), "ctr_valid": ((), b),
        "uv_sd": ((hs, ws, 3), u8), "uv_sd_mask": ((hs, ws), b), "sd_valid": ((), b),
    }
    if layout.has_truth:
        rest["uv_true"] = ((u, u, 3), u8)
    if layout.has_occlusion:
        rest["occlusion"] = ((h, h), b)
    rest["status"] = ((), u8)
    rest["reason"] = ((), u8)
    specs = {name: ArraySpec((n, *shp), dt, (min(c, n), *shp)) for name, (shp, dt) in rest.items()}
    specs["chunk_done"] = ArraySpec((layout.n_chunks,), u8, (1,))
    if layout.chunk_records:
        specs["chunk_record"] = ArraySpec((layout.n_chunks, RECORD_BYTES), u8, (1, RECORD_BYTES))
    return specs


def manifest_specs(layout: StoreLayout) -> dict[str, ArraySpec]:
    """The manifest arrays: name -> (shape, dtype, chunks); ``manifest_path`` has dtype ``str`` (VLen UTF-8)."""
    n = layout.n_samples
    ch = (min(n, _MANIFEST_CHUNK),)
    return {"manifest_path": ArraySpec((n,), np.dtype(object), ch),
            "manifest_size": ArraySpec((n,), np.dtype(np.int64), ch),
            "manifest_mtime": ArraySpec((n,), np.dtype(np.float64), ch)}


def _compressors(layout: StoreLayout):
    if layout.compressor == "none":
        return None
    if layout.compressor == "zstd":
        return (zarr.codecs.ZstdCodec(level=layout.clevel),)
    cname = layout.compressor.split("-", 1)[1]
    return (zarr.codecs.BloscCodec(cname=cname, clevel=layout.clevel, shuffle="shuffle"),)


def _fill(dtype: np.dtype):
    return np.nan if dtype.kind == "f" else (False if dtype.kind == "b" else 0)


# ---------------------------------------------------------------------------------------- manifest
def manifest_sha256(paths: Iterable[str], sizes: Iterable[int], mtimes: Iterable[float]) -> str:
    """Stable hex sha256 of a manifest: per entry ``utf8(path) 0x00 int64-le(size) float64-le(mtime)``, in order."""
    h = hashlib.sha256()
    for p, s, m in zip(paths, sizes, mtimes, strict=True):
        h.update(str(p).encode("utf-8") + b"\0" + struct.pack("<qd", int(s), float(m)))
    return h.hexdigest()


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


# ------------------------------------------------------------------------------------------ create
_REQUIRED_ATTRS = ("config", "face_model_hash", "texture_basis_hash")
_PROVENANCE_ATTRS = ("face_region_source",)
"""Attributes that say how arrays were made, not with which settings: not compared when a build resumes."""
_RESERVED_ATTRS = ("schema_version", "layout", "manifest", "created", "package_version")


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("uvtex")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _check_attrs(attrs: Mapping) -> dict:
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"store attrs: missing {missing}; expected at least {list(_REQUIRED_ATTRS)} "
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


def _is_url(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _local(path) -> Path | None:
    if isinstance(path, (str, os.PathLike)) and not _is_url(path):
        s = os.fspath(path)
        return Path(s[len("file://"):] if s.startswith("file://") else s)
    return None


def store_location(path) -> str:
    """Where a store is, as zarr opens it: a local path (``str``; ``file://`` stripped) or an fsspec URL, unchanged
    (``s3://bucket/store.zarr``, opened through s3fs).

    Credentials are never part of a location: they come from the environment or the usual config files
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` for another S3 server, fsspec's config), so a location is safe to record and to print. A URL
    that carries a password (``s3://KEY:SECRET@bucket/...``) is refused with ValueError, without echoing it.
    """
    local = _local(path)
    if local is not None:
        return str(local)
    if not isinstance(path, str):
        raise TypeError(f"store: expected a path or an fsspec URL, found {type(path).__name__}")
    parts = urlsplit(path)
    if parts.password is not None:
        raise ValueError(f"store URL {parts.scheme}://***@{parts.hostname or ''}{parts.path}: credentials in the URL "
                         f"are not accepted (they would be recorded and printed); set them in the environment "
                         f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials instead")
    return path


def _url_fs(url: str):
    """(fsspec filesystem, path in it) of a store URL: the filesystem zarr's FsspecStore uses for it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def store_exists(path) -> bool:
    """Whether a Zarr group is at ``path`` (a local path, ``file://`` or an fsspec URL); creates nothing."""
    local = _local(path)
    if local is not None:
        return (local / "zarr.json").is_file()
    try:
        open_store(path, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


def _non_store_entries(path) -> list[str] | None:
    """Names at ``path`` other than the build lock (None: nothing there) -- for refusing to write into a folder or
    prefix that holds something else."""
    local = _local(path)
    if local is not None:
        if not local.exists():
            return None
        return [local.name] if not local.is_dir() else _non_lock_entries(local)
    fs, where = _url_fs(store_location(path))
    fs.invalidate_cache(where)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(where, detail=False)]
    except FileNotFoundError:
        return None
    return [n for n in names if n != LOCK_NAME] if names else None


CREATING = "uvprep_creating"
"""Root attribute written before anything else when a store is created, replaced by the full attributes last: a
store that still carries it was interrupted while being created and holds no data."""


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
    _check_model_inputs(layout, face_model, crop_layout, mirror_index, crop_config, user["face_model_hash"])
    if store_exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already holds a store; resume it with open_for_build or pass "
                                  f"--overwrite to rebuild")
        group = open_store(path, mode="r+")
        if "schema_version" not in group.attrs and CREATING not in group.attrs:
            raise FileExistsError(f"{path} is a Zarr group that uvprep did not create (it has no schema "
                                  f"attributes); refusing to delete its arrays: choose another --out")
        _mark_creating(group)  # first: it drops the old `generation`, so the old build's tasks are fenced off now
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            members = list(group.keys())
        for name in members:
            del group[name]
    else:
        if _non_store_entries(path):
            raise FileExistsError(f"{path} exists and is not a Zarr store; refusing to write into it "
                                  f"(choose another --out or remove it yourself)")
        group = open_store(path, mode="a")
        _mark_creating(group)
    comp = _compressors(layout)
    for name, spec in array_specs(layout).items():
        a = group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                               fill_value=_fill(spec.dtype), compressors=comp if name not in PER_CHUNK else None,
                               attributes={"description": ARRAY_DOCS[name]})
        del a
    for name, spec in manifest_specs(layout).items():
        dtype = str if name == "manifest_path" else spec.dtype
        group.create_array(name, shape=spec.shape, dtype=dtype, chunks=spec.chunks, fill_value=_fill(spec.dtype)
                           if name != "manifest_path" else "", compressors=(zarr.codecs.ZstdCodec(level=3),),
                           attributes={"description": ARRAY_DOCS[name]})
    group["manifest_path"][:] = paths
    group["manifest_size"][:] = sizes
    group["manifest_mtime"][:] = mtimes
    write_face_model(group, layout, face_model, crop_layout, mirror_index, crop_config)
    root = {"schema_version": SCHEMA_VERSION, "layout": layout.to_json(), **user,
            "manifest": {"count": int(len(paths)), "sha256": manifest_sha256(paths, sizes, mtimes)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": _package_version()}
    group.attrs.put(root)
    return group


def _mark_creating(group: zarr.Group) -> None:
    group.attrs.put({CREATING: {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "pid": os.getpid()}})


def _non_lock_entries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name != LOCK_NAME]


def flatten_mapping(d, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": leaf}: the dotted keys config comparisons name (stores and training runs)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten_mapping(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def _differences(stored: Mapping, layout: StoreLayout, user: Mapping, m_count: int, m_sha: str) -> list[str]:
    diffs = []
    if stored.get("schema_version") != SCHEMA_VERSION:
        hint = f" (upgrade it in place: {_UPGRADE})" if stored.get("schema_version") in _UPGRADABLE else ""
        diffs.append(f"schema_version: store {stored.get('schema_version')}, this code {SCHEMA_VERSION}{hint}")
    want = {"layout": layout.to_json(), "config": user["config"]}
    want.update({k: user[k] for k in user if k != "config" and k not in _PROVENANCE_ATTRS})
    stored = dict(stored)
    with contextlib.suppress(KeyError, TypeError, ValueError):  # a layout written before a field existed: its default
        stored["layout"] = StoreLayout.from_json(stored["layout"]).to_json()
    for top, value in want.items():
        a, b = flatten_mapping(stored.get(top), top), flatten_mapping(value, top)
        for key in sorted(set(a) | set(b)):
            old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
            if old != new and not (old == "<absent>" and new is None):  # a setting added later, left off
                diffs.append(f"{key}: store {_short(old)}, this run {_short(new)}")
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
        diffs = _model_differences(group, face_model, crop_layout, mirror_index, crop_config)
    if diffs:
        raise StoreMismatch(f"{path} was built with different settings than this run:\n  - "
                            + "\n  - ".join(diffs) + "\npass --overwrite to rebuild")
    return group


def _manifest_diff(new, old) -> tuple[list[str], list[str], list[str]]:
    """(added, removed, changed) keys of manifest ``new`` relative to ``old``; each is (paths, sizes, mtimes)."""
    a = {str(p): (int(s), float(m)) for p, s, m in zip(*new, strict=True)}
    b = {str(p): (int(s), float(m)) for p, s, m in zip(*old, strict=True)}
    return (sorted(set(a) - set(b)), sorted(set(b) - set(a)), sorted(k for k in set(a) & set(b) if a[k] != b[k]))


# -------------------------------------------------------------------------------------------- lock
@dataclass(frozen=True)
class BuildLock:
    """A held build lock; release it (or use it as a context manager) when the build ends."""

    path: str
    """The lock file (a local path or a URL)."""
    info: dict
    """What the lock file holds: pid, host, user, owner, started, token."""

    def release(self) -> None:
        """Remove the lock file if it is still ours (a lock taken over by someone else is left alone)."""
        lock = _lock_file(self.path)
        held = lock.read()
        if held is not None and held.get("token") == self.info["token"]:
            lock.remove()

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


UNREADABLE_LOCK_AGE = 10.0
"""Seconds after which an empty or unreadable lock file (a build killed while writing it) counts as stale."""

EXCLUSIVE_CREATE = {"s3": ("s3fs", "2025.7.0"), "s3a": ("s3fs", "2025.7.0")}
"""URL schemes whose exclusive create (``open(..., "xb")``: a conditional PUT, ``If-None-Match: *``) the build lock
relies on, with the fsspec implementation and the first version that sends the condition for small objects
(s3fs 2025.7.0, fsspec/s3fs#974; earlier versions silently overwrite). Any other scheme has no lock: a build
there needs ``--no-lock``."""


@dataclass(frozen=True)
class _LockFile:
    """The lock file of a store: a local file (``O_CREAT | O_EXCL``, takeover by ``os.rename``) or an object
    (``fs.open(path, "xb")``, a conditional PUT that fails with FileExistsError when the object exists)."""

    where: str
    """For messages: the local path or the URL."""
    fs: Any = None
    """The fsspec filesystem of a URL; None for a local file."""
    path: str = ""
    """The lock's path in ``fs`` (URLs only)."""

    def create(self, info: dict) -> bool:
        """Write ``info`` unless the lock exists; False when it does."""
        data = json.dumps(info).encode()
        if self.fs is None:
            try:
                fd = os.open(self.where, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def read(self) -> dict | None:
        try:
            raw = Path(self.where).read_bytes() if self.fs is None else self.fs.cat_file(self.path)
            return json.loads(raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": "?", "started": "?", "note": "unreadable lock file"}

    def age(self) -> float:
        """Seconds since the lock was written (0 when unknown: never stale by age)."""
        if self.fs is None:
            return time.time() - os.stat(self.where).st_mtime
        try:
            written = self.fs.modified(self.path)
        except (NotImplementedError, AttributeError, ValueError):
            return 0.0
        if written.tzinfo is None:
            written = written.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - written).total_seconds()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.fs is None:
                os.unlink(self.where)
            else:
                self.fs.rm_file(self.path)

    def take_over(self, held: dict, token: str) -> dict | None:
        """Remove the stale lock ``held``; returns the holder when the lock changed hands meanwhile (a fresh lock
        taken in between, which is left alone), else None (removed, or already gone)."""
        if self.fs is None:  # atomic: of two processes taking over, only one moves the stale lock aside
            aside = f"{self.where}.stale-{token}"
            try:
                os.rename(self.where, aside)
            except FileNotFoundError:
                return None
            moved = _LockFile(aside).read()
            if moved is not None and moved.get("token") != held.get("token"):
                os.rename(aside, self.where)  # we moved a fresh lock taken in between: put it back
                return moved
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)
            return None
        # an object store has no atomic rename: read again and delete only the stale holder's lock (a fresh lock
        # written between that read and the delete would be lost; both takers must run on the dead build's host)
        now = self.read()
        if now is not None and now.get("token") != held.get("token"):
            return now
        self.remove()
        return None


def _stale(lock: _LockFile, held: dict, host: str) -> bool:
    """A lock from this host whose process has exited, or a lock file nobody could have finished writing."""
    if held.get("note") == "unreadable lock file":
        try:
            return lock.age() > UNREADABLE_LOCK_AGE
        except FileNotFoundError:
            return False
    return held.get("host") == host and not _pid_alive(int(held.get("pid", -1)))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


def _lock_file(path, create: bool = False) -> _LockFile:
    """The lock file of the store at ``path`` (or the lock file itself, a path ending in :data:`LOCK_NAME`).
    create: raise NotImplementedError (saying ``--no-lock``) where exclusive create is not trusted."""
    where = store_location(path)
    if not where.rstrip("/").endswith(LOCK_NAME):
        where = where.rstrip("/") + "/" + LOCK_NAME
    if _local(where) is not None:
        return _LockFile(where)
    scheme = urlsplit(where).scheme
    if create:
        need = EXCLUSIVE_CREATE.get(scheme)
        from importlib.metadata import PackageNotFoundError, version

        try:
            have = version(need[0]) if need else None
        except PackageNotFoundError:
            have = None
        if need is None or have is None or _version_tuple(have) < _version_tuple(need[1]):
            what = (f"{need[0]} >= {need[1]} is needed for its exclusive create (found {have or 'none'}: "
                    f"pip install 'uvtex[s3]')" if need else
                    f"{scheme}:// has no exclusive create the build lock trusts (it does for local paths and s3://)")
            raise NotImplementedError(f"build lock: {path}: {what}. Without a lock two builds into one store would "
                                      f"corrupt it: make sure only one runs and pass --no-lock")
    fs, lock_path = _url_fs(where)
    return _LockFile(where, fs, lock_path)


def read_build_lock(path) -> dict | None:
    """The current holder of the store's build lock (pid, host, user, owner, started), or None."""
    return _lock_file(path).read()


def acquire_build_lock(path, owner: str = "uvprep build") -> BuildLock:
    """Take the store's build lock (creating the store folder if needed) or raise :class:`StoreLocked`.

    The lock is the object :data:`LOCK_NAME` inside the store, created only if absent: ``O_CREAT | O_EXCL`` on a
    local (or POSIX network) file system, a conditional PUT (``If-None-Match: *``) on S3 (:data:`EXCLUSIVE_CREATE`;
    other URL schemes raise NotImplementedError: run one build per store there, ``--no-lock``). A lock whose holder
    ran on this host and whose pid is no longer alive is stale and taken over (locally moved aside atomically with
    ``os.rename``, so of two processes taking over only one wins). A lock from another host cannot be checked: the
    message says how to clear it by hand.
    """
    lock = _lock_file(path, create=True)
    if lock.fs is None:
        Path(lock.where).parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "user": _user(), "owner": owner,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    held = None
    for _ in range(3):
        if lock.create(info):
            return BuildLock(lock.where, info)
        held = lock.read()
        if held is None:
            continue  # released meanwhile
        if _stale(lock, held, host):
            fresh = lock.take_over(held, info["token"])
            if fresh is not None:
                held = fresh
                break
            continue
        break
    if held is None:
        raise StoreLocked(f"could not take the build lock {lock.where}: it kept changing hands; try again")
    raise StoreLocked(
        f"{path} is being built by pid {held.get('pid')} on {held.get('host')} (user {held.get('user', '?')}, "
        f"{held.get('owner', '?')}, started {held.get('started')}). Wait for it to finish. If that build is dead "
        f"(e.g. its machine crashed), delete {lock.where} and run again; a lock from this host whose process has "
        f"exited is taken over automatically.")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "?"


# ------------------------------------------------------------------------------------------- write
def open_store(path, mode: str = "r") -> zarr.Group:
    """The store's root group (a local path, ``file://`` or an fsspec URL; see :func:`store_location`).

    Opened as Zarr v3 directly: zarr's format probe would look for v2 metadata first, which on object storage costs
    six requests (a HEAD and a listing per missing key) on every open."""
    return zarr.open_group(store_location(path), mode=mode, zarr_format=3)


def _open(path_or_group, mode: str) -> zarr.Group:
    if isinstance(path_or_group, zarr.Group):
        return path_or_group
    return open_store(path_or_group, mode)


def layout_of(group: zarr.Group) -> StoreLayout:
    """The :class:`StoreLayout` recorded in a store's attributes (refuses other schema versions, saying
    what a version-1 store lacks and how to upgrade it)."""
    attrs = group.attrs
    ver = attrs.get("schema_version")
    if ver == SCHEMA_VERSION:
        return StoreLayout.from_json(attrs["layout"])
    where = _where(group)
    if ver in _UPGRADABLE:
        raise StoreMismatch(f"{where} has store schema version {ver}, this code reads version {SCHEMA_VERSION}: "
                            f"{'; '.join(_v1_gaps(group))}. Upgrade it in place with `uvprep upgrade {where}` "
                            f"(or rebuild it: uvprep build ... --overwrite)")
    if isinstance(ver, int) and ver > SCHEMA_VERSION:
        raise StoreMismatch(f"{where} has store schema version {ver}, newer than this code's {SCHEMA_VERSION}: "
                            f"it was written by a newer uvtex; update uvtex to read it")
    raise StoreMismatch(f"{where}: store schema version {ver}, this code reads version {SCHEMA_VERSION}; "
                        f"rebuild the store with this version (pass --overwrite)")


def _where(group: zarr.Group) -> str:
    """The store's path or URL, for messages."""
    store = group.store
    root = getattr(store, "root", None)
    if root is not None:
        return str(root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and path is not None:
        return str(fs.unstrip_protocol(path))
    return str(store)


_UPGRADABLE = (1,)
_UPGRADE = "uvprep upgrade STORE"


def _v1_gaps(group: zarr.Group) -> list[str]:
    """What a version-1 store lacks compared with this schema (for the refusal message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        members = set(group.keys())
    gaps = [f"no {g}/ group ({what})" for g, what in ((MODEL_GROUP, "the face model"),
                                                       (UV_LAYOUT_GROUP, "crop boxes/masks, texel mirror index"))
            if g not in members]
    if "face_region" not in members:
        gaps.append("no face_region array (the face region before erosion, for the masked input I^m)")
    if "face_mask" in members:
        gaps.append("face_mask must be renamed face_mask_eroded")
    return gaps or ["its schema_version attribute is old"]


def _coerce(name: str, value, spec: ArraySpec, n: int) -> np.ndarray:
    a = np.asarray(value)
    want = (n, *spec.shape[1:])
    if a.shape != want:
        raise ValueError(f"write_chunk: {name} expected shape {want}, found {a.shape}")
    dt = spec.dtype
    if dt.kind == "b" and a.dtype.kind != "b":
        raise TypeError(f"write_chunk: {name} is a bool mask, found {a.dtype}; pass a bool array")
    if dt.kind in "ui" and a.dtype.kind not in "ui":
        raise TypeError(f"write_chunk: {name} is {dt}, found {a.dtype}; convert images with "
                        f"common.imageio.to_uint8 first")
    if dt.kind in "ui" and a.size and (a.min() < np.iinfo(dt).min or a.max() > np.iinfo(dt).max):
        raise ValueError(f"write_chunk: {name} values must lie in [{np.iinfo(dt).min}, {np.iinfo(dt).max}], "
                         f"found [{a.min()}, {a.max()}]")
    if dt.kind == "f" and a.dtype.kind not in "fiub":
        raise TypeError(f"write_chunk: {name} is {dt}, found {a.dtype}")
    return a.astype(dt, copy=False)


def write_chunk(path_or_group, chunk_index: int, arrays: Mapping[str, np.ndarray],
                generation: str | None = None) -> None:
    """Write one chunk-aligned region (samples ``chunk_bounds(chunk_index)``), then mark it done.

    generation: the writing build's token (:func:`start_generation`). The write is refused with
    :class:`StaleWriter` when the store's current generation differs (a newer build took the store over:
    this task belongs to a dead client), checked before the data and again before the completion record. A write
    refused at the second check has already put its data into the newer build's chunk: it marks the chunks holding
    its rows pending again (``chunk_done = 0``), so the store never claims a chunk that it may have overwritten.
    With ``layout.chunk_records`` the record holds the SHA-256 of everything written and the generation.

    path_or_group: the store path or URL (workers should pass the path: the store is opened here, so
    nothing zarr-related is pickled) or an open group. arrays: name -> (n, ...) values for the n
    samples of the chunk, dtypes as in :func:`array_specs` (integers and floats are range-checked and
    cast; masks must be bool). ``status`` is required and must be OK or FAILED for every sample;
    ``reason`` is required when any sample failed (default 0). Arrays not given are reset to their
    fill value (NaN / 0 / False), so rewriting a chunk on resume leaves nothing of an earlier,
    interrupted attempt. Order: data arrays, ``reason``, ``status``, and last
    ``chunk_done[chunk_index] = 1``. All checks run before anything is written.
    """
    group = _open(path_or_group, "r+")
    layout = layout_of(group)
    specs = array_specs(layout)
    start, stop = layout.chunk_bounds(int(chunk_index))
    n = stop - start
    unknown = sorted(set(arrays) - (set(specs) - set(PER_CHUNK)))
    if unknown:
        raise KeyError(f"write_chunk: unknown arrays {unknown}; the schema has "
                       f"{sorted(set(specs) - set(PER_CHUNK))}")
    if "status" not in arrays:
        raise KeyError("write_chunk: 'status' is required (OK or FAILED for every sample of the chunk)")
    data = {k: _coerce(k, v, specs[k], n) for k, v in arrays.items()}
    status = data["status"]
    if not np.isin(status, (OK, FAILED)).all():
        raise ValueError(f"write_chunk: status must be OK (1) or FAILED (2) for every sample, found "
                         f"{sorted(set(np.unique(status).tolist()))}")
    reason = data.setdefault("reason", np.zeros(n, np.uint8))
    known = [r.value for r in Reason]
    if not np.isin(reason, known).all():
        raise ValueError(f"write_chunk: unknown reason codes {sorted(set(reason.tolist()) - set(known))}")
    if ((status == FAILED) & (reason == Reason.NONE)).any() or ((status == OK) & (reason != Reason.NONE)).any():
        raise ValueError("write_chunk: failed samples need a reason != 0 and OK samples reason 0")
    if generation is not None:
        _check_generation(path_or_group, group, generation, chunk_index)
    written = {"reason": reason, "status": status}
    for name, spec in specs.items():
        if name not in ("status", "reason", *PER_CHUNK):
            value = data.get(name)
            if value is None:
                value = np.full((n, *spec.shape[1:]), _fill(spec.dtype), spec.dtype)  # all-fill: no object stored
            group[name][start:stop] = value
            written[name] = np.asarray(value, spec.dtype)
    group["reason"][start:stop] = reason
    group["status"][start:stop] = status
    if generation is not None:  # the window in which a newer build could have started is this write
        try:
            _check_generation(path_or_group, group, generation, chunk_index)
        except StaleWriter as e:
            _unmark_rows(path_or_group, start, stop)
            raise StaleWriter(f"{e}; its data was written before the takeover was seen, so the chunk is marked "
                              f"pending again") from None
    if layout.chunk_records:
        token = bytes.fromhex(generation)[:16].ljust(16, b"\0") if generation else bytes(16)
        group["chunk_record"][chunk_index] = np.frombuffer(_digest(written) + token, np.uint8)
    group["chunk_done"][chunk_index] = 1


RECORD_BYTES = 48
PER_CHUNK = ("chunk_done", "chunk_record")
"""Arrays indexed by chunk, not by sample."""
GENERATION = "generation"
"""Root attribute: the token of the build that currently owns the store (a new one per ``uvprep build`` run)."""


class StaleWriter(RuntimeError):
    """A chunk write from a build that no longer owns the store (its generation was replaced)."""


def start_generation(path) -> str:
    """Give the store a new generation token (call with the build lock held); returns it (32 hex digits)."""
    token = uuid.uuid4().hex
    _open(path, "r+").attrs[GENERATION] = token
    return token


def _check_generation(path_or_group, group: zarr.Group, generation: str, chunk_index: int) -> None:
    fresh = open_store(path_or_group, mode="r") if not isinstance(path_or_group, zarr.Group) \
        else group
    current = fresh.attrs.get(GENERATION)
    if current != generation:
        raise StaleWriter(f"chunk {chunk_index}: the store now belongs to build generation {str(current)[:8]}, this "
                          f"task to {generation[:8]}: a newer build took it over; this write is refused")


def _unmark_rows(path_or_group, start: int, stop: int) -> None:
    """``chunk_done = 0`` for the chunks of the store's *current* layout that hold samples [start, stop)."""
    try:
        group = _open(path_or_group, "r+")
        layout = layout_of(group)
        first, last = start // layout.chunk, min((stop - 1) // layout.chunk, layout.n_chunks - 1)
        if first <= last:
            group["chunk_done"][first:last + 1] = 0
    except Exception:  # noqa: BLE001 - a store being recreated: its new owner writes every chunk anyway
        pass


def mark_pending(path_or_group, chunks: Iterable[int]) -> None:
    """``chunk_done = 0`` for these chunks: the next write of each (this build's or a resume's) redoes it."""
    group = _open(path_or_group, "r+")
    for c in chunks:
        group["chunk_done"][int(c)] = 0


def _digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of a chunk's arrays in a canonical form (sorted names, C order, the schema dtypes)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def verify_chunks(path_or_group, chunks: Iterable[int] | None = None) -> dict[int, str]:
    """Re-read completed chunks and compare them with their records: chunk -> problem, for each bad one.

    chunks: which to check (default: every completed chunk). Finds deleted, truncated or altered chunk files
    of any array (a deleted one reads back as fill values). A store without ``chunk_record`` has nothing to
    compare with: {} (its chunks are unverifiable).
    """
    group = _open(path_or_group, "r")
    layout = layout_of(group)
    if not layout.chunk_records:
        return {}
    specs = array_specs(layout)
    if chunks is None:
        todo = np.flatnonzero(group["chunk_done"][:] == 1)
    else:  # one (1,)-chunk per flag: read only those asked about (a task verifying one chunk of thousands)
        todo = [int(c) for c in chunks if group["chunk_done"][int(c)] == 1]
    bad = {}
    for c in todo:
        start, stop = layout.chunk_bounds(int(c))
        record = bytes(np.asarray(group["chunk_record"][int(c)], np.uint8))
        try:
            got = _digest({name: np.asarray(group[name][start:stop], spec.dtype)
                           for name, spec in specs.items() if name not in PER_CHUNK})
        except Exception as e:  # noqa: BLE001 - a chunk file the codec cannot read is damaged
            bad[int(c)] = f"unreadable ({type(e).__name__}: {e})"
            continue
        if got != record[:32]:
            bad[int(c)] = "data does not match its SHA-256 record (deleted, truncated or altered chunk files)"
    return bad


def repair_for_resume(path, verify: bool = False) -> list[str]:
    """Before a build resumes: check the store's structure and make every chunk that is not provably complete
    pending again; returns what was done (one line each).

    Missing sample arrays (an interrupted ``--overwrite`` or a deleted folder) are recreated empty and every chunk
    is redone. A chunk marked done whose ``status`` holds PENDING samples (a deleted ``status`` chunk) is redone.
    With ``verify`` every completed chunk is re-read and compared with its SHA-256 record (:func:`verify_chunks`);
    a bad one is redone. Arrays with the wrong shape, dtype or chunking cannot be repaired: :class:`StoreMismatch`
    with the problems.
    """
    group = _open(path, "r+")
    layout = layout_of(group)
    specs = array_specs(layout)
    notes: list[str] = []
    wrong = [p for p in _check_schema(group, layout) if not p.endswith(": missing") and not p.startswith("unexpected")]
    if wrong:
        raise StoreMismatch(f"{path}: cannot resume a store whose arrays do not match the schema: {'; '.join(wrong)}; "
                            f"pass --overwrite to rebuild it")
    missing = [name for name in specs if name not in group]
    if missing:
        comp = _compressors(layout)
        for name in missing:
            spec = specs[name]
            group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                               fill_value=_fill(spec.dtype), compressors=comp if name not in PER_CHUNK else None,
                               attributes={"description": ARRAY_DOCS[name]})
        group["chunk_done"][:] = 0
        notes.append(f"arrays {missing} were missing: recreated, every chunk is rebuilt")
        return notes
    done = group["chunk_done"][:] == 1
    st = group["status"][:]
    pending = np.add.reduceat((st == PENDING).astype(np.int64), np.arange(0, len(st), layout.chunk)) > 0
    redo = {int(c): "marked done but holds PENDING samples" for c in np.flatnonzero(done & pending)}
    if verify:
        redo.update(verify_chunks(group))
    for c, why in sorted(redo.items()):
        group["chunk_done"][c] = 0
        notes.append(f"chunk {c}: {why}: rebuilt")
    return notes


def completed_chunks(path_or_group) -> np.ndarray:
    """(n_chunks,) bool: chunks whose writer finished (``chunk_done == 1``)."""
    return _open(path_or_group, "r")["chunk_done"][:] == 1


# -------------------------------------------------------------------------------------------- read
class StoreReader:
    """Read-only access to a finished or partial store (local path or a URL zarr understands)."""

    def __init__(self, path) -> None:
        self.path = path
        self.group = open_store(path, mode="r")
        self.layout = layout_of(self.group)
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.layout.n_samples

    def __repr__(self) -> str:
        return f"StoreReader({self.path!r}, n={len(self)}, image_size={self.layout.image_size})"

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def names(self) -> list[str]:
        """Sample-aligned array names (everything :meth:`sample` returns besides ``index`` and ``path``)."""
        return [k for k in array_specs(self.layout) if k not in PER_CHUNK]

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def ok_indices(self) -> np.ndarray:
        """(n_ok,) int64 indices of samples with status OK, ascending."""
        return np.flatnonzero(self.status() == OK)

    def paths(self) -> np.ndarray:
        """(N,) source keys (manifest order)."""
        return np.asarray(self.group["manifest_path"][:], dtype=object)

    def sample(self, i: int, names: Sequence[str] | None = None) -> dict[str, Any]:
        """All arrays (or ``names``) of sample ``i`` with its leading axis dropped, plus ``index`` and ``path``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        i = int(i) % n
        out: dict[str, Any] = {k: self.array(k)[i] for k in self._names(names)}
        out["index"], out["path"] = i, str(self.array("manifest_path")[i])
        return out

    def batch(self, indices, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays (or ``names``) for ``indices`` (any order, repeats allowed): name -> (len(indices), ...)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"batch indices must lie in [0, {len(self)}), found [{idx.min()}, {idx.max()}]")
        uniq, inv = np.unique(idx, return_inverse=True)
        out = {k: self.array(k).get_orthogonal_selection((uniq,))[inv] for k in self._names(names)}
        out["index"] = idx
        return out

    def array(self, name: str) -> zarr.Array:
        """The array ``name``, opened once per reader (``group[name]`` reads its metadata each time: a request per
        array and call on object storage)."""
        key = f"array:{name}"
        if key not in self._cache:
            self._cache[key] = self.group[name]
        return self._cache[key]

    def _names(self, names) -> list[str]:
        if names is None:
            return self.names
        bad = sorted(set(names) - set(self.names))
        if bad:
            raise KeyError(f"unknown arrays {bad}; the store has {self.names}")
        return list(names)

    def counts(self) -> dict[str, Any]:
        """{"ok", "failed", "pending", "failed_by_reason": {short name: n}, "chunks_done", "n_chunks"}."""
        st, rs = self.status(), self.group["reason"][:]
        by = {Reason(int(r)).short if int(r) in Reason._value2member_map_ else f"unknown_{int(r)}": int(c)
              for r, c in zip(*np.unique(rs[st == FAILED], return_counts=True), strict=True)}
        return {"ok": int((st == OK).sum()), "failed": int((st == FAILED).sum()), "pending": int((st == PENDING).sum()),
                "failed_by_reason": by, "chunks_done": int(completed_chunks(self.group).sum()),
                "n_chunks": self.layout.n_chunks}

    def failures(self) -> list[tuple[int, str, str]]:
        """(index, source key, reason short name) of every failed sample."""
        st, rs = self.status(), self.group["reason"][:]
        idx = np.flatnonzero(st == FAILED)
        paths = self.group["manifest_path"][idx] if idx.size else []
        return [(int(i), str(p), Reason(int(rs[i])).short if int(rs[i]) in Reason._value2member_map_ else "?")
                for i, p in zip(idx, paths, strict=True)]

    def storage(self) -> dict[str, tuple[int, int]]:
        """name -> (stored bytes, raw bytes) for every array (stored bytes exclude metadata)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            return {k: (int(a.nbytes_stored()), int(a.nbytes)) for k, a in self.group.arrays()}

    def validate(self) -> list[str]:
        """Problems found (empty when the store is sound): see :func:`validate_store`."""
        return validate_store(self.group)

    # what a trainer needs besides the samples (read once, then cached on this reader)
    def face_model(self) -> FaceModel:
        """The face model the store was built with (``model/``): a :class:`common.facemodel.FaceModel` with
        mean_shape (V, 3), id_basis (V, 3, Kid), exp_basis (V, 3, Kexp) float32, triangles (F, 3) int64,
        uv (V, 2) float32, symmetry (V,) int64, regions name -> (V,) bool, keypoints (68,) int64 or None.
        ``face_model().fingerprint() == attrs["face_model_hash"]``."""
        if "face_model" not in self._cache:
            self._cache["face_model"] = read_face_model(self.group)
        return self._cache["face_model"]

    def _uv_layout(self) -> tuple[CropLayout, np.ndarray, CropConfig]:
        if "uv_layout" not in self._cache:
            self._cache["uv_layout"] = read_uv_layout(self.group)
        return self._cache["uv_layout"]

    def crop_layout(self) -> CropLayout:
        """Where the partial crops are cut (``uv_layout/``): boxes (row0, row1, col0, col1) in the U x U UV image,
        ctr_region (hc, wc) bool, sd_region (hs, ws) bool; see :mod:`common.uvlayout`."""
        return self._uv_layout()[0]

    def mirror_index(self) -> np.ndarray:
        """(U*U,) int64: flat index of each texel's mirror texel, -1 where none (``common.uvtools.texel_mirror_index``,
        used with ``common.uvlayout.mirror_uv``)."""
        return self._uv_layout()[1]

    def crop_config(self) -> CropConfig:
        """The crop thresholds the build used: frontal_yaw_max, profile_yaw_min (degrees), min_coverage, margin."""
        return self._uv_layout()[2]

    def texture_basis(self) -> UVTextureBasis | None:
        """The UV texture basis of Eq. 8 (``texture/``): mean (U, U, 3), basis (U, U, 3, K) float32 (stored
        float16), valid (U, U) bool; None while the build has not written it yet."""
        if "texture" not in self._cache:
            t = read_texture_basis(self.group)
            if t is None:
                return None
            self._cache["texture"] = UVTextureBasis(mean=t["mean"], basis=t["basis"], valid=t["valid"], name=t["name"])
        return self._cache["texture"]


def _examples(mask: np.ndarray, offset: int = 0, k: int = 5) -> str:
    idx = np.flatnonzero(mask)[:k] + offset
    return ", ".join(str(int(i)) for i in idx) + (", ..." if mask.sum() > k else "")


def _check_schema(group: zarr.Group, layout: StoreLayout) -> list[str]:
    problems = []
    specs = {**array_specs(layout), **manifest_specs(layout)}
    for name, spec in specs.items():
        if name not in group:
            problems.append(f"{name}: missing")
            continue
        a = group[name]
        dtype_ok = (a.dtype.kind in "OTU" or str(a.dtype).startswith("StringDType")) if name == "manifest_path" \
            else a.dtype == spec.dtype
        if tuple(a.shape) != spec.shape or not dtype_ok or tuple(a.chunks) != spec.chunks:
            problems.append(f"{name}: expected shape {spec.shape} {spec.dtype} chunks {spec.chunks}, found "
                            f"{tuple(a.shape)} {a.dtype} chunks {tuple(a.chunks)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        extra = sorted(set(group.array_keys()) - set(specs))
    if extra:
        problems.append(f"unexpected arrays {extra} (not in schema version {SCHEMA_VERSION})")
    return problems


def _check_values(group: zarr.Group, layout: StoreLayout) -> list[str]:
    problems = []
    st, rs, done = group["status"][:], group["reason"][:], group["chunk_done"][:]
    if not np.isin(st, list(Status)).all():
        problems.append(f"status: values outside {{0, 1, 2}} at samples {_examples(~np.isin(st, list(Status)))}")
    if not np.isin(done, (0, 1)).all():
        problems.append("chunk_done: values other than 0 / 1")
    if not np.isin(rs, [r.value for r in Reason]).all():
        problems.append(f"reason: unknown codes at samples {_examples(~np.isin(rs, [r.value for r in Reason]))}")
    if ((st == FAILED) & (rs == 0)).any():
        problems.append(f"reason: failed samples without a reason: {_examples((st == FAILED) & (rs == 0))}")
    if ((st == OK) & (rs != 0)).any():
        problems.append(f"reason: OK samples with a failure reason: {_examples((st == OK) & (rs != 0))}")
    per_chunk_pending = np.add.reduceat((st == PENDING).astype(np.int64), np.arange(0, len(st), layout.chunk))
    bad = (done == 1) & (per_chunk_pending > 0)
    if bad.any():
        problems.append(f"chunk_done: chunks {_examples(bad)} are marked done but hold PENDING samples")
    ok = st == OK
    if ok.any():
        for name in ("params", "pose", "tex_coeff"):
            vals = group[name][:]
            nonfinite = ok & ~np.isfinite(vals.reshape(len(vals), -1)).all(1)
            if nonfinite.any():
                problems.append(f"{name}: {int(nonfinite.sum())} OK samples have NaN/inf values: "
                                f"{_examples(nonfinite)}")
            if name == "pose":
                lim = np.array([90.0, 180.0, 180.0], np.float32)
                with np.errstate(invalid="ignore"):
                    out = ok & (np.abs(vals) > lim + 1e-3).any(1)
                if out.any():
                    problems.append(f"pose: {int(out.sum())} OK samples outside |yaw| <= 90, |pitch|, |roll| <= 180 "
                                    f"degrees: {_examples(out)}")
    return problems


def validate_store(path_or_group) -> list[str]:
    """Check a store against the schema; returns human-readable problems (empty list: sound).

    Checks: schema version and attributes; every array present with the schema's shape, dtype and
    chunks (bool masks are bool by dtype); no unexpected arrays; manifest sorted with unique keys and
    matching its recorded sha256; status / reason / chunk_done codes valid and consistent (a chunk
    marked done holds no PENDING sample, failed samples carry a reason); OK samples have finite
    ``params``, ``pose`` and ``tex_coeff`` and a pose within |yaw| <= 90, |pitch|, |roll| <= 180;
    the ``model/`` group is complete, its arrays hash to its recorded fingerprint and that equals the
    root ``face_model_hash``; the ``uv_layout/`` group is complete, fits the layout (U, crop shapes,
    mirror index (U*U,) in [-1, U*U)) and was computed for the same model. Image pixels are not read.
    """
    group = _open(path_or_group, "r")
    try:
        layout = layout_of(group)
    except (StoreMismatch, KeyError, ValueError, TypeError) as e:
        return [f"attributes: {e}"]
    missing = [k for k in (*_REQUIRED_ATTRS, "manifest", "created") if k not in group.attrs]
    problems = [f"attributes: missing {missing}"] if missing else []
    problems += _check_schema(group, layout)
    problems += _check_model_group(group) + _check_uv_layout_group(group, layout)
    if any(p.split(":")[0] in ("status", "reason", "chunk_done", "params", "pose", "tex_coeff") for p in problems):
        return problems
    problems += _check_values(group, layout)
    if not any(p.startswith("manifest") for p in problems):
        paths = [str(p) for p in group["manifest_path"][:]]
        if any(a >= b for a, b in zip(paths, paths[1:], strict=False)):
            problems.append("manifest_path: keys are not sorted and unique")
        sha = manifest_sha256(paths, group["manifest_size"][:], group["manifest_mtime"][:])
        if sha != group.attrs.get("manifest", {}).get("sha256"):
            problems.append("manifest: arrays do not match the recorded sha256 (edited after creation?)")
    return problems


# ---------------------------------------------------------------------------- face model, UV layout
MODEL_GROUP = "model"
UV_LAYOUT_GROUP = "uv_layout"
_MODEL_ARRAYS = {"mean_shape": np.float32, "id_basis": np.float32, "exp_basis": np.float32, "triangles": np.int64,
                 "uv": np.float32, "symmetry": np.int64}
_MODEL_OPTIONAL = {"keypoints": np.int64, "tex_mean": np.float32, "tex_basis": np.float32}


def _check_model_inputs(layout: StoreLayout, model: FaceModel, crops: CropLayout, mirror_index: np.ndarray,
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
        raise TypeError(f"crop_config: expected a common.uvlayout.CropConfig, found {type(crop_config).__name__}")
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
    for name, arr in arrays.items():
        if name in group:
            del group[name]
        group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape or None,
                           compressors=(zarr.codecs.ZstdCodec(level=3),))[...] = arr


def write_face_model(path_or_group, layout: StoreLayout, model: FaceModel, crop_layout: CropLayout,
                     mirror_index: np.ndarray, crop_config: CropConfig) -> None:
    """Write (or rewrite) the ``model/`` and ``uv_layout/`` groups (module docstring) of a store with ``layout``.

    model: the :class:`common.facemodel.FaceModel` (arrays stored exactly as held, float32 / int64);
    crop_layout: :func:`common.uvlayout.crop_layout` at ``layout.uv_size`` with ``crop_config``;
    mirror_index: (U*U,) int64 (:func:`common.uvtools.texel_mirror_index`). Each group's attributes are
    written last, so a group with its attributes is complete. Called by :func:`create_store` (and by
    ``uvprep upgrade`` for a version-1 store); everything is checked before anything is written.
    """
    _check_model_inputs(layout, model, crop_layout, mirror_index, crop_config)
    group = _open(path_or_group, "r+")
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
        raise KeyError(f"{_where(group)} has no {name}/ group (a version-1 store? see `{_UPGRADE}`)")
    g = group[name]
    if key not in g.attrs:
        raise KeyError(f"{_where(group)}: the {name}/ group is incomplete (its creation was interrupted); "
                       f"rebuild the store (--overwrite)")
    return g


def read_face_model(path_or_group) -> FaceModel:
    """The face model stored in ``model/``, as a :class:`common.facemodel.FaceModel` (no per-vertex texture
    basis unless the model had one); its ``fingerprint()`` equals the store's ``face_model_hash``."""
    from common.facemodel import FaceModel

    m = _complete_group(_open(path_or_group, "r"), MODEL_GROUP, "fingerprint")
    attrs = dict(m.attrs)
    regions = m["regions"][...]
    if regions.shape[0] != len(attrs["region_names"]):
        raise ValueError(f"model/regions has {regions.shape[0]} rows for {len(attrs['region_names'])} region names")
    opt = {k: m[k][...] if k in m else None for k in _MODEL_OPTIONAL}
    return FaceModel(name=attrs["name"], **{k: m[k][...] for k in _MODEL_ARRAYS},
                     regions=dict(zip(attrs["region_names"], regions, strict=True)), meta=attrs.get("meta", {}), **opt)


def read_uv_layout(path_or_group) -> tuple[CropLayout, np.ndarray, CropConfig]:
    """The stored ``uv_layout/``: (crop layout, mirror index (U*U,) int64, crop config)."""
    g = _complete_group(_open(path_or_group, "r"), UV_LAYOUT_GROUP, "face_model")
    a = dict(g.attrs)
    crops = CropLayout(int(a["uv_size"]), tuple(a["ctr_box"]), tuple(a["sd_box"]), g["ctr_region"][...],
                       g["sd_region"][...])
    return crops, g["mirror_index"][...], CropConfig(**a["crop_config"])


def _model_differences(group: zarr.Group, model: FaceModel, crops: CropLayout, mirror_index: np.ndarray,
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


def _check_model_group(group: zarr.Group) -> list[str]:
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


def _check_uv_layout_group(group: zarr.Group, layout: StoreLayout) -> list[str]:
    try:
        crops, mirror, config = read_uv_layout(group)
        _check_uv_layout_inputs(layout, crops, mirror, config)
    except (KeyError, ValueError, TypeError) as e:
        return [f"uv_layout: {e}"]
    fp, want = group[UV_LAYOUT_GROUP].attrs["face_model"], group.attrs.get("face_model_hash")
    return [] if fp == want else [f"uv_layout: computed for face model {fp}, the store's face_model_hash is {want}"]


# ---------------------------------------------------------------------------------- schema upgrades
def add_sample_array(group: zarr.Group, layout: StoreLayout, name: str) -> zarr.Array:
    """Create the schema's sample-aligned array ``name`` (all fill values) in an existing store, replacing
    one of that name (an interrupted earlier attempt). For upgrading a store to a schema that added it."""
    spec = array_specs(layout)[name]
    if name in group:
        del group[name]
    return group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                              fill_value=_fill(spec.dtype), compressors=_compressors(layout),
                              attributes={"description": ARRAY_DOCS[name]})


def rename_array(group: zarr.Group, old: str, new: str) -> None:
    """Rename an array (zarr v3 has no rename): create ``new`` with the same shape, dtype, chunks, codecs and
    fill value, copy it chunk by chunk along the first axis, then delete ``old``. A ``new`` left by an
    interrupted rename is replaced; nothing happens when ``old`` is gone and ``new`` exists (already renamed)."""
    if old not in group:
        if new in group:
            return
        raise KeyError(f"{_where(group)}: neither {old} nor {new} exists")
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
    record = {"from": int(from_version), "to": SCHEMA_VERSION, "package_version": _package_version(),
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    group.attrs.update({**json.loads(json.dumps(dict(attrs))), "upgraded": record, "schema_version": SCHEMA_VERSION})


# ------------------------------------------------------------------------------------ texture basis
TEXTURE_GROUP = "texture"


def write_texture_basis(path_or_group, mean: np.ndarray, basis: np.ndarray, valid: np.ndarray, name: str,
                        fingerprint: str) -> None:
    """Store the linear UV texture model the build used (``texture/{mean,basis,valid}``), written once.

    mean: (U, U, 3) float32; basis: (U, U, 3, K) float32 (stored float16); valid: (U, U) bool. The group's
    attributes hold ``name`` and ``fingerprint``; it is written last, so a present fingerprint means complete.
    """
    group = _open(path_or_group, "r+")
    tex = group.require_group(TEXTURE_GROUP)
    for key, arr, dt in (("mean", mean, np.float32), ("basis", basis, np.float16), ("valid", valid, bool)):
        arr = np.asarray(arr, dt)
        if key in tex:
            del tex[key]
        tex.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape,
                         compressors=(zarr.codecs.ZstdCodec(level=3),))[...] = arr
    tex.attrs.put({"name": name, "fingerprint": fingerprint})


def read_texture_basis(path_or_group) -> dict | None:
    """The stored texture model as ``{mean, basis (float32), valid, name, fingerprint}``, or None if absent."""
    group = _open(path_or_group, "r")
    if TEXTURE_GROUP not in group:
        return None
    tex = group[TEXTURE_GROUP]
    attrs = dict(tex.attrs)
    if "fingerprint" not in attrs:  # interrupted while writing
        return None
    return {"mean": tex["mean"][...], "basis": tex["basis"][...].astype(np.float32), "valid": tex["valid"][...],
            "name": attrs["name"], "fingerprint": attrs["fingerprint"]}
