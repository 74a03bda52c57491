"""Dask worker preload for ``tests/test_fencing.py`` (``dask worker --preload tests/stall_worker.py``): holds back one
chunk task of an old build so that it is still running when a rebuild takes the store over.

Environment of the worker process:

- ``UVTEX_STALL``: ``before`` holds the task before it calls ``write_chunk`` (a slow task of a dead client);
  ``inside`` holds it inside ``write_chunk``, after its first generation check passed and before its data is
  written (a writer stalled between its check and its write: the window fencing cannot close);
- ``UVTEX_STALL_DIR``: a folder. A task is held only once ``DIR/<its generation>`` exists (the test writes it,
  naming the old build's generation), and only one task per worker process. The hook writes
  ``DIR/<mode>-stalled-<chunk>`` when it starts holding and ``DIR/<mode>-<outcome>-<chunk>`` when the task ended
  (outcome: ``written``, or ``refused-first`` / ``refused-second`` for the check that raised ``StaleWriter``).

A held task is released once the rebuild has completed the same chunk (``chunk_done`` set by another
generation), so its write comes as late as possible; after 150 s it is released anyway (``DIR/<mode>-timeout-<c>``).
Nothing here is imported by the product.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import zarr

import common.store.chunks as store
import preprocess.build as build

MODE = os.environ.get("UVTEX_STALL", "")
DIR = Path(os.environ.get("UVTEX_STALL_DIR", "/nonexistent"))
HOLD_LIMIT = 150.0

_claimed = threading.Lock()
_held = threading.local()
# the originals, kept on the module they came from: Dask may execute this file more than once in a process
_write_chunk = store.__dict__.setdefault("_unstalled_write_chunk", store.write_chunk)
_check_generation = store.__dict__.setdefault("_unstalled_check_generation", store._check_generation)


def _mark(name: str) -> None:
    (DIR / name).write_text(str(os.getpid()))


def _claim(generation: str | None) -> bool:
    """True for the first task of the named old generation in this process."""
    return bool(MODE) and generation is not None and (DIR / generation).exists() and _claimed.acquire(blocking=False)


def _wait_rebuilt(out: str, chunk: int, generation: str) -> None:
    """Until another generation owns the store and has completed ``chunk``."""
    t0 = time.time()
    while time.time() - t0 < HOLD_LIMIT:
        try:
            g = zarr.open_group(out, mode="r")
            record = bytes(np.asarray(g["chunk_record"][chunk], np.uint8))
            if (g.attrs.get(store.GENERATION) not in (None, generation) and g["chunk_done"][chunk] == 1
                    and record[32:48] != bytes.fromhex(generation)[:16]):
                return
        except Exception:  # noqa: BLE001 - the store is being recreated
            pass
        time.sleep(0.05)
    _mark(f"{MODE}-timeout-{chunk}")


def write_chunk(out, chunk_index, arrays, generation=None):
    if not _claim(generation):
        return _write_chunk(out, chunk_index, arrays, generation=generation)
    _mark(f"{MODE}-stalled-{chunk_index}")
    if MODE == "before":
        _wait_rebuilt(out, chunk_index, generation)
    else:
        _held.chunk = (out, chunk_index)  # held by the first _check_generation below, once it passed
    try:
        _write_chunk(out, chunk_index, arrays, generation=generation)
    except store.StaleWriter:
        _mark(f"{MODE}-refused-{'second' if getattr(_held, 'passed', False) else 'first'}-{chunk_index}")
        raise
    finally:
        _held.chunk = None
    _mark(f"{MODE}-written-{chunk_index}")
    return None


def check_generation(path_or_group, group, generation, chunk_index):
    _check_generation(path_or_group, group, generation, chunk_index)
    held = getattr(_held, "chunk", None)
    if held is not None and held[1] == chunk_index:  # the first check passed: now the data write waits
        _held.chunk, _held.passed = None, True
        _wait_rebuilt(held[0], chunk_index, generation)


build.write_chunk = write_chunk  # process_chunk calls it through preprocess.build's namespace
store._check_generation = check_generation  # write_chunk calls it through common.store.chunks' namespace
