"""Dask worker preload for ``tests/test_cluster_faults.py`` (``dask worker --preload tests/hold_worker.py``): holds
one chunk write half done, so that the test kills a worker (or its whole node) at a known point of a build: that
chunk's data is written, its completion record is not, other chunks are complete and others not started.

Environment of the worker process: ``UVTEX_HOLD_DIR``, a folder. The first task (over the whole cluster: the claim is
the file ``DIR/claimed``, so a worker restarted by its nanny never holds again) that reaches ``write_chunk``'s second
generation check -- after its data, before its completion record -- writes ``DIR/held-<chunk>`` (text: the worker's
pid) and sleeps until its process is killed; after 300 s it goes on (``DIR/timeout-<chunk>``). Without the variable
this does nothing. Nothing here is imported by the product.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import common.store.chunks as store

DIR = Path(os.environ["UVTEX_HOLD_DIR"]) if os.environ.get("UVTEX_HOLD_DIR") else None
HOLD_LIMIT = 300.0

_seen = threading.local()  # the chunk whose first check this thread passed last
# the original, kept on the module it came from: Dask may execute this file more than once in a process
_check_generation = store.__dict__.setdefault("_unheld_check_generation", store._check_generation)


def _claim() -> bool:
    try:
        fd = os.open(DIR / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def check_generation(path_or_group, group, generation, chunk_index):
    _check_generation(path_or_group, group, generation, chunk_index)
    if getattr(_seen, "chunk", None) != chunk_index:  # the first check of this write: the data comes next
        _seen.chunk = chunk_index
        return
    _seen.chunk = None  # the second check: data written, the completion record not
    if DIR is None or not _claim():
        return
    (DIR / f"held-{chunk_index}").write_text(str(os.getpid()))
    t0 = time.time()
    while time.time() - t0 < HOLD_LIMIT:
        time.sleep(0.1)
    (DIR / f"timeout-{chunk_index}").write_text(str(os.getpid()))


store._check_generation = check_generation  # write_chunk calls it through common.store.chunks' namespace
