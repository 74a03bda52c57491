"""Store reads from local disk vs a local S3 server (moto), with and without Zarr v3 sharding and consolidated metadata.

The arrays the trainer reads (``train.data``: image, face_region, uv_gt, uv_gt_mask, params, uv_bl, and status) of
one store are copied into 8 variants: {local folder, s3:// on a moto server on 127.0.0.1} x {chunked as the schema
does: one chunk per build chunk | sharded: one shard per build chunk holding one inner chunk per sample} x
{per-array metadata | consolidated metadata}. Each variant is then, ``--repeats`` times, from a fresh open:

* **open**: open the group and every array's metadata (what ``StoreReader`` + ``ChunkCache`` do first);
* **epoch**: every sample through :class:`train.data.ChunkCache` in a shuffled chunk order (whole-chunk reads: how
  ``uvtrain fit`` streams), samples/s; **epoch, meta/chunk**: the same with the array metadata read again for every
  chunk (``group[name][lo:hi]``: what ``ChunkCache`` did before it kept the array handles);
* **random**: ``--random`` single samples at random indices, one read per array each (how ``uvtrain eval`` /
  ``uvprep show`` / ``StoreReader.sample`` read), samples/s.

Baseline of each ratio: the local folder, chunked, per-array metadata (the schema as it is). moto answers from
memory on loopback: it has none of S3's per-request latency (tens of ms), so a request saved is worth more on S3.

    python benchmarks/bench_store_io.py [--store out/demo/store.zarr] [--repeats 3] [--random 32]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import zarr

from common.store import StoreReader, open_store
from train.data import _SAMPLE_ARRAYS, _TARGET_ARRAYS, ChunkCache

NAMES = (*_SAMPLE_ARRAYS, *_TARGET_ARRAYS, "status")


@contextlib.contextmanager
def moto_server():
    """A moto S3 server on a free loopback port, the AWS_* environment pointing at it (fake credentials)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("bench")
        yield "s3://bench"
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def copy_variant(src: zarr.Group, dst: str, chunk: int, sharded: bool, consolidated: bool) -> None:
    """The trainer's arrays of ``src`` into a new group at ``dst``: chunked (chunk, ...) or sharded (one shard of
    ``chunk`` samples, inner chunks of one sample), same codecs; consolidated metadata on request."""
    g = zarr.open_group(dst, mode="w", zarr_format=3)
    for name in NAMES:
        a = src[name]
        rest = a.shape[1:]
        kw = {"shards": (chunk, *rest), "chunks": (1, *rest)} if sharded else {"chunks": (chunk, *rest)}
        b = g.create_array(name, shape=a.shape, dtype=a.dtype, fill_value=a.fill_value, compressors=a.compressors,
                           **kw)
        b[...] = a[...]
    if consolidated:
        zarr.consolidate_metadata(dst, zarr_format=3)


def time_open(loc: str) -> float:
    t = time.perf_counter()
    g = open_store(loc)
    for name in NAMES:
        g[name].shape  # noqa: B018 - the metadata is what is timed
    return time.perf_counter() - t


class RefetchCache(ChunkCache):
    """The baseline: ``ChunkCache`` as it was, reading each array's metadata again for every chunk."""

    def _get(self, c: int) -> dict[str, np.ndarray]:
        self._arrays = {k: self.group[k] for k in self.names}
        return super()._get(c)


def time_epoch(loc: str, chunk: int, n: int, rng: np.random.Generator, cache_cls=ChunkCache) -> float:
    g = open_store(loc)
    cache = cache_cls(g, NAMES, chunk, n, capacity=2)
    order = rng.permutation(-(-n // chunk))
    t = time.perf_counter()
    for c in order:
        idx = np.arange(c * chunk, min((c + 1) * chunk, n))
        cache.gather(rng.permutation(idx))
    return time.perf_counter() - t


def time_random(loc: str, idx: np.ndarray) -> float:
    g = open_store(loc)
    arrays = {k: g[k] for k in NAMES}
    t = time.perf_counter()
    for i in idx:
        for a in arrays.values():
            a[int(i)]
    return time.perf_counter() - t


@dataclasses.dataclass
class Row:
    name: str
    open_s: list[float]
    epoch_s: list[float]
    refetch_s: list[float]
    random_s: list[float]


def main() -> None:
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="out/demo/store.zarr", help="a store built by uvprep build (default: the demo "
                                                                   "store of scripts/demo.sh)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random", type=int, default=32, help="single-sample reads per repeat")
    args = ap.parse_args()
    reader = StoreReader(args.store)
    src, lay = open_store(args.store), reader.layout
    n, chunk = lay.n_samples, lay.chunk
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as bucket:
        variants = {}
        for where, base in (("local", Path(tmp).as_posix()), ("s3", bucket)):
            for sharded in (False, True):
                for consolidated in (False, True):
                    name = f"{where:<5} {'sharded' if sharded else 'chunked'} {'consol.' if consolidated else 'plain'}"
                    loc = f"{base}/{where}-{int(sharded)}{int(consolidated)}.zarr"
                    copy_variant(src, loc, chunk, sharded, consolidated)
                    variants[name] = loc
        random_idx = rng.integers(0, n, args.random)
        for name, loc in variants.items():
            time_epoch(loc, chunk, n, rng)  # warm-up (connection pool, codecs)
            row = Row(name, [], [], [], [])
            for _ in range(args.repeats):
                row.open_s.append(time_open(loc))
                row.epoch_s.append(time_epoch(loc, chunk, n, rng))
                row.refetch_s.append(time_epoch(loc, chunk, n, rng, RefetchCache))
                row.random_s.append(time_random(loc, random_idx))
            rows.append(row)
    raw = sum(src[k].nbytes for k in NAMES) / n
    print(f"store {args.store}: {n} samples in chunks of {chunk}, image {lay.image_size}, UV {lay.uv_size}, "
          f"{raw / 1e3:.0f} kB raw per sample over {len(NAMES)} arrays; {args.repeats} repeats, "
          f"{args.random} random samples\n")
    base = rows[0]
    cols = (("open ms", "open_s", False), ("epoch samples/s", "epoch_s", True),
            ("epoch, meta/chunk", "refetch_s", True), ("random samples/s", "random_s", True))
    head = f"{'variant':<24}" + "".join(f" {title + ' best/med':>26} {'x':>5}" for title, _, _ in cols)
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r.name:<24}"
        for _, key, rate in cols:
            t, t0 = getattr(r, key), getattr(base, key)
            if rate:
                count = n if key in ("epoch_s", "refetch_s") else args.random
                best, med = count / min(t), count / statistics.median(t)
            else:
                best, med = min(t) * 1e3, statistics.median(t) * 1e3
            line += f" {best:>12.1f}/{med:>13.1f} {statistics.median(t0) / statistics.median(t):>5.2f}"
        print(line)
    print("\nrates: max/median over repeats; open: min/median ms. x: speed relative to the first row's "
          "(median over repeats; > 1 is faster)")


if __name__ == "__main__":
    main()
