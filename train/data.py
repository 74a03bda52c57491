"""Streaming training batches from a store written by ``uvprep build``.

:class:`StoreStream` is an infinite :class:`torch.utils.data.IterableDataset` of ready-made batches:

* **Whole-chunk reads.** Zarr decompresses a whole chunk for any read, so samples are read chunk by chunk
  (one slice per array) into a small per-worker cache and gathered from there (one sample at a time
  decompresses a chunk per sample: ~45x slower, measured in ``benchmarks/bench_train.py``).
* **Order.** Per epoch ``e`` the store's chunks are permuted with ``(seed, e)``; the usable samples in that
  chunk order are cut into ``n_shards = world_size * max(1, num_workers)`` equal contiguous blocks (the few
  left over are dropped for this epoch, so every rank makes the same number of steps and no sample is seen
  twice in an epoch), and every block is shuffled within windows of ``shuffle_window`` chunks' worth of
  samples with ``(seed, e, shard)``. A shard reads only its own chunks (plus at most two partial ones).
* **Position.** A stream is a pure function of ``(store, config, rank, world_size, num_workers)`` and the
  global batch number, so a resumed run passes ``start_batch`` (batches consumed so far) and continues with
  exactly the batches it would have seen. Batch ``i`` of a rank comes from shard ``rank * n + i % n`` at that
  shard's local batch ``i // n``; DataLoader workers are assigned so that its round-robin order is kept.
* **Failed samples** (``status != OK``) are never yielded. The real samples of the two UV discriminators are
  drawn from the samples with a valid centre (``ctr_valid``) or side (``sd_valid``) crop, from streams of their
  own (independent of the generator's batch, as the paper's unpaired partial UV maps are).
* **Rendering is precomputed here** (:mod:`train.render`, :func:`add_renders`): per sample the UV lookup at the
  stored pose (I0, Eq. 5 / 11) and at a random pose (I1), and, for a ``rotate_share`` of the batch, the
  rotate-and-render input of Section 4.1 (UV_bl rendered at the random pose replaces the photo; the targets stay
  the original's). With ``render_in_loader=False`` the batch carries the poses only and the trainer rasterises
  on its device (a GPU rasterises a batch far faster than CPU workers can).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from common.facemodel import FaceModel
from common.signals import blocked_signals
from common.store import OK, ChunkVerifier, StoreReader
from train.render import PosedMesh, render_lookup, rotated_params

__all__ = ["DataConfig", "IndexStream", "StoreStream", "NoUsableSamples", "add_renders", "images_to_tensor",
           "make_loader", "resize_images"]

_SAMPLE_ARRAYS = ("image", "face_region", "uv_gt", "uv_gt_mask", "params")
_TARGET_ARRAYS = ("uv_bl",)


class NoUsableSamples(ValueError):
    """The store has too few OK samples for the requested sharding."""


@dataclass(frozen=True)
class DataConfig:
    """What a training batch holds; part of the run config (a change changes the data order)."""

    batch_size: int = 6
    """Samples per batch and per rank."""
    image_size: int = 128
    """Side of the images the models see and the renders are made at (store images are resized)."""
    seed: int = 0
    """Seed of the data order and the per-sample random poses."""
    shuffle_window: int = 4
    """Chunks' worth of samples shuffled together (memory: this many decoded chunks per worker)."""
    with_targets: bool = True
    """Also load the generator phase's arrays: UV_bl, I1 lookups, the discriminators' real crops."""
    rotate_share: float = 0.0
    """Share of each batch replaced by rotate-and-render inputs (Section 4.1); generator phase only."""
    max_yaw: float = 60.0
    """I1 and rotate-and-render poses have a yaw drawn uniformly in [-max_yaw, max_yaw] degrees."""
    render_in_loader: bool = True
    """Rasterise (UV lookups, rotate-and-render) in the loader; False: the trainer calls :func:`add_renders`."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 16 or self.shuffle_window < 1:
            raise ValueError(f"DataConfig: need batch_size >= 1, image_size >= 16, shuffle_window >= 1, found "
                             f"{self.batch_size}, {self.image_size}, {self.shuffle_window}")
        if not 0.0 <= self.rotate_share <= 1.0 or not 0.0 <= self.max_yaw <= 90.0:
            raise ValueError(f"DataConfig: need 0 <= rotate_share <= 1 and 0 <= max_yaw <= 90, found "
                             f"{self.rotate_share}, {self.max_yaw}")


class IndexStream:
    """The deterministic, sharded, epoch-by-epoch order over a set of sample indices.

    indices: (n,) ascending store indices; chunk: samples per store chunk. ``take(pos, k)`` returns the
    shard's sample indices at stream positions ``[pos, pos + k)`` (epochs follow each other).
    """

    def __init__(self, indices: np.ndarray, chunk: int, seed: int, shard: int, n_shards: int, window: int,
                 what: str = "samples") -> None:
        indices = np.asarray(indices, np.int64)
        self.groups = [g for g in np.split(indices, np.flatnonzero(np.diff(indices // chunk)) + 1) if g.size]
        self.per_epoch = len(indices) // n_shards
        if self.per_epoch == 0:
            raise NoUsableSamples(f"{len(indices)} usable {what}, fewer than the {n_shards} data shards "
                                  f"(ranks x loader workers); build a larger store or use fewer workers")
        self.seed, self.shard, self.window = int(seed), int(shard), int(window) * int(chunk)
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch(self, e: int) -> np.ndarray:
        """(per_epoch,) int64: the shard's order in epoch ``e``."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        perm = np.random.default_rng([self.seed, e]).permutation(len(self.groups))
        flat = np.concatenate([self.groups[c] for c in perm])
        block = flat[self.shard * self.per_epoch:(self.shard + 1) * self.per_epoch].copy()
        rng = np.random.default_rng([self.seed, e, self.shard, 1])
        for s in range(0, len(block), self.window):
            block[s:s + self.window] = rng.permutation(block[s:s + self.window])
        self._cache = (e, block)
        return block

    def take(self, pos: int, k: int) -> np.ndarray:
        out, m = [], self.per_epoch
        while k > 0:
            e, o = divmod(pos, m)
            part = self.epoch(e)[o:o + k]
            out.append(part)
            pos, k = pos + len(part), k - len(part)
        return np.concatenate(out)


class ChunkCache:
    """Whole-chunk reads of some arrays of a store, kept for ``capacity`` chunks (least recently used out)."""

    def __init__(self, group: zarr.Group, names: tuple[str, ...], chunk: int, n: int, capacity: int,
                 verifier: ChunkVerifier | None = None) -> None:
        self.group, self.names, self.chunk, self.n, self.capacity = group, names, chunk, n, capacity
        self.verifier = verifier  # each chunk checked against its SHA-256 record on its first read in this process
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        # array handles opened once: `group[name]` reads the array's metadata every time, one request per array and
        # chunk on object storage (halved the epoch rate on S3: benchmarks/bench_store_io.py)
        self._arrays = {k: group[k] for k in names}

    def _get(self, c: int) -> dict[str, np.ndarray]:
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        full = None if self.verifier is None else self.verifier.check(c)
        if full is not None:  # read whole to verify it: no second read
            data = {k: full[k] for k in self.names}
        else:
            lo, hi = c * self.chunk, min((c + 1) * self.chunk, self.n)
            data = {k: self._arrays[k][lo:hi] for k in self.names}
        self._chunks[c] = data
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return data

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """name -> (len(idx), ...) values of the samples ``idx`` (any order)."""
        rows: dict[str, list[np.ndarray]] = {k: [] for k in self.names}
        for i in idx:
            c = int(i) // self.chunk
            d = self._get(c)
            for k in self.names:
                rows[k].append(d[k][int(i) - c * self.chunk])
        return {k: np.stack(v) for k, v in rows.items()}


def images_to_tensor(a: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def _mask(a: np.ndarray) -> torch.Tensor:
    """(B, H, W) bool -> (B, 1, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1).to(torch.float32)


def resize_images(x: torch.Tensor, size: int, binary: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): antialiased bilinear, clamped to [0, 1] (masks re-binarised). The one
    resize of the network input, shared by training, ``uvtrain infer`` and ``uvtrain eval``."""
    if x.shape[-1] == size:
        return x
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (y > 0.5).to(x.dtype) if binary else y.clamp_(0.0, 1.0)


class StoreStream(IterableDataset):
    """Infinite stream of training batches of one rank (see the module docstring).

    Each item is a dict (B = batch_size, S = image_size, U = the store's UV size):

    ==============  ==================  ==========================================================
    key             shape               meaning
    ==============  ==================  ==========================================================
    batch           int                 global batch number of this rank
    index           (B,) int64          store indices
    image           (B, 3, S, S)        the input (the photo, or its rotate-and-render), [0, 1]
    target          (B, 3, S, S)        I^m: the photo with everything but the face region zeroed
    face            (B, 1, S, S)        the face region (``face_region``), {0, 1}
    frame           int                 side of the stored image (the frame of params0 / params1)
    params0         (B, 62) float32     the stored fit
    grid0, cover0   (B, S, S, 2), (B, 1, S, S)  UV lookup at the stored pose (render_in_loader, else add_renders)
    points0         (B, 68, 2)          the fit's 68 landmarks in the image (pixel centres at integers; with grid0,
                                        when the face model has keypoints): the identity network's alignment
    uv_gt           (B, 3, U, U)        UV_gt, [0, 1]
    uv_gt_mask      (B, 1, U, U)        its observed texels
    uv_bl           (B, 3, U, U)        UV_bl (with_targets)
    params1         (B, 62) float32     the same faces at a random yaw (with_targets)
    grid1, cover1   as grid0, cover0    UV lookup at params1 (with_targets; as grid0)
    points1         (B, 68, 2)          landmarks at params1 (as points0)
    rotated         (B,) bool           the input is a rotate-and-render (with_targets)
    ctr_real[_mask] (B, 3|1, hc, wc)    real centre crops and masks (with_targets, when the store has any)
    ctr_index       (B,) int64          their store indices
    sd_real[_mask]  (B, 3|1, hs, ws)    real side crops and masks (same)
    sd_index        (B,) int64          their store indices
    ==============  ==================  ==========================================================
    """

    def __init__(self, store, config: DataConfig = DataConfig(), rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> None:
        super().__init__()
        reader = StoreReader(store)
        self.store, self.config, self.rank, self.world_size = store, config, int(rank), int(world_size)
        self.start_batch = int(start_batch)
        self.layout = reader.layout
        status = reader.checked_status()
        self.ok = np.flatnonzero(status == OK)
        if self.ok.size == 0:
            counts = reader.counts()
            raise NoUsableSamples(f"{store} has no usable samples ({counts['ok']} OK, {counts['failed']} failed, "
                                  f"{counts['pending']} pending); build it with `uvprep build` first")
        self.ctr = self.sd = np.zeros(0, np.int64)
        if config.with_targets:
            self.ctr = np.flatnonzero((status == OK) & reader.group["ctr_valid"][:])
            self.sd = np.flatnonzero((status == OK) & reader.group["sd_valid"][:])

    # ------------------------------------------------------------------------------------ planning
    def n_shards(self, num_workers: int) -> int:
        return self.world_size * max(1, num_workers)

    def usable(self, num_workers: int) -> dict[str, bool]:
        """Which streams have at least one sample per shard: {"samples", "ctr", "sd"}."""
        n = self.n_shards(num_workers)
        return {"samples": len(self.ok) >= n, "ctr": len(self.ctr) >= n, "sd": len(self.sd) >= n}

    def _streams(self, shard: int, n_shards: int) -> dict[str, IndexStream]:
        c, w, s = self.layout.chunk, self.config.shuffle_window, self.config.seed
        streams = {"samples": IndexStream(self.ok, c, s, shard, n_shards, w)}
        for key, idx, salt in (("ctr", self.ctr, 101), ("sd", self.sd, 202)):
            if len(idx) >= n_shards:
                streams[key] = IndexStream(idx, c, s + salt, shard, n_shards, w, what=f"{key} crops")
        return streams

    # ----------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        n = max(1, n_workers)
        # worker w serves the global batches i = start + w + k n, all of shard (start + w) % n
        first = self.start_batch + worker
        local_shard = first % n
        shard = self.rank * n + local_shard
        return self._iterate(shard, self.n_shards(n_workers), first, n)

    def _iterate(self, shard: int, n_shards: int, first: int, step: int) -> Iterator[dict]:
        reader = StoreReader(self.store)
        model = reader.face_model()
        mesh = PosedMesh(model) if self.config.render_in_loader else None
        streams = self._streams(shard, n_shards)
        cap = self.config.shuffle_window + 2
        names = _SAMPLE_ARRAYS + (_TARGET_ARRAYS if self.config.with_targets else ())
        n = len(reader)
        check = reader.verifier  # one per worker process: every chunk it reads is verified once
        caches = {"samples": ChunkCache(reader.group, names, self.layout.chunk, n, cap, check),
                  "ctr": ChunkCache(reader.group, ("uv_ctr", "uv_ctr_mask"), self.layout.chunk, n, cap, check),
                  "sd": ChunkCache(reader.group, ("uv_sd", "uv_sd_mask"), self.layout.chunk, n, cap, check)}
        b = self.config.batch_size
        i = first
        while True:
            local = i // step
            batch = {"batch": i}
            idx = streams["samples"].take(local * b, b)
            batch.update(self._samples(caches["samples"].gather(idx), idx, model, mesh, shard, local))
            for key in ("ctr", "sd"):
                if key in streams:
                    cidx = streams[key].take(local * b, b)
                    crops = caches[key].gather(cidx)
                    batch[f"{key}_index"] = torch.from_numpy(cidx)
                    batch[f"{key}_real"] = images_to_tensor(crops[f"uv_{key}"])
                    batch[f"{key}_real_mask"] = _mask(crops[f"uv_{key}_mask"])
            yield batch
            i += step

    def _samples(self, a: dict[str, np.ndarray], idx: np.ndarray, model: FaceModel, mesh: PosedMesh | None,
                 shard: int, local: int) -> dict:
        cfg, s, h = self.config, self.config.image_size, self.layout.image_size
        image = resize_images(images_to_tensor(a["image"]), s)
        face = resize_images(_mask(a["face_region"]), s, binary=True)
        out = {"index": torch.from_numpy(idx), "image": image, "target": image * face, "face": face,
               "uv_gt": images_to_tensor(a["uv_gt"]), "uv_gt_mask": _mask(a["uv_gt_mask"]), "frame": h,
               "params0": torch.from_numpy(np.ascontiguousarray(a["params"], np.float32))}
        if cfg.with_targets:
            rng = np.random.default_rng([cfg.seed, 7, shard, local])
            yaw = rng.uniform(-cfg.max_yaw, cfg.max_yaw, len(idx))
            rotate = rng.random(len(idx)) < cfg.rotate_share
            out.update(uv_bl=images_to_tensor(a["uv_bl"]), rotated=torch.from_numpy(rotate),
                       params1=torch.from_numpy(rotated_params(a["params"], yaw, h, model)))
        if mesh is not None:
            add_renders(out, mesh, s)
        return out


def add_renders(batch: dict, mesh: PosedMesh, size: int) -> dict:
    """Rasterise a batch's faces into UV lookups and make its rotate-and-render inputs, in place, on mesh's device.

    Adds ``grid0``/``cover0`` (stored pose ``params0``) and, when the batch has ``params1`` (the random pose),
    ``grid1``/``cover1``, and replaces ``image`` where ``rotated`` by UV_bl rendered at ``params1`` (Section 4.1).
    Done in the loader's workers by default, or in the training step (``uvtrain fit --render-on device``).
    """
    f = int(batch["frame"])
    verts0 = mesh.verts(batch["params0"], f, size)
    batch["grid0"], batch["cover0"] = mesh.lookup(verts0, size)
    if mesh.keypoints is not None:
        batch["points0"] = mesh.landmarks(verts0)
    if "params1" in batch:
        verts1 = mesh.verts(batch["params1"], f, size)
        grid1, cover1 = mesh.lookup(verts1, size)
        batch["grid1"], batch["cover1"] = grid1, cover1
        if mesh.keypoints is not None:
            batch["points1"] = mesh.landmarks(verts1)
        r = batch["rotated"].to(grid1.device)
        if bool(r.any()):
            image = batch["image"].clone()
            image[r] = render_lookup(batch["uv_bl"][r], grid1[r], cover1[r])
            batch["image"] = image
    return batch


WORKER_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals a loader worker ignores unless its own main process sends them: a scheduler signals the whole process
group (SLURM's SIGTERM, its SIGUSR1 warning, Ctrl-C in a terminal), and a worker that died of it took the step and
the checkpoint write of the main process with it (torch: "DataLoader worker is killed by signal"). The main process
alone decides to stop (:class:`train.distributed.StopSignals`), then shuts its workers down; a SIGTERM it sends
itself (``Process.terminate``: torch's shutdown of a worker that does not exit in time, multiprocessing's at exit)
still ends the worker, or the main process would wait for it forever at exit."""


def _obey_only_the_parent(parent: int) -> None:
    """A worker thread taking :data:`WORKER_IGNORED` (blocked in every thread of the worker) as they come: SIGTERM
    from ``parent`` ends the worker, with status 0 (the main process shutting it down asked for it: a non-zero status
    would make torch's SIGCHLD handler report a worker failure), everything else is dropped."""
    while True:
        info = signal.sigwaitinfo(WORKER_IGNORED)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def _ignore_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """A loader worker's ``worker_init_fn``: :data:`WORKER_IGNORED` stay blocked (:class:`_Loader` starts the workers
    with them blocked, and threads inherit it) and a thread takes them with ``sigwaitinfo``, which names the sender;
    then the caller's ``worker_init_fn``. Without ``sigwaitinfo`` (macOS) SIGINT and SIGUSR1 are ignored and SIGTERM
    keeps torch's handling (it ends the worker)."""
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
        threading.Thread(target=_obey_only_the_parent, args=(os.getppid(),), name="uvtrain-worker-signals",
                         daemon=True).start()
    else:
        for s in (signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)
    if then is not None:
        then(worker_id)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers start with :data:`WORKER_IGNORED` blocked (workers and the pin-memory thread start in
    ``__iter__``): a signal sent between a worker's fork and its ``worker_init_fn`` stays pending for it, instead of
    reaching torch's worker SIGTERM handler."""

    def __iter__(self):
        with blocked_signals(WORKER_IGNORED):
            return super().__iter__()


def make_loader(dataset: StoreStream, num_workers: int, pin_memory: bool = False,
                worker_init_fn: Callable[[int], None] | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ready-made batches (``batch_size=None``) that keeps the stream's batch order. Its workers
    ignore SIGINT, SIGTERM and SIGUSR1 from any other process than the main one (:data:`WORKER_IGNORED`);
    ``worker_init_fn`` runs after that is set up."""
    if num_workers == 0:
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=pin_memory)
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=True,
                   prefetch_factor=4, worker_init_fn=functools.partial(_ignore_stop_signals, then=worker_init_fn))
