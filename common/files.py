"""Small file helpers shared by both sides."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["check_output_file", "check_output_folder", "sha256_file"]


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_folder(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents) and write and remove a file in it, so that a command fails
    before its work, not after it; returns the path. Raises ValueError saying what is wrong: a file where the folder
    should be, or the error of the creation or the write (permission denied, read-only file system, no space left)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError("is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot be created ({e.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"is not writable ({e.strerror})") from None
    return path


def check_output_file(path: str | Path) -> Path:
    """:func:`check_output_folder` for the folder of the output file ``path``, which must not be a folder itself;
    returns the path. Raises ValueError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ValueError("is a folder, not a file")
    try:
        check_output_folder(path.parent)
    except ValueError as e:
        raise ValueError(f"its folder {path.parent} {e}") from None
    return path
