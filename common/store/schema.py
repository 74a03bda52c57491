"""The store's schema: its version, the per-sample codes (:class:`Status`, :class:`Reason`), the
:class:`StoreLayout` recorded with every store, and :data:`ARRAYS`, the one table of its arrays.

:data:`ARRAYS` is the only description of the arrays: :func:`array_specs` / :func:`manifest_specs` evaluate its
shapes for a layout, :data:`ARRAY_DOCS` (each array's ``description`` attribute) and :func:`schema_table` (the
table in the :mod:`common.store` docstring) are made from it, and :func:`create_schema_array` creates an array
from it. Nothing here does I/O beyond creating an array in a group it is given.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import zarr

from common.config import STORE_CHUNK

SCHEMA_VERSION = 2
"""Bumped whenever an array, dtype, shape rule or attribute changes meaning; old stores are then refused
(version 1 can be upgraded in place: ``uvprep upgrade STORE``)."""
N_PARAMS = 62
UPGRADABLE = (1,)
"""Schema versions ``uvprep upgrade`` brings to :data:`SCHEMA_VERSION`."""
UPGRADE_COMMAND = "uvprep upgrade STORE"

MODEL_GROUP = "model"
UV_LAYOUT_GROUP = "uv_layout"
TEXTURE_GROUP = "texture"
REQUIRED_ATTRS = ("config", "face_model_hash", "texture_basis_hash")
"""Root attributes every build passes to :func:`common.store.create_store`."""


class StoreMismatch(ValueError):
    """An existing store was built with different settings than this run."""


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


def reason_name(code: int) -> str:
    """The short name of a ``reason`` code (``"no_face"``); ``"unknown_<code>"`` for a code this version does not
    know (a store edited by hand, or written by a newer uvtex)."""
    code = int(code)
    return Reason(code).short if code in Reason._value2member_map_ else f"unknown_{code}"


def code_problems(status: np.ndarray, reason: np.ndarray) -> dict[str, np.ndarray]:
    """The per-sample rules of ``status`` and ``reason`` (both (n,) integers): rule -> (n,) bool mask of the samples
    that break it. ``status``: not a :class:`Status`; ``reason``: not a :class:`Reason`; ``no_reason``: FAILED with
    reason 0; ``ok_reason``: OK with a failure reason."""
    return {"status": ~np.isin(status, list(Status)), "reason": ~np.isin(reason, [r.value for r in Reason]),
            "no_reason": (status == FAILED) & (reason == Reason.NONE),
            "ok_reason": (status == OK) & (reason != Reason.NONE)}


# ------------------------------------------------------------------------------------------ layout
_COMPRESSORS = ("zstd", "blosc-zstd", "blosc-lz4", "none")


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
    chunk: int = STORE_CHUNK
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


# ------------------------------------------------------------------------------------------ arrays
class ArrayDoc(NamedTuple):
    """One array of the schema, as :data:`ARRAYS` lists it."""

    name: str
    dims: tuple[str | int, ...]
    """Symbolic shape: N samples, H = W image side, U UV side, K texture coefficients, (hc, wc) / (hs, ws) crop
    shapes, n_chunks chunks (see :class:`StoreLayout`)."""
    dtype: str
    """A numpy dtype name, or :data:`VLEN_UTF8`."""
    meaning: str
    """What it holds: stored as its ``description`` attribute (followed by shape and dtype)."""
    unit: str = ""
    """Said after the dtype, e.g. ``RGB``."""
    only: str = ""
    """The :class:`StoreLayout` flag without which the store lacks the array."""
    note: str = ""
    """More for the docstring table only (references)."""


VLEN_UTF8 = "variable-length UTF-8"
RECORD_BYTES = 48
PER_CHUNK = ("chunk_done", "chunk_record")
"""Arrays indexed by chunk, not by sample."""
MANIFEST_ARRAYS = ("manifest_path", "manifest_size", "manifest_mtime")
_MANIFEST_CHUNK = 65536

ARRAYS = (
    ArrayDoc("image", ("N", "H", "W", 3), "uint8", "photo at the working resolution", "RGB"),
    ArrayDoc("face_region", ("N", "H", "W"), "bool", "projected face region before erosion (visible face "
             "triangles, and the segmentation when the source has one)", note="the triangles are ``face | eyes`` minus "
             "``mouth``"),
    ArrayDoc("face_mask_eroded", ("N", "H", "W"), "bool", "face_region eroded: the mask uv_gt was read under"),
    ArrayDoc("uv_gt", ("N", "U", "U", 3), "uint8", "incomplete UV texture from the photo", "RGB"),
    ArrayDoc("uv_gt_mask", ("N", "U", "U"), "bool", "observed texels of uv_gt"),
    ArrayDoc("uv_bl", ("N", "U", "U", 3), "uint8", "blended complete UV texture", "RGB",
             note="the pseudo ground truth"),
    ArrayDoc("uv_source", ("N", "U", "U"), "uint8", "per-texel source label of uv_bl"),
    ArrayDoc("params", ("N", N_PARAMS), "float32", "62 3DMM parameters [sR|t](12) id(40) exp(10)",
             note="see ``common.geometry``"),
    ArrayDoc("pose", ("N", 3), "float32", "yaw, pitch, roll in degrees"),
    ArrayDoc("tex_coeff", ("N", "K"), "float32", "texture-basis coefficients", note="see Eq. 8"),
    ArrayDoc("uv_ctr", ("N", "hc", "wc", 3), "uint8", "centre UV crop", note="cut as in Section 3.4"),
    ArrayDoc("uv_ctr_mask", ("N", "hc", "wc"), "bool", "centre crop mask"),
    ArrayDoc("ctr_valid", ("N",), "bool", "sample yields a centre crop"),
    ArrayDoc("uv_sd", ("N", "hs", "ws", 3), "uint8", "side UV crop (mirrored to the face's left)"),
    ArrayDoc("uv_sd_mask", ("N", "hs", "ws"), "bool", "side crop mask"),
    ArrayDoc("sd_valid", ("N",), "bool", "sample yields a side crop"),
    ArrayDoc("uv_true", ("N", "U", "U", 3), "uint8", "synthetic ground-truth UV texture", only="has_truth"),
    ArrayDoc("occlusion", ("N", "H", "W"), "bool", "pixels inside the eroded projected mesh mask rejected as "
             "occluders (outside face_region)", only="has_occlusion", note="made by ``preprocess.occlusion``"),
    ArrayDoc("status", ("N",), "uint8", "0 pending, 1 ok, 2 failed"),
    ArrayDoc("reason", ("N",), "uint8", "failure reason code (common.store.Reason)",
             note="0 for a sample that did not fail"),
    ArrayDoc("chunk_done", ("n_chunks",), "uint8", "1 once the chunk is completely written"),
    ArrayDoc("chunk_record", ("n_chunks", RECORD_BYTES), "uint8", "per chunk: SHA-256 of its arrays as written "
             "(32 bytes) + the writing build's generation (16 bytes)", only="chunk_records"),
    ArrayDoc("manifest_path", ("N",), VLEN_UTF8, "source key of each sample"),
    ArrayDoc("manifest_size", ("N",), "int64", "source file size in bytes"),
    ArrayDoc("manifest_mtime", ("N",), "float64", "source modification time in POSIX seconds"),
)
"""Every array of the schema, in the order a store is created: the one description of them."""


def _shape_text(dims: tuple) -> str:
    return f"({', '.join(str(d) for d in dims)}{',' if len(dims) == 1 else ''})"


ARRAY_DOCS = {a.name: f"{a.meaning}, {_shape_text(a.dims)} {a.dtype}{' ' + a.unit if a.unit else ''}" for a in ARRAYS}
"""name -> the ``description`` attribute each array is created with."""


class ArraySpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


def _specs(layout: StoreLayout, names: Iterable[str]) -> dict[str, ArraySpec]:
    n, h, c = layout.n_samples, layout.image_size, layout.chunk
    (hc, wc), (hs, ws) = layout.ctr_shape, layout.sd_shape
    size = {"N": n, "H": h, "W": h, "U": layout.uv_size, "K": layout.n_tex, "hc": hc, "wc": wc, "hs": hs, "ws": ws,
            "n_chunks": layout.n_chunks}
    out = {}
    for a in ARRAYS:
        if a.name in names and (not a.only or getattr(layout, a.only)):
            shape = tuple(size.get(d, d) for d in a.dims)
            lead = 1 if a.name in PER_CHUNK else min(n, _MANIFEST_CHUNK) if a.name in MANIFEST_ARRAYS else min(c, n)
            dtype = np.dtype(object) if a.dtype == VLEN_UTF8 else np.dtype(a.dtype)
            out[a.name] = ArraySpec(shape, dtype, (lead, *shape[1:]))
    return out


def array_specs(layout: StoreLayout) -> dict[str, ArraySpec]:
    """Every sample-aligned array of the schema plus ``chunk_done`` (and ``chunk_record``): name -> (shape, dtype,
    chunks).

    Sample-aligned arrays are chunked ``(chunk, *full_rest)``; ``chunk_done`` is chunked (1,).
    The manifest arrays are described by :func:`manifest_specs`.
    """
    return _specs(layout, [a.name for a in ARRAYS if a.name not in MANIFEST_ARRAYS])


def manifest_specs(layout: StoreLayout) -> dict[str, ArraySpec]:
    """The manifest arrays: name -> (shape, dtype, chunks); ``manifest_path`` has dtype ``object`` (stored as
    variable-length UTF-8)."""
    return _specs(layout, MANIFEST_ARRAYS)


def _compressors(layout: StoreLayout):
    """The codecs of the layout's sample-aligned arrays (None: uncompressed)."""
    if layout.compressor == "none":
        return None
    if layout.compressor == "zstd":
        return (zarr.codecs.ZstdCodec(level=layout.clevel),)
    cname = layout.compressor.split("-", 1)[1]
    return (zarr.codecs.BloscCodec(cname=cname, clevel=layout.clevel, shuffle="shuffle"),)


def fill_value(dtype: np.dtype):
    """NaN for floats, False for bools, 0 otherwise: what an array holds where nothing was written."""
    return np.nan if dtype.kind == "f" else (False if dtype.kind == "b" else 0)


def create_schema_array(group: zarr.Group, layout: StoreLayout, name: str) -> zarr.Array:
    """Create the schema's array ``name`` for ``layout`` in ``group``, all fill values, with its ``description``.

    Sample-aligned arrays get the layout's codecs, the per-chunk flags none, the manifest arrays zstd level 3
    (``manifest_path`` as variable-length strings, fill ``""``)."""
    spec = {**array_specs(layout), **manifest_specs(layout)}[name]
    dtype, fill, codecs = spec.dtype, fill_value(spec.dtype), _compressors(layout)
    if name in PER_CHUNK:
        codecs = None
    elif name in MANIFEST_ARRAYS:
        codecs = (zarr.codecs.ZstdCodec(level=3),)
        if name == "manifest_path":
            dtype, fill = str, ""
    return group.create_array(name, shape=spec.shape, dtype=dtype, chunks=spec.chunks, fill_value=fill,
                              compressors=codecs, attributes={"description": ARRAY_DOCS[name]})


def schema_table(width: int = 50) -> str:
    """:data:`ARRAYS` as a reStructuredText table (name, shape, dtype, meaning wrapped at ``width``)."""
    rows = []
    for a in ARRAYS:
        meaning = a.meaning + (f"; {a.note}" if a.note else "") + (f"; only when ``layout.{a.only}``" if a.only
                                                                    else "")
        rows.append((a.name, _shape_text(a.dims), a.dtype + (f" {a.unit}" if a.unit else ""),
                     textwrap.wrap(meaning, width)))
    w = [max(len(r[i]) for r in (*rows, ("name", "shape", "dtype"))) for i in range(3)] + [width]
    rule = "  ".join("=" * n for n in w)
    head = "  ".join(h.ljust(n) for h, n in zip(("name", "shape", "dtype", "meaning"), w, strict=True))
    lines = [rule, head.rstrip(), rule]
    for name, shape, dtype, text in rows:
        lines.append("  ".join((name.ljust(w[0]), shape.ljust(w[1]), dtype.ljust(w[2]), text[0])))
        lines += [" " * (sum(w[:3]) + 6) + t for t in text[1:]]
    return "\n".join([*lines, rule])


def manifest_sha256(paths: Iterable[str], sizes: Iterable[int], mtimes: Iterable[float]) -> str:
    """Stable hex sha256 of a manifest: per entry ``utf8(path) 0x00 int64-le(size) float64-le(mtime)``, in order."""
    h = hashlib.sha256()
    for p, s, m in zip(paths, sizes, mtimes, strict=True):
        h.update(str(p).encode("utf-8") + b"\0" + struct.pack("<qd", int(s), float(m)))
    return h.hexdigest()
