"""The build lock: a JSON file :data:`LOCK_NAME` inside the store, created only if absent, that keeps two builds
(or a build and an upgrade) out of one store; and the same lock under another name in any folder
(:func:`acquire_lock`: ``uvtrain fit`` keeps two runs out of one run directory with it).

``O_CREAT | O_EXCL`` on local and POSIX network file systems, a conditional PUT (``If-None-Match: *``, s3fs's
``open(..., "xb")``) on S3 (:data:`EXCLUSIVE_CREATE`). Other URL schemes have no exclusive create the lock trusts:
:func:`acquire_build_lock` refuses them, and a build there runs without a lock (``uvprep build --no-lock``: the user
guarantees one build per store). A lock left by a dead process on this host is taken over, and so is one left on
another host by an earlier incarnation of this SLURM job (``SLURM_JOB_ID``: a job requeued after its node died).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.store.location import local_path, store_location, url_fs

LOCK_NAME = ".uvprep-build.lock"


class LockHeld(RuntimeError):
    """Another live process holds the lock ``where``; ``holder`` is what its lock file says (pid, host, user, owner,
    started), None when the lock kept changing hands."""

    def __init__(self, where: str, holder: dict | None) -> None:
        super().__init__(f"{where} is held by {holder}")
        self.where, self.holder = where, holder


class StoreLocked(RuntimeError):
    """Another build holds the store's build lock."""


@dataclass(frozen=True)
class BuildLock:
    """A held lock (the build lock, or any :func:`acquire_lock`); release it (or use it as a context manager) when
    the work ends."""

    path: str
    """The lock file (a local path or a URL)."""
    info: dict
    """What the lock file holds: pid, host, user, owner, started, token (and job: the SLURM job id, under SLURM)."""

    def release(self) -> None:
        """Remove the lock file if it is still ours (a lock taken over by someone else is left alone)."""
        lock = _lock_file(self.path, name=self.path.rstrip("/").rsplit("/", 1)[-1])
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
    """A lock from this host whose process has exited, a lock file nobody could have finished writing, or a lock
    from another host taken by this SLURM job (a requeued job runs again with its ``SLURM_JOB_ID``: its earlier
    incarnation, on a node that died, is gone)."""
    if held.get("note") == "unreadable lock file":
        try:
            return lock.age() > UNREADABLE_LOCK_AGE
        except FileNotFoundError:
            return False
    if held.get("host") != host:
        job = _slurm_job()
        return job is not None and held.get("job") == job
    return not _pid_alive(int(held.get("pid", -1)))


def _slurm_job() -> str | None:
    """This process's SLURM job id (``SLURM_JOB_ID``; an array task's own id), None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


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


def _lock_file(path, create: bool = False, name: str = LOCK_NAME) -> _LockFile:
    """The lock file ``name`` of the store (or folder) at ``path``, or the lock file itself (a path ending in
    ``name``). create: raise NotImplementedError (saying ``--no-lock``) where exclusive create is not trusted."""
    where = store_location(path)
    if not where.rstrip("/").endswith(name):
        where = where.rstrip("/") + "/" + name
    if local_path(where) is not None:
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
    fs, lock_path = url_fs(where)
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
    ``os.rename``, so of two processes taking over only one wins), as is one left on another host by this SLURM job.
    A lock from another host cannot be checked: the message says how to clear it by hand.
    """
    try:
        return acquire_lock(path, LOCK_NAME, owner)
    except LockHeld as e:
        held = e.holder
        if held is None:
            raise StoreLocked(f"could not take the build lock {e.where}: it kept changing hands; try again") from None
        raise StoreLocked(
            f"{path} is being built by pid {held.get('pid')} on {held.get('host')} (user {held.get('user', '?')}, "
            f"{held.get('owner', '?')}, started {held.get('started')}). Wait for it to finish. If that build is dead "
            f"(e.g. its machine crashed), delete {e.where} and run again; a lock from this host whose process has "
            f"exited is taken over automatically.") from None


def acquire_lock(path, name: str, owner: str) -> BuildLock:
    """Take the lock file ``name`` inside the store or folder ``path`` (creating the folder if needed) or raise
    :class:`LockHeld` naming its live holder. The lock and its stale-lock takeover are those of
    :func:`acquire_build_lock`; ``owner`` says who holds it (``uvprep build``, ``uvtrain fit``)."""
    lock = _lock_file(path, create=True, name=name)
    if lock.fs is None:
        Path(lock.where).parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "user": _user(), "owner": owner,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    if _slurm_job() is not None:
        info["job"] = _slurm_job()
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
    raise LockHeld(lock.where, held)


def read_lock(path, name: str) -> dict | None:
    """The current holder of the lock file ``name`` inside ``path`` (pid, host, user, owner, started), or None."""
    return _lock_file(path, name=name).read()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "?"
