"""Where a store lives and opening it: local paths, ``file://`` and fsspec URLs (:func:`store_location`),
:func:`open_store`, and :func:`layout_of`, which reads a store's layout and refuses other schema versions.

Credentials are never part of a location: they come from the environment or the usual config files, so a location
is safe to record and to print.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import zarr

from common.store.schema import (
    MODEL_GROUP,
    SCHEMA_VERSION,
    UPGRADABLE,
    UV_LAYOUT_GROUP,
    StoreLayout,
    StoreMismatch,
)


def _is_url(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path) -> Path | None:
    """The local path of a store location (``file://`` stripped), or None for a URL."""
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
    local = local_path(path)
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


def url_fs(url: str):
    """(fsspec filesystem, path in it) of a store URL: the filesystem zarr's FsspecStore uses for it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def open_store(path, mode: str = "r") -> zarr.Group:
    """The store's root group (a local path, ``file://`` or an fsspec URL; see :func:`store_location`).

    Opened as Zarr v3 directly: zarr's format probe would look for v2 metadata first, which on object storage costs
    six requests (a HEAD and a listing per missing key) on every open."""
    return zarr.open_group(store_location(path), mode=mode, zarr_format=3)


def as_group(path_or_group, mode: str) -> zarr.Group:
    """``path_or_group`` itself when it is an open group, else the store there opened with ``mode``."""
    if isinstance(path_or_group, zarr.Group):
        return path_or_group
    return open_store(path_or_group, mode)


def store_exists(path) -> bool:
    """Whether a Zarr group is at ``path`` (a local path, ``file://`` or an fsspec URL); creates nothing."""
    local = local_path(path)
    if local is not None:
        return (local / "zarr.json").is_file()
    try:
        open_store(path, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


def location_of(group: zarr.Group) -> str:
    """The path or URL of the store ``group`` belongs to, for messages."""
    store = group.store
    root = getattr(store, "root", None)
    if root is not None:
        return str(root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and path is not None:
        return str(fs.unstrip_protocol(path))
    return str(store)


@contextlib.contextmanager
def quiet_listing() -> Iterator[None]:
    """Listing a group's members while the build lock file is in the store: zarr warns about the one object it does
    not recognise (``ZarrUserWarning``); this silences that warning for the listings under it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        yield


def layout_of(group: zarr.Group) -> StoreLayout:
    """The :class:`StoreLayout` recorded in a store's attributes (refuses other schema versions, saying
    what a version-1 store lacks and how to upgrade it)."""
    attrs = group.attrs
    ver = attrs.get("schema_version")
    if ver == SCHEMA_VERSION:
        return StoreLayout.from_json(attrs["layout"])
    where = location_of(group)
    if ver in UPGRADABLE:
        raise StoreMismatch(f"{where} has store schema version {ver}, this code reads version {SCHEMA_VERSION}: "
                            f"{'; '.join(_v1_gaps(group))}. Upgrade it in place with `uvprep upgrade {where}` "
                            f"(or rebuild it: uvprep build ... --overwrite)")
    if isinstance(ver, int) and ver > SCHEMA_VERSION:
        raise StoreMismatch(f"{where} has store schema version {ver}, newer than this code's {SCHEMA_VERSION}: "
                            f"it was written by a newer uvtex; update uvtex to read it")
    raise StoreMismatch(f"{where}: store schema version {ver}, this code reads version {SCHEMA_VERSION}; "
                        f"rebuild the store with this version (pass --overwrite)")


def _v1_gaps(group: zarr.Group) -> list[str]:
    """What a version-1 store lacks compared with this schema (for the refusal message)."""
    with quiet_listing():
        members = set(group.keys())
    gaps = [f"no {g}/ group ({what})" for g, what in ((MODEL_GROUP, "the face model"),
                                                       (UV_LAYOUT_GROUP, "crop boxes/masks, texel mirror index"))
            if g not in members]
    if "face_region" not in members:
        gaps.append("no face_region array (the face region before erosion, for the masked input I^m)")
    if "face_mask" in members:
        gaps.append("face_mask must be renamed face_mask_eroded")
    return gaps or ["its schema_version attribute is old"]
