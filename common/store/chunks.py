"""Writing the per-sample arrays one chunk at a time, and proving what was written.

One build task owns one chunk of every array. :func:`write_chunk` writes its data arrays, then ``reason`` and
``status``, and *last* ``chunk_done[c] = 1``: a chunk whose flag is 0 is redone on resume, whatever it holds.
Generation fencing (:func:`start_generation`, :class:`StaleWriter`) refuses writes from a build that no longer owns
the store; with ``layout.chunk_records`` each chunk's SHA-256 is recorded, so :func:`verify_chunks` finds damaged
chunks and :func:`repair_for_resume` makes them pending again.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import zarr

from common.store.location import as_group, layout_of, open_store
from common.store.schema import (
    FAILED,
    OK,
    PER_CHUNK,
    ArraySpec,
    StoreMismatch,
    array_specs,
    code_problems,
    create_schema_array,
    fill_value,
)
from common.store.validate import pending_chunks, schema_problems

GENERATION = "generation"
"""Root attribute: the token of the build that currently owns the store (a new one per ``uvprep build`` run)."""


class StaleWriter(RuntimeError):
    """A chunk write from a build that no longer owns the store (its generation was replaced)."""


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
    group = as_group(path_or_group, "r+")
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
    bad = code_problems(status, reason)
    if bad["reason"].any():
        raise ValueError(f"write_chunk: unknown reason codes {sorted(set(reason[bad['reason']].tolist()))}")
    if (bad["no_reason"] | bad["ok_reason"]).any():
        raise ValueError("write_chunk: failed samples need a reason != 0 and OK samples reason 0")
    if generation is not None:
        _check_generation(path_or_group, group, generation, chunk_index)
    written = {"reason": reason, "status": status}
    for name, spec in specs.items():
        if name not in ("status", "reason", *PER_CHUNK):
            value = data.get(name)
            if value is None:
                value = np.full((n, *spec.shape[1:]), fill_value(spec.dtype), spec.dtype)  # all-fill: no object stored
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


def start_generation(path) -> str:
    """Give the store a new generation token (call with the build lock held); returns it (32 hex digits)."""
    token = uuid.uuid4().hex
    as_group(path, "r+").attrs[GENERATION] = token
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
        group = as_group(path_or_group, "r+")
        layout = layout_of(group)
        first, last = start // layout.chunk, min((stop - 1) // layout.chunk, layout.n_chunks - 1)
        if first <= last:
            group["chunk_done"][first:last + 1] = 0
    except Exception:  # noqa: BLE001 - a store being recreated: its new owner writes every chunk anyway
        pass


def mark_pending(path_or_group, chunks: Iterable[int]) -> None:
    """``chunk_done = 0`` for these chunks: the next write of each (this build's or a resume's) redoes it."""
    group = as_group(path_or_group, "r+")
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


def _chunk_problem(array: Callable[[str], zarr.Array], specs: Mapping[str, ArraySpec], start: int, stop: int,
                   record: bytes) -> tuple[str | None, dict[str, np.ndarray]]:
    """(problem or None, the chunk's sample arrays as read) for samples [start, stop) against their record;
    ``array(name)`` opens an array of the store."""
    try:
        data = {name: np.asarray(array(name)[start:stop], spec.dtype)
                for name, spec in specs.items() if name not in PER_CHUNK}
    except Exception as e:  # noqa: BLE001 - a chunk file the codec cannot read is damaged
        return f"unreadable ({type(e).__name__}: {e})", {}
    if _digest(data) != record[:32]:
        return "data does not match its SHA-256 record (deleted, truncated or altered chunk files)", data
    return None, data


def verify_chunks(path_or_group, chunks: Iterable[int] | None = None) -> dict[int, str]:
    """Re-read completed chunks and compare them with their records: chunk -> problem, for each bad one.

    chunks: which to check (default: every completed chunk). Finds deleted, truncated or altered chunk files
    of any array (a deleted one reads back as fill values). A store without ``chunk_record`` has nothing to
    compare with: {} (its chunks are unverifiable).
    """
    group = as_group(path_or_group, "r")
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
        record = bytes(np.asarray(group["chunk_record"][int(c)], np.uint8))
        problem, _ = _chunk_problem(group.__getitem__, specs, *layout.chunk_bounds(int(c)), record)
        if problem is not None:
            bad[int(c)] = problem
    return bad


class DamagedChunk(RuntimeError):
    """A completed chunk read for training or evaluation does not match its SHA-256 record."""


class ChunkVerifier:
    """Checks each completed chunk against its SHA-256 record the first time this process reads it.

    Readers (:class:`common.store.StoreReader`, the trainer's chunk cache) call :meth:`check` before using a chunk's
    data: the first call for chunk c re-reads every sample array of c, compares the digest with ``chunk_record[c]``
    and raises :class:`DamagedChunk` naming the chunk and the repair; later calls cost a set lookup. A chunk not
    marked done (a build still running) and a store without chunk records have nothing to check against.
    """

    def __init__(self, group: zarr.Group, where: str) -> None:
        self.group, self.where = group, where
        self.layout = layout_of(group)
        self.enabled = bool(self.layout.chunk_records)
        self._specs = array_specs(self.layout)
        self._checked: set[int] = set()
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """``group[name]``, opened once (it reads the array's metadata each time: a request on object storage)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def check(self, c: int) -> dict[str, np.ndarray] | None:
        """Verify chunk ``c`` if this process has not yet; returns its sample arrays (name -> (n, ...)) when it read
        them to verify, else None. Raises :class:`DamagedChunk`."""
        c = int(c)
        if not self.enabled or c in self._checked:
            return None
        self._checked.add(c)
        if self._array("chunk_done")[c] != 1:
            return None
        record = bytes(np.asarray(self._array("chunk_record")[c], np.uint8))
        start, stop = self.layout.chunk_bounds(c)
        problem, data = _chunk_problem(self._array, self._specs, start, stop, record)
        if problem is not None:
            self._checked.discard(c)
            raise DamagedChunk(f"{self.where}: chunk {c} (samples {start}-{stop - 1}) is damaged: {problem}; "
                               f"rebuild it with `uvprep build --verify` and the build's flags (`uvprep check` lists "
                               f"every damaged chunk)")
        return data

    def check_status(self, status: np.ndarray) -> None:
        """Raise :class:`DamagedChunk` when a completed chunk's ``status`` (N,) reads PENDING: its status chunk was
        deleted (it reads back as the fill value 0) and the chunk's samples would silently drop out."""
        held = np.flatnonzero((self._array("chunk_done")[:] == 1) & pending_chunks(status, self.layout.chunk))
        if held.size:
            c = int(held[0])
            start, stop = self.layout.chunk_bounds(c)
            raise DamagedChunk(f"{self.where}: chunk {c} (samples {start}-{stop - 1}) is marked complete but "
                               f"its status reads PENDING (a deleted or damaged status chunk; {held.size} chunk(s) in "
                               f"all); rebuild with `uvprep build --verify` and the build's flags")


def repair_for_resume(path, verify: bool = False) -> list[str]:
    """Before a build resumes: check the store's structure and make every chunk that is not provably complete
    pending again; returns what was done (one line each).

    Missing sample arrays (an interrupted ``--overwrite`` or a deleted folder) are recreated empty and every chunk
    is redone. A chunk marked done whose ``status`` holds PENDING samples (a deleted ``status`` chunk) is redone.
    With ``verify`` every completed chunk is re-read and compared with its SHA-256 record (:func:`verify_chunks`);
    a bad one is redone. Arrays with the wrong shape, dtype or chunking cannot be repaired: :class:`StoreMismatch`
    with the problems.
    """
    group = as_group(path, "r+")
    layout = layout_of(group)
    specs = array_specs(layout)
    notes: list[str] = []
    wrong = [p for p in schema_problems(group, layout)
             if not p.endswith(": missing") and not p.startswith("unexpected")]
    if wrong:
        raise StoreMismatch(f"{path}: cannot resume a store whose arrays do not match the schema: {'; '.join(wrong)}; "
                            f"pass --overwrite to rebuild it")
    missing = [name for name in specs if name not in group]
    if missing:
        for name in missing:
            create_schema_array(group, layout, name)
        group["chunk_done"][:] = 0
        notes.append(f"arrays {missing} were missing: recreated, every chunk is rebuilt")
        return notes
    held = (group["chunk_done"][:] == 1) & pending_chunks(group["status"][:], layout.chunk)
    redo = {int(c): "marked done but holds PENDING samples" for c in np.flatnonzero(held)}
    if verify:
        redo.update(verify_chunks(group))
    for c, why in sorted(redo.items()):
        group["chunk_done"][c] = 0
        notes.append(f"chunk {c}: {why}: rebuilt")
    return notes


def completed_chunks(path_or_group) -> np.ndarray:
    """(n_chunks,) bool: chunks whose writer finished (``chunk_done == 1``)."""
    return as_group(path_or_group, "r")["chunk_done"][:] == 1

