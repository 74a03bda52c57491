"""Photo sources for ``uvprep build``: what to process (a manifest) and how to read one sample (decode, no fitting).

Every source is a frozen dataclass with a ``kind``, ``manifest()`` (the sorted list of its samples,
each with size and modification time, so a resumed build can tell whether the collection changed)
and ``load(i, manifest) -> SampleInput``, ``iter_many(indices, manifest)`` (the samples one at a time, decoded as
they are asked for: a build holds one full-size photo at a time) and ``load_many`` (the same, as a list). ``load``
never raises for bad data: an unreadable,
truncated, corrupt or tiny file gives a :class:`SampleInput` with ``image=None`` and a
:class:`common.store.Reason` in ``failure``, which the build records in the store.

Kinds: ``synthetic`` (the procedural face world with exact ground truth), ``ffhq`` and
``celeba-hq`` (pre-aligned portraits, a folder or a ``.zip``), ``folder`` (any images, recursive,
in the wild) and ``aflw2000`` (AFLW2000-3D ``imageXXXXX.jpg`` + ``.mat`` annotations).

Keys are paths relative to the source root with ``/`` separators (zip members likewise, with a
single top-level folder shared by all members stripped, so ``images1024x1024.zip`` and its
extracted folder give the same keys). Hidden files and folders (name starting with ``.``, e.g.
macOS ``._x.jpg``) and ``__MACOSX`` are skipped. Resizing to the working resolution belongs to the
stage chain; :func:`resize_square` is provided for aligned sources.
"""

from __future__ import annotations

import calendar
import dataclasses
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from common.config import MAX_BYTES, MAX_PIXELS
from common.faces.fit import read_given_params
from common.imageio import GREY, decode_image, image_size_from_header, read_regular_file
from common.store import Reason, manifest_sha256
from preprocess.config import SYNTHETIC_SEED

__all__ = ["AFLW2000Source", "CelebAHQSource", "DUPLICATE_MARK", "FFHQSource", "FolderSource", "GREY",
           "IMAGE_EXTENSIONS", "Manifest", "ManifestEntry", "SOURCES", "SampleInput", "SyntheticSource", "decode_image",
           "image_size_from_header", "make_source", "read_regular_file", "read_zip_member", "resize_square"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def _limit(default: int):
    """A read limit: a source field that is not recorded in the store's config (it only decides whether an
    over-limit file fails with ``too_large`` instead of exhausting the machine; it never changes the result
    of a sample that is read), so stores built before it existed resume unchanged."""
    return field(default=default, metadata={"recorded": False})


# ---------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ManifestEntry:
    """One sample of a source: its key (relative path), size in bytes and mtime (POSIX seconds)."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Manifest:
    """The samples of a source, sorted by key (unique). Sample ``i`` of a store is ``entries[i]``."""

    entries: tuple[ManifestEntry, ...]

    def __post_init__(self) -> None:
        ents = tuple(sorted(self.entries, key=lambda e: e.path))
        dup = [a.path for a, b in zip(ents, ents[1:], strict=False) if a.path == b.path]
        if dup:
            raise ValueError(f"manifest: duplicate keys {dup[:5]}")
        object.__setattr__(self, "entries", ents)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> ManifestEntry:
        return self.entries[i]

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(self.entries)

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(paths (N,) object str, sizes (N,) int64, mtimes (N,) float64): what the store keeps."""
        return (np.asarray(self.paths, dtype=object), np.asarray([e.size for e in self.entries], np.int64),
                np.asarray([e.mtime for e in self.entries], np.float64))

    @classmethod
    def from_arrays(cls, paths, sizes, mtimes) -> Manifest:
        return cls(tuple(ManifestEntry(str(p), int(s), float(m)) for p, s, m in zip(paths, sizes, mtimes, strict=True)))

    def sha256(self) -> str:
        """Stable hex digest of keys, sizes and mtimes (:func:`common.store.manifest_sha256`)."""
        return manifest_sha256(*self.to_arrays())

    def diff(self, other: Manifest) -> tuple[list[str], list[str], list[str]]:
        """Keys (added, removed, changed) going from ``other`` (e.g. the store's) to ``self`` (e.g. the disk's).

        changed: in both, with a different size or mtime.
        """
        a = {e.path: (e.size, e.mtime) for e in self.entries}
        b = {e.path: (e.size, e.mtime) for e in other.entries}
        return sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys()), sorted(k for k in a.keys() & b.keys()
                                                                                 if a[k] != b[k])


# ------------------------------------------------------------------------------------------ sample
@dataclass(frozen=True, eq=False)
class SampleInput:
    """One decoded sample, input to the stage chain.

    image: (H, W, 3) uint8 RGB at the file's resolution, or None when ``failure`` is set.
    given_params: (62,) float32 known 3DMM parameters (synthetic truth), else None.
    truth: synthetic only: ``uv_true`` (U, U, 3) uint8, ``uv_visible`` (U, U) bool, ``face_mask``
    (H, W) bool, ``tex_coeff`` (K,) float32.
    landmarks: (68, 2) float32 ground-truth landmarks in image pixels (x right, y down, the project's
    convention: pixel j covers [j, j + 1)), AFLW2000 only.
    aligned: the image is a pre-aligned portrait (FFHQ, CelebA-HQ); False for photos in the wild.
    meta: source-specific raw data (AFLW2000: the ``.mat`` fields).
    """

    index: int
    key: str
    image: np.ndarray | None
    failure: Reason | None = None
    given_params: np.ndarray | None = None
    truth: dict[str, np.ndarray] | None = None
    landmarks: np.ndarray | None = None
    aligned: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def without_image(self) -> SampleInput:
        """This sample without its decoded photo (key, failure, parameters, truth, landmarks kept): what the stages
        after the fit need, at a few bytes instead of up to hundreds of MB."""
        return dataclasses.replace(self, image=None)


# ---------------------------------------------------------------------------------------- decoding
def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (H, W, C) or (H, W) image to a square and resize it to (size, size, ...).

    Downscaling uses ``cv2.INTER_AREA`` (no aliasing), upscaling ``cv2.INTER_CUBIC``. Same dtype.
    """
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"resize_square: expected an (H, W) or (H, W, C) image, found shape {img.shape}")
    if size < 1:
        raise ValueError(f"resize_square: size must be >= 1, found {size}")
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    sq = img[y0:y0 + s, x0:x0 + s]
    if s == size:
        return np.ascontiguousarray(sq)
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(sq), (size, size), interpolation=interp)


# --------------------------------------------------------------------------------- file collections
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _utf8_key(rel: str) -> str:
    """A relative path as a storable key: names that are not valid UTF-8 (``os.walk`` hands them over with
    surrogate escapes) get U+FFFD replacement characters, and fail with ``bad_name`` when read."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _scan_folder(root: Path, keep) -> Manifest:
    """Every file under ``root`` (recursive, not following linked folders) whose key passes ``keep``.

    Links, FIFOs and devices with an image name are listed too (with their own size and time, never read
    here) so that loading them records a failure instead of hanging or stopping the build.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}; pass the folder holding the images (or a .zip)")
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = _utf8_key(name if rel_dir == "." else f"{rel_dir}/{name}")
            if keep(rel) and not _hidden(rel):
                st = os.lstat(os.path.join(dirpath, name))
                entries.setdefault(rel, ManifestEntry(rel, int(st.st_size), float(st.st_mtime)))
    return Manifest(tuple(entries.values()))


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> tuple[bytes | None, Reason | None]:
    """A zip member's bytes, or (None, reason): TOO_LARGE (declared or actual size over ``max_bytes``: a zip bomb
    is never inflated past it), UNSUPPORTED_ARCHIVE (encrypted, or a compression method such as deflate64),
    READ_ERROR (a corrupt member)."""
    if info.flag_bits & 0x1 or info.compress_type not in _ZIP_METHODS:
        return None, Reason.UNSUPPORTED_ARCHIVE
    if info.file_size > max_bytes:
        return None, Reason.TOO_LARGE
    try:
        with zf.open(info) as f:
            data = f.read(max_bytes + 1)
    except (RuntimeError, NotImplementedError):
        return None, Reason.UNSUPPORTED_ARCHIVE
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return None, Reason.READ_ERROR
    return (None, Reason.TOO_LARGE) if len(data) > max_bytes else (data, None)


DUPLICATE_MARK = "#duplicate-"
"""Key suffix of a zip member whose name an earlier member already has: listed (and failed with
``duplicate_name``) rather than silently dropped."""


def _zip_members(zf: zipfile.ZipFile, keep) -> dict[str, zipfile.ZipInfo]:
    """key -> member for the kept members; a top-level folder shared by all kept members is stripped. A repeated
    name gets the key ``NAME#duplicate-K`` (K = 2, 3, ...)."""
    infos = [z for z in zf.infolist() if not z.is_dir() and keep(z.filename) and not _hidden(z.filename)]
    tops = {z.filename.split("/", 1)[0] for z in infos}
    strip = len(tops) == 1 and all("/" in z.filename for z in infos)
    out: dict[str, zipfile.ZipInfo] = {}
    for z in infos:
        key = _utf8_key(z.filename.split("/", 1)[1] if strip else z.filename)
        k, n = key, 1
        while k in out:
            n += 1
            k = f"{key}{DUPLICATE_MARK}{n}"
        out[k] = z
    return out


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    """Member time stamp as POSIX seconds, read as UTC (zip stores local time without a zone: stable everywhere)."""
    return float(calendar.timegm((*info.date_time, 0, 0, 0)))


@dataclass(frozen=True)
class _ImageFiles:
    """Images in a folder (recursive) or a ``.zip``; the base of the photo-collection sources."""

    images: str
    """Folder or ``.zip`` holding the images."""
    min_size: int = 64
    """Images whose shorter side is below this fail with ``too_small``."""
    max_bytes: int = _limit(MAX_BYTES)
    """Files / zip members larger than this (bytes) fail with ``too_large`` without being read."""
    max_pixels: int = _limit(MAX_PIXELS)
    """Images whose header says more pixels than this fail with ``too_large`` without being decoded."""
    params: str | None = None
    """Optional known parameters for the ``given`` fitter: a ``.npz`` (``keys`` (N,) str, ``params`` (N, 62)) or a
    ``.csv`` (``key,p0,...,p61``), keys as in the manifest, parameters in each photo's own frame (see
    :func:`read_given_params`). Photos without an entry get no parameters."""

    kind: ClassVar[str] = "files"
    aligned: ClassVar[bool] = False

    @property
    def is_zip(self) -> bool:
        return str(self.images).lower().endswith(".zip")

    def _keep(self, key: str) -> bool:
        return _is_image(key)

    def manifest(self) -> Manifest:
        """Sorted image keys with sizes and mtimes (zip: uncompressed size and member time)."""
        if self.is_zip:
            if not Path(self.images).is_file():
                raise FileNotFoundError(f"no zip file at {self.images}")
            try:
                with zipfile.ZipFile(self.images) as zf:
                    members = _zip_members(zf, self._keep)
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise ValueError(f"{self.images} is not a readable zip file ({e}); pass a folder of images or a "
                                 f"valid .zip") from None
            return Manifest(tuple(ManifestEntry(k, int(z.file_size), _zip_mtime(z)) for k, z in members.items()))
        return _scan_folder(Path(self.images), self._keep)

    def load(self, i: int, manifest: Manifest) -> SampleInput:
        """Read and decode sample ``i`` of ``manifest`` (see :func:`decode_image`)."""
        return self.load_many([i], manifest)[0]

    def load_many(self, indices: Sequence[int], manifest: Manifest) -> list[SampleInput]:
        """:meth:`load` for several samples, opening a zip only once (and the parameter file, if any)."""
        return list(self.iter_many(indices, manifest))

    def iter_many(self, indices: Sequence[int], manifest: Manifest) -> Iterator[SampleInput]:
        """The samples of :meth:`load_many`, each read and decoded when it is asked for; the zip and the parameter
        file are opened once, and no reference to a sample is kept once the next one is asked for."""
        known = read_given_params(self.params) if self.params is not None else None
        for x in self._iter_images(indices, manifest):
            yield dataclasses.replace(x, given_params=known.get(x.key)) if known is not None and x.ok else x
            del x  # before the next photo is decoded

    def _iter_images(self, indices: Sequence[int], manifest: Manifest) -> Iterator[SampleInput]:
        if not self.is_zip:
            for i in indices:
                path = manifest[int(i)].path
                yield self._sample(int(i), path, *read_regular_file(Path(self.images) / path, self.max_bytes))
            return
        try:
            zf = zipfile.ZipFile(self.images)
        except (OSError, zipfile.BadZipFile):
            yield from (self._failed(int(i), manifest[int(i)].path, Reason.READ_ERROR) for i in indices)
            return
        with zf:
            members = _zip_members(zf, self._keep)
            for i in indices:
                key = manifest[int(i)].path
                yield self._sample(int(i), key, *self._read_member(zf, members, key))

    def _read_member(self, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo],
                     key: str) -> tuple[bytes | None, Reason | None]:
        if DUPLICATE_MARK in key:
            return None, Reason.DUPLICATE_NAME
        return read_zip_member(zf, members[key], self.max_bytes) if key in members else (None, None)

    def _failed(self, i: int, key: str, reason: Reason) -> SampleInput:
        return SampleInput(index=i, key=key, image=None, failure=reason, aligned=self.aligned)

    def _sample(self, i: int, key: str, data: bytes | None, why: Reason | None = None) -> SampleInput:
        if data is None:
            return self._failed(i, key, why or Reason.READ_ERROR)
        img, why = decode_image(data, self.min_size, self.max_pixels)
        if why is not None:
            return self._failed(i, key, why)
        return SampleInput(index=i, key=key, image=img, aligned=self.aligned)


@dataclass(frozen=True)
class FFHQSource(_ImageFiles):
    """FFHQ: aligned 1024² portraits (``00000/00000.png`` ...) or the 128² thumbnails, a folder or a ``.zip``."""

    kind: ClassVar[str] = "ffhq"
    aligned: ClassVar[bool] = True


@dataclass(frozen=True)
class CelebAHQSource(_ImageFiles):
    """CelebA-HQ: a folder (or ``.zip``) of aligned portraits (``0.jpg`` ... ``29999.jpg``, any layout)."""

    kind: ClassVar[str] = "celeba-hq"
    aligned: ClassVar[bool] = True


@dataclass(frozen=True)
class FolderSource(_ImageFiles):
    """Any images under a folder (recursive) or in a ``.zip``: photos in the wild (need detection)."""

    kind: ClassVar[str] = "folder"
    aligned: ClassVar[bool] = False


# -------------------------------------------------------------------------------------------- AFLW
_AFLW_FIELDS = ("Pose_Para", "Shape_Para", "Exp_Para", "pt3d_68")


@dataclass(frozen=True)
class AFLW2000Source:
    """AFLW2000-3D: ``imageXXXXX.jpg`` with ``imageXXXXX.mat`` (Pose_Para, Shape_Para, Exp_Para, pt3d_68, ...).

    The raw ``.mat`` fields go to ``SampleInput.meta``, their 62-parameter form
    (:func:`common.faces.fit.aflw2000_params`, photo frame) to ``given_params``; ``landmarks`` are
    ``pt3d_68[:2].T - 0.5`` (68, 2), the 68 ground-truth points in
    the project's pixel convention (as ``benchmarks/nme_aflw2000.py``). A manifest entry's size is the
    jpg's plus the mat's, its mtime the later of the two, so editing an annotation counts as a change.
    """

    images: str
    """Folder holding the ``.jpg`` / ``.mat`` pairs."""
    min_size: int = 64
    max_bytes: int = _limit(MAX_BYTES)
    """As :class:`FolderSource`."""
    max_pixels: int = _limit(MAX_PIXELS)
    """As :class:`FolderSource`."""

    kind: ClassVar[str] = "aflw2000"
    aligned: ClassVar[bool] = False

    def manifest(self) -> Manifest:
        root = Path(self.images)
        jpgs = _scan_folder(root, lambda k: k.lower().endswith(".jpg"))
        out = []
        for e in jpgs:
            mat = (root / e.path).with_suffix(".mat")
            st = mat.stat() if mat.is_file() else None
            out.append(ManifestEntry(e.path, e.size + (st.st_size if st else 0),
                                     max(e.mtime, float(st.st_mtime)) if st else e.mtime))
        return Manifest(tuple(out))

    def load(self, i: int, manifest: Manifest) -> SampleInput:
        key = manifest[int(i)].path
        jpg = Path(self.images) / key
        data, why = read_regular_file(jpg, self.max_bytes)
        if data is None:
            return SampleInput(index=int(i), key=key, image=None, failure=why)
        img, why = decode_image(data, self.min_size, self.max_pixels)
        if why is not None:
            return SampleInput(index=int(i), key=key, image=None, failure=why)
        meta = _read_aflw_mat(jpg.with_suffix(".mat"))
        if meta is None:
            return SampleInput(index=int(i), key=key, image=None, failure=Reason.BAD_ANNOTATION)
        lm = (np.asarray(meta["pt3d_68"], np.float32)[:2].T - 0.5).astype(np.float32)
        from common.faces.fit import aflw2000_params

        params = aflw2000_params(meta["Pose_Para"], meta["Shape_Para"], meta["Exp_Para"], img.shape[0])
        return SampleInput(index=int(i), key=key, image=img, landmarks=lm, meta=meta, given_params=params)

    def load_many(self, indices: Sequence[int], manifest: Manifest) -> list[SampleInput]:
        return list(self.iter_many(indices, manifest))

    def iter_many(self, indices: Sequence[int], manifest: Manifest) -> Iterator[SampleInput]:
        """The samples one at a time, each read and decoded when it is asked for."""
        for i in indices:
            yield self.load(int(i), manifest)


def _read_aflw_mat(path: Path) -> dict[str, np.ndarray] | None:
    """The ``.mat`` fields (``__header__`` etc. dropped), or None if unreadable or lacking the needed fields."""
    import scipy.io as sio

    try:
        mat = sio.loadmat(str(path))
    except Exception:  # noqa: BLE001 - scipy raises many types for malformed files; bad data must not crash
        return None
    if any(k not in mat for k in _AFLW_FIELDS) or np.asarray(mat["pt3d_68"]).shape != (3, 68):
        return None
    return {k: v for k, v in mat.items() if not k.startswith("__")}


# --------------------------------------------------------------------------------------- synthetic
def _default_synthetic_config():
    from common.synthetic import SyntheticConfig

    return SyntheticConfig()


def _default_procedural_config():
    from common.procedural import ProceduralConfig

    return ProceduralConfig()


@dataclass(frozen=True)
class SyntheticSource:
    """The synthetic face world (:mod:`common.synthetic`) on the procedural face model, with exact truth.

    Sample ``i`` is ``generate(i, replace(config, seed=seed), model)``; keys are ``synthetic://seed/i``
    (zero-padded so they sort numerically), size 0, mtime 0. ``given_params`` is the true fit.
    """

    count: int
    """Number of faces."""
    seed: int = SYNTHETIC_SEED
    """World seed (overrides ``config.seed``)."""
    config: Any = field(default_factory=_default_synthetic_config)
    """:class:`common.synthetic.SyntheticConfig`."""
    model_config: Any = field(default_factory=_default_procedural_config)
    """:class:`common.procedural.ProceduralConfig` of the face model."""

    kind: ClassVar[str] = "synthetic"
    aligned: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"SyntheticSource.count: expected >= 1, found {self.count}")

    def _key(self, i: int) -> str:
        return f"synthetic://{self.seed}/{i:0{max(len(str(self.count - 1)), 1)}d}"

    def manifest(self) -> Manifest:
        return Manifest(tuple(ManifestEntry(self._key(i), 0, 0.0) for i in range(self.count)))

    def load(self, i: int, manifest: Manifest) -> SampleInput:
        return self.load_many([i], manifest)[0]

    def load_many(self, indices: Sequence[int], manifest: Manifest) -> list[SampleInput]:
        """Generate the faces (the face model and UV raster are built once per call)."""
        from common.imageio import to_uint8
        from common.procedural import build_procedural_model
        from common.synthetic import generate_batch

        cfg = dataclasses.replace(self.config, seed=self.seed)
        ids = []
        for i in indices:
            key = manifest[int(i)].path
            prefix = f"synthetic://{self.seed}/"
            if not key.startswith(prefix):
                raise ValueError(f"manifest entry {i} is {key!r}, not a sample of this synthetic source ({prefix}...)")
            ids.append(int(key[len(prefix):]))
        model = build_procedural_model(self.model_config)
        faces = generate_batch(ids, cfg, model)  # rendered together, at the working size
        return [SampleInput(index=int(i), key=manifest[int(i)].path, image=f.image, given_params=f.params,
                            truth={"uv_true": to_uint8(f.uv_true), "uv_visible": f.uv_visible,
                                   "face_mask": f.face_mask, "tex_coeff": f.tex_coeff})
                for i, f in zip(indices, faces, strict=True)]

    def iter_many(self, indices: Sequence[int], manifest: Manifest) -> Iterator[SampleInput]:
        """The samples of :meth:`load_many` (rendered as one batch: they are already at the working size)."""
        yield from self.load_many(indices, manifest)


# ----------------------------------------------------------------------------------------- factory
SOURCES = {s.kind: s for s in (SyntheticSource, FFHQSource, CelebAHQSource, FolderSource, AFLW2000Source)}


def make_source(kind: str, **kwargs):
    """Build a source by kind (``synthetic``, ``ffhq``, ``celeba-hq``, ``folder``, ``aflw2000``; ``_`` = ``-``).

    kwargs are the source's fields, e.g. ``make_source("ffhq", images="ffhq/images1024x1024.zip")``.
    """
    norm = kind.strip().lower().replace("_", "-")
    norm = {"celebahq": "celeba-hq", "aflw2000-3d": "aflw2000"}.get(norm, norm)
    if norm not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; expected one of: {', '.join(SOURCES)}")
    cls = SOURCES[norm]
    names = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(kwargs) - set(names))
    if bad:
        raise TypeError(f"source {norm!r} takes {names}, not {bad}")
    return cls(**kwargs)
