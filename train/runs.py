"""A training run's directory: the files :func:`train.loop.fit` writes, and loading a trained run back.

Run directory ``R``: ``config.json`` (the :class:`TrainConfig`; a rerun with another config is refused),
``store.json`` (the training store's identity, :func:`common.store.identity.store_identity`; a rerun on a store
rebuilt with other settings or other data is refused, and so is an incomplete store), ``.uvtrain-run.lock`` (held
while ``uvtrain fit`` runs: a second one into the same directory is refused), ``checkpoint.pt`` (written
atomically; models, optimisers, scaler, step, data position, RNG states, log accumulators), ``sampler.pt`` (the
sampler at the end of its phase), ``metrics.jsonl`` (one row per log step), ``previews/*.png`` and ``tb/``
(TensorBoard), and the inference bundle (:mod:`train.bundle`). Rerunning the same command resumes from
``checkpoint.pt``.

``uvtrain infer`` and ``uvtrain eval`` load a run with :func:`load_trained` and apply it with :func:`predict_uv`
(or the two networks directly), without the training loop; :func:`resolve_device` and :func:`load_identity` turn
the flags all three commands share into a device and a network, or a one-line :class:`RunError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.configdiff import dotted_differences
from common.identity import load_identity as common_load_identity
from common.imageio import image_grid, write_png
from common.store import BuildLock, LockHeld, acquire_lock
from common.store.identity import data_sha256, identity_differences, same_build, store_identity
from train.bundle import BUNDLE_DIR, InferenceBundle, read_bundle
from train.config import RunOptions, TrainConfig
from train.models import UVGenerator, UVSampler

CHECKPOINT, SAMPLER_CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "sampler.pt", "config.json", "metrics.jsonl"
STORE_RECORD = "store.json"
"""The identity of the store a run trains on (:func:`check_run_store`), written with ``config.json``."""
RUN_LOCK = ".uvtrain-run.lock"
"""The run directory's lock (:func:`run_lock`): the build lock of :mod:`common.store.lock` under another name."""
BEST = "best.pt"
"""The checkpoint of the best held-out validation (``--val-store``, :mod:`train.validate`), as ``checkpoint.pt``."""
PREVIEWS, TENSORBOARD = "previews", "tb"
EXPORT_MANIFEST, EXPORT_WEIGHTS = "export.json", "model.safetensors"
"""An export directory (``uvtrain export``, :mod:`train.export`) holds ``config.json`` and ``inference/`` as a run
does, the weights as ``model.safetensors`` and ``export.json``: the SHA-256 of every file, checked on load."""


class RunError(RuntimeError):
    """A problem the user fixes (bad run directory, config mismatch, missing CUDA...): printed as one line."""


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device: cpu, cuda or cuda:N, the latter only where CUDA is available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                       f"use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: expected cpu, cuda or cuda:N")
    return dev


def load_identity(spec: str, device: torch.device) -> torch.nn.Module | None:
    """The frozen face-recognition network of Eq. 13 (:func:`common.identity.load_identity`): None for ``none``;
    a missing or unknown network is a :class:`RunError`.

    It maps (B, 3, H, W) images in [0, 1] and their (B, 68, 2) landmarks to (B, D) identity features.
    """
    try:
        return common_load_identity(spec, device)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None


# ------------------------------------------------------------------------------------ run directory
def read_run_json(path: Path, fix: str) -> Any:
    """The JSON in a run directory's file ``path``; a truncated or garbled file is a one-line :class:`RunError`
    ending with ``fix`` (what to do)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged (not JSON: {e}; truncated by a crash?); {fix}") from None


def prepare_run_dir(cfg: TrainConfig, run: RunOptions, write: bool, store: dict | None = None) -> None:
    """Check ``run.run_dir`` (refuse a different config unless ``overwrite``); with ``write``, create it, clear its
    state on ``overwrite``, and write ``config.json`` (and ``store.json``: ``store``, the identity from
    :func:`check_run_store`).

    :func:`train.loop.fit` calls it twice: first to check only, and to write only after every start-up check passed
    (store, device, batch size...), so that a failed start leaves no ``config.json`` that would refuse the corrected
    command."""
    rd = Path(run.run_dir)
    if not rd.parent.is_dir():
        raise RunError(f"run directory {rd}: its parent {rd.parent} does not exist; create it first")
    if rd.exists() and not rd.is_dir():
        raise RunError(f"run directory {rd} exists and is not a directory")
    cfg_path = rd / CONFIG
    if cfg_path.exists() and not run.overwrite:
        saved = read_run_json(cfg_path, f"restore it, or pass --overwrite to restart the run in {rd}")
        diffs = dotted_differences(TrainConfig.current_json(saved), cfg.to_json(), old_name="run dir")
        if diffs:
            raise RunError(f"{rd} holds a run with another config ({'; '.join(diffs)}); pass --overwrite to "
                           f"restart it or choose another --run-dir")
    if not write:
        return
    try:
        rd.mkdir(exist_ok=True)
        if run.overwrite:
            for name in (CHECKPOINT, SAMPLER_CHECKPOINT, BEST, METRICS, CONFIG, STORE_RECORD):
                (rd / name).unlink(missing_ok=True)
            for name in (PREVIEWS, TENSORBOARD, BUNDLE_DIR):  # the bundle: --overwrite may change the store
                shutil.rmtree(rd / name, ignore_errors=True)
        (rd / PREVIEWS).mkdir(exist_ok=True)
        if store is not None:
            atomic_write_text(rd / STORE_RECORD, json.dumps(store, indent=2))
        if not cfg_path.exists():
            atomic_write_text(cfg_path, json.dumps(cfg.to_json(), indent=2))
    except OSError as e:
        raise RunError(f"run directory {rd} is not writable ({e.strerror or e})") from None


def check_run_store(run_dir: Path, group, store: str, overwrite: bool) -> tuple[dict, list[str]]:
    """(identity, notes) of the training store (an open group) after checking it against the run's
    ``store.json``; raises :class:`RunError` for an incomplete store, or a store that is not the one the run
    trained on: rebuilt with other settings, other photos or other data (named in the message).

    The data digest (:func:`common.store.identity.data_sha256`) is read again only when a build ran since the
    record was taken (:func:`common.store.identity.same_build`). ``overwrite``: the record is ignored (the run
    restarts). A store that was rebuilt with the same settings and identical data passes, with a note."""
    rd = Path(run_dir)
    ident = store_identity(group, with_data=False)
    if not ident["complete"]:
        raise RunError(f"{store} is INCOMPLETE: {ident['chunks_done']} of {ident['n_chunks']} chunks built (a build "
                       f"is running or was interrupted); finish it with the same `uvprep build` command (`uvprep "
                       f"check {store}` says more), then train")
    path = rd / STORE_RECORD
    recorded = None
    if path.is_file() and not overwrite:
        recorded = read_run_json(path, f"delete it to record the store again (only if {store} is the store this run "
                                       f"trained on), or pass --overwrite to restart the run")
    if recorded is not None and same_build(recorded, ident):
        ident["data_sha256"] = recorded.get("data_sha256")
    else:
        ident["data_sha256"] = data_sha256(group)
    notes: list[str] = []
    if recorded is not None:
        diffs = identity_differences(recorded, ident, old_name="run's store", new_name="now")
        if diffs:
            raise RunError(f"{store} is not the store this run trained on ({'; '.join(diffs)}; recorded in {path}): "
                           f"it was rebuilt or changed since. Train on the store as it was, or start a new run "
                           f"(--overwrite, or another --run-dir)")
        if recorded.get("created") != ident["created"]:
            notes.append(f"{store} was rebuilt (created {ident['created']}, the run started on one created "
                         f"{recorded.get('created')}) with the same settings and identical data: resuming")
    elif (rd / CHECKPOINT).is_file() and not overwrite:
        notes.append(f"{rd} has no {STORE_RECORD} (a run started by an older uvtrain): the store is recorded now, but "
                     f"the steps trained so far could not be checked against it")
    return ident, notes


def check_batch_size(cfg: TrainConfig, samples_ok: int, world_size: int) -> None:
    """Refuse a batch larger than the usable samples of one data shard (a rank's loader worker draws whole batches
    from its shard: a larger batch repeats faces within the batch and only costs memory)."""
    shards = world_size * max(1, cfg.workers)
    per_shard = samples_ok // shards
    where = (f"{samples_ok} usable samples in {cfg.store} over {world_size} rank(s) x {max(1, cfg.workers)} loader "
             f"worker(s)")
    if per_shard == 0:
        raise RunError(f"{where}: fewer samples than data shards; use fewer --workers or a larger store")
    if cfg.batch_size > per_shard:
        fewer = ", fewer --workers" if cfg.workers > 1 else ""
        raise RunError(f"--batch-size {cfg.batch_size}: larger than the {per_shard} samples each batch is drawn from "
                       f"({where}); use --batch-size {per_shard} or less{fewer}, or a larger store")


def acquire_run_lock(run_dir: Path) -> BuildLock:
    """Take the run directory's lock (:data:`RUN_LOCK`, creating the directory) or raise :class:`RunError` naming
    the ``uvtrain fit`` that holds it. A lock left by a dead process on this host (or by an earlier incarnation of
    this SLURM job) is taken over (:func:`common.store.acquire_lock`)."""
    rd = Path(run_dir)
    try:
        return acquire_lock(rd, RUN_LOCK, "uvtrain fit")
    except LockHeld as e:
        h = e.holder
        if h is None:
            raise RunError(f"could not take the run lock {e.where}: it kept changing hands; try again") from None
        raise RunError(f"{rd} is in use by {h.get('owner', '?')} (pid {h.get('pid')} on {h.get('host')}, user "
                       f"{h.get('user', '?')}, started {h.get('started')}): wait for it to end or choose another "
                       f"--run-dir; if that process is dead (its machine crashed), delete {e.where} and "
                       f"rerun") from None
    except OSError as e:
        raise RunError(f"run directory {rd} is not writable ({e.strerror or e})") from None


@contextlib.contextmanager
def run_lock(run_dir: Path, hold: bool = True):
    """Hold the run directory's lock (:func:`acquire_run_lock`) while the body runs (``hold``: rank 0 only). A run
    directory the lock had to create and that is still empty when the body fails is removed again."""
    if not hold:
        yield None
        return
    rd = Path(run_dir)
    existed = rd.exists()
    lock = acquire_run_lock(rd)
    try:
        yield lock
    finally:
        lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                rd.rmdir()  # only when empty: a failed start leaves nothing behind


def load_run_config(run_dir: Path) -> TrainConfig:
    """The :class:`TrainConfig` stored in a run directory or an export directory (whose files are verified first)."""
    path = Path(run_dir) / CONFIG
    if is_export(run_dir):
        verify_export(run_dir)
    if not path.is_file():
        raise RunError(f"{run_dir}: not a uvtrain run directory (no {CONFIG})")
    saved = read_run_json(path, "restore it from a copy of the run directory")
    try:
        return TrainConfig.from_json(saved)
    except (TypeError, ValueError, AttributeError) as e:
        raise RunError(f"{path} is not a uvtrain run config ({e}); restore it from a copy of the run "
                       f"directory") from None


def trained_run_dir(checkpoint: Path) -> Path:
    """The run (or export) directory of ``uvtrain infer/eval --checkpoint`` (a directory, or a checkpoint file in
    one), after checking that it holds a run and trained weights: a :class:`RunError` names what is missing (not
    the training store the run directory would otherwise fall back to)."""
    ck = Path(checkpoint)
    if not ck.exists():
        raise RunError(f"--checkpoint {ck}: no such file or directory")
    rd = ck.parent if ck.is_file() else ck
    if is_export(rd):
        return rd
    if not (rd / CONFIG).is_file():
        raise RunError(f"--checkpoint {ck}: {rd} is not a uvtrain run directory (no {CONFIG}); pass the --run-dir "
                       f"of a `uvtrain fit` or a `uvtrain export` folder")
    if not ck.is_file() and not (rd / CHECKPOINT).is_file():
        raise RunError(f"--checkpoint {ck}: the run has no {CHECKPOINT} yet (it stopped before its first checkpoint, "
                       f"written every --checkpoint-every steps and at each stage's end); rerun its `uvtrain fit "
                       f"--run-dir {rd}` command to train it")
    return rd


def is_export(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``uvtrain export`` (it has ``export.json``)."""
    return (Path(path) / EXPORT_MANIFEST).is_file()


def verify_export(export_dir: Path) -> dict:
    """The manifest of an export directory, after checking every file it lists against its SHA-256; a missing or
    changed file is a :class:`RunError`."""
    from common.files import sha256_file

    d = Path(export_dir)
    manifest = json.loads((d / EXPORT_MANIFEST).read_text())
    for name, want in sorted(manifest.get("files", {}).items()):
        f = d / name
        if not f.is_file():
            raise RunError(f"{f}: missing from the export (listed in {EXPORT_MANIFEST}); export the run again")
        got = sha256_file(f)
        if got != want:
            raise RunError(f"{f}: SHA-256 {got[:16]}… does not match {EXPORT_MANIFEST} ({want[:16]}…): the export "
                           f"was changed or damaged; export the run again")
    return manifest


# ------------------------------------------------------------------------------------ checkpoints
DIGEST = "sha256"
"""Key of a checkpoint's own SHA-256 (:func:`payload_sha256` of everything else in it), checked on every load: the
digest lives inside the one file that is renamed into place, so a ``kill -9`` at any moment leaves a checkpoint and
its digest that agree (a sidecar file would disagree between the two renames)."""
TMP_INFIX = ".tmp-"
"""Temporary files of :func:`_atomic_write`: ``.NAME.tmp-PID`` beside ``NAME`` (removed by :func:`remove_stale_temps`
when an interrupted write left one)."""
TRAIN_KEYS = ("step", "stage", "models", "optims", "scaler", "rng", "accum", "accum_n")
"""What resuming a run needs from a checkpoint (:meth:`train.loop.Trainer.load_state_dict`)."""
TRAIN_NETS = ("sampler", "generator", "discriminators")
WEIGHT_KEYS, WEIGHT_NETS = ("step", "models"), ("sampler", "generator")
"""What inference needs from a checkpoint (:func:`load_trained`)."""
DAMAGED_FIX = "restore it from a backup, or start the run again with `uvtrain fit --overwrite`"


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``; the temporary file is
    removed when anything fails (a full disk, an interrupt)."""
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (``torch.save`` wraps a failed write in a RuntimeError "unexpected pos")."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def payload_sha256(obj: Any) -> str:
    """Hex SHA-256 of a checkpoint's contents: its nested dicts (keys sorted), lists, tuples and scalars, and each
    tensor's dtype, shape and bytes. The same for the object :func:`atomic_save` is given and for what ``torch.load``
    reads back, whatever the zip archive's layout."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k in sorted(x, key=repr):
                h.update(f"{k!r}=".encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__}{len(x)}:".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in nested dicts / lists that hold a NaN or an infinity (one
    device synchronisation for all of them)."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(x: Any, name: str) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.numel():
                found.append((name, x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    if not found:
        return []
    ok = torch.stack([torch.isfinite(t).all().to(found[0][1].device) for _, t in found]).cpu()
    return [name for (name, _), good in zip(found, ok.tolist(), strict=True) if not good]


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_cpu(v) for v in x)
    return x


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` a checkpoint (on the CPU, with its :data:`DIGEST`) atomically: temporary file, fsync, rename over
    ``path``. A failed write (disk full, read-only folder) is a :class:`RunError`; the previous file is untouched."""
    payload = _cpu({k: v for k, v in obj.items() if k != DIGEST})
    payload[DIGEST] = payload_sha256(payload)
    try:
        _atomic_write(Path(path), lambda f: torch.save(payload, f))
    except Exception as e:
        err = _os_error(e)
        if err is None:
            raise
        raise RunError(f"{path}: checkpoint not written ({err.strerror or err}); the previous {Path(path).name} is "
                       f"intact; free space in (or allow writing to) {Path(path).parent} and rerun to resume") from None


def _read(path: Path, mmap: bool = False) -> dict:
    """``torch.load`` (CPU, ``weights_only``) with every way a file can fail as one-line :class:`RunError`."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise RunError(f"{path} is empty (0 bytes; a write cut off or a full disk?); {DAMAGED_FIX}")
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # RNG states must stay CPU tensors
    except RunError:
        raise
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # torch's zip reader and the weights-only unpickler raise many kinds
        if not zipfile.is_zipfile(path):
            why = f"not a torch archive: truncated or overwritten, {size} bytes"
        elif isinstance(e, pickle.UnpicklingError):  # its message advises weights_only=False: never here
            why = "it holds objects that are not tensors or plain data"
        else:
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else 'unreadable'}"
        raise RunError(f"{path} is not a readable checkpoint ({why}); {DAMAGED_FIX}") from None
    if not isinstance(ck, dict):
        raise RunError(f"{path} is not a uvtrain checkpoint (it holds a {type(ck).__name__}, not a dict)")
    return ck


def _check_keys(ck: dict, path: Path, keys: tuple[str, ...], nets: tuple[str, ...]) -> None:
    """A :class:`RunError` naming what ``ck`` lacks of ``keys`` and of ``nets`` (in ``models``, and in ``optims``
    where ``keys`` has it)."""
    missing = [k for k in keys if k not in ck]
    for group in ("models", "optims"):
        if group in keys and isinstance(ck.get(group), dict):
            missing += [f"{group}.{n}" for n in nets if not isinstance(ck[group].get(n), dict)]
    if not missing:
        return
    what = ("is not a uvtrain checkpoint" if "models" in missing and "step" in missing else "is incomplete")
    raise RunError(f"{path} {what} (no {', '.join(missing)}); {DAMAGED_FIX}")


def load_checkpoint(path: Path, keys: tuple[str, ...] = TRAIN_KEYS, nets: tuple[str, ...] = TRAIN_NETS,
                    warn: bool = True) -> dict | None:
    """A checkpoint written by :func:`atomic_save`, on the CPU; None when there is none.

    Checked before anything uses it, each failure a one-line :class:`RunError` naming the file: readable
    (``weights_only=True``, never otherwise), its :data:`DIGEST` matches its contents, it holds ``keys`` and the
    networks ``nets``, and those networks' weights (and optimiser states, where ``keys`` has ``optims``) are finite.
    A checkpoint from before digests existed loads unverified, with a warning when ``warn`` (else the caller says
    so: the returned dict then has no :data:`DIGEST`)."""
    path = Path(path)
    if not path.exists():
        return None
    ck = _read(path)
    want = ck.get(DIGEST)
    if want is not None:
        got = payload_sha256({k: v for k, v in ck.items() if k != DIGEST})
        if got != want:
            raise RunError(f"{path}: its contents hash to SHA-256 {got[:16]}…, not the {str(want)[:16]}… written "
                           f"with it: the file was changed or damaged on disk; {DAMAGED_FIX}")
    _check_keys(ck, path, keys, nets)
    checked = {"models": {n: ck["models"][n] for n in nets}}
    if "optims" in keys:
        checked["optims"] = {n: ck["optims"][n] for n in nets}
    bad = nonfinite_tensors(checked)
    if bad:
        raise RunError(f"{path} (step {ck['step']}): {len(bad)} tensor(s) hold NaN or inf (first: "
                       f"{bad[0].removeprefix('models.')}): the run diverged before it was saved; use an earlier "
                       f"checkpoint, or start the run again with lower learning rates (`uvtrain fit --overwrite`)")
    if want is None and warn:
        warnings.warn(f"{path} has no SHA-256 (written before uvtrain checked checkpoints): loaded unverified",
                      stacklevel=2)
    return ck


def checkpoint_record(path: Path, key: str) -> Any:
    """``ck[key]`` of a checkpoint file, memory-mapped (the weights are not read, nor verified); a damaged file is a
    one-line :class:`RunError`."""
    return _read(Path(path), mmap=True).get(key)


def load_networks(nets: dict[str, torch.nn.Module], states: dict[str, dict], path: Path) -> None:
    """``nets[k].load_state_dict(states[k])``; weights of other shapes or names (the store's UV size or the network
    settings changed under the run) are a one-line :class:`RunError` naming ``path``."""
    for name, net in nets.items():
        try:
            net.load_state_dict(states[name])
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
            first = lines[0].split(". ")[0] if lines else str(e).splitlines()[0]
            raise RunError(f"{path}: its {name} does not fit this run's network ({first}); the store's UV size or "
                           f"the network settings changed under the run: use the store and flags it was trained "
                           f"with, or start it again (`uvtrain fit --overwrite`)") from None


def remove_stale_temps(run_dir: Path) -> dict[Path, int]:
    """Remove the temporary files interrupted writes of this run's files left (``.NAME.tmp-PID``, NAME a checkpoint,
    ``config.json`` or ``metrics.jsonl``; nothing else); returns them with their sizes in bytes. Call it only while
    holding the run's lock: no other process writes there then."""
    gone: dict[Path, int] = {}
    for name in (CHECKPOINT, SAMPLER_CHECKPOINT, BEST, CONFIG, METRICS):
        for p in Path(run_dir).glob(f".{name}{TMP_INFIX}*"):
            if p.name[len(name) + 1 + len(TMP_INFIX):].isdigit() and p.is_file():
                gone[p] = p.stat().st_size
                p.unlink(missing_ok=True)
    return gone


def rng_state() -> dict:
    """The global torch (and CUDA) random states, for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ logs
class MetricsLog:
    """The means of a run's loss terms over each log window, as rows of ``metrics.jsonl`` and TensorBoard scalars,
    and its previews. Every rank keeps the running sums (they are part of the checkpoint, so a resumed run logs the
    rows an unstopped one would); only rank 0 (``main``) writes."""

    def __init__(self, rd: Path, main: bool) -> None:
        self.rd, self.main = rd, main
        self.sums: dict[str, float] = defaultdict(float)
        self.n = 0
        self.tb = None
        self.notes: list[str] = []
        """What :meth:`truncate` repaired, one line each (printed as notes of the run)."""

    def open_tensorboard(self, enabled: bool) -> None:
        """Also write to TensorBoard (``R/tb``) when ``enabled``, on rank 0, where tensorboard is installed."""
        if not (enabled and self.main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(self.rd / TENSORBOARD))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Add one step's terms (scalar tensors) to the window."""
        for k, v in terms.items():
            self.sums[k] += float(v.detach())
        self.n += 1

    def flush(self, step: int, phase: str, extra: dict[str, float]) -> dict[str, Any]:
        """The window's means with ``extra`` as a row ``{"step", "phase", loss terms (sorted), extra}``; written by
        rank 0 (tagged ``PHASE/KEY`` in TensorBoard); the window starts again."""
        row: dict[str, Any] = {"step": step, "phase": phase}
        row.update({k: v / max(1, self.n) for k, v in sorted(self.sums.items())})
        row.update(extra)
        self.sums, self.n = defaultdict(float), 0
        self.write(row, f"{phase}/")
        return row

    def write(self, row: dict[str, Any], prefix: str = "") -> None:
        """Append ``row`` (with its ``step``) to ``metrics.jsonl`` and its numbers to TensorBoard (tagged
        ``PREFIX + KEY``), on rank 0."""
        if self.main:
            with open(self.rd / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, float | int) and k != "step":
                        self.tb.add_scalar(f"{prefix}{k}", v, row["step"])

    def truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint a run resumes from at ``step`` (they will be logged again; 0: a run
        that starts afresh drops them all).

        A line that is not a JSON row -- the torn last line of a write cut by a crash or a power loss, often padded
        with NUL bytes -- is dropped too, with a note in :attr:`notes`. Its row is logged again when it came after
        the checkpoint; one from before it (rows are not fsynced, the checkpoint is) stays lost."""
        path = self.rd / METRICS
        if not (self.main and path.exists()):
            return
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
        keep, torn, last = [], [], 0
        for i, ln in enumerate(lines, 1):
            text = ln.strip().strip("\x00")
            if not text:
                continue
            last = i
            try:
                row = json.loads(text)
                row_step = int(row["step"])
            except (ValueError, TypeError, KeyError):
                torn.append(i)
                continue
            if row_step <= step:
                keep.append(text)
        if torn:
            which = f"its torn last line ({last})" if torn == [last] else f"lines {torn}"
            self.notes.append(f"{path}: dropped {which}, not a JSON row (a write cut by a crash or power loss)")
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def state_dict(self) -> dict:
        return {"accum": dict(self.sums), "accum_n": self.n}

    def load_state_dict(self, ck: dict) -> None:
        self.sums, self.n = defaultdict(float, ck["accum"]), int(ck["accum_n"])

    def preview(self, phase: str, step: int, images: dict[str, torch.Tensor], height: int, rows: int = 4
                ) -> Path | None:
        """``previews/PHASE_STEP.png`` (and a TensorBoard image) on rank 0: up to ``rows`` samples of a batch, one
        column per entry of ``images`` ((B, 3|1, H, W) in [0, 1], labelled by its key), tiles ``height`` px tall."""
        if not self.main:
            return None
        keys = list(images)
        n = min(rows, images[keys[0]].shape[0])
        tiles = [[_np_image(images[k][i]) for k in keys] for i in range(n)]
        labels = [keys if i == 0 else [""] * len(keys) for i in range(n)]
        grid = image_grid(tiles, labels=labels, height=height)
        path = write_png(self.rd / PREVIEWS / f"{phase}_{step:07d}.png", grid)
        if self.tb is not None:
            self.tb.add_image(f"{phase}/preview", grid, step, dataformats="HWC")
        return path


def _np_image(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


# ------------------------------------------------------------------------------------ trained models
def load_trained(run_dir: Path, device: str = "cpu", bundle: InferenceBundle | None = None,
                 checkpoint: Path | None = None, config: TrainConfig | None = None
                 ) -> tuple[TrainConfig, UVSampler, UVGenerator, int]:
    """(config, sampler, generator, step) of a run directory's last checkpoint, or of an export directory's weights
    (``uvtrain export``), in eval mode on ``device``.

    bundle: the run's :class:`train.bundle.InferenceBundle` when the caller has read it already (it sizes the
    generator); read here otherwise. checkpoint: another checkpoint file of the run (``best.pt``); default
    :func:`weights_file`. config: the run's config when the caller has loaded it with :func:`load_run_config` (which
    verified an export's files); loaded (and verified) here otherwise, so an export is hashed once per load."""
    cfg = config if config is not None else load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint is not None else weights_file(run_dir)
    if is_export(run_dir):
        if path.name != EXPORT_WEIGHTS:
            raise RunError(f"{run_dir} is an export: its weights are {EXPORT_WEIGHTS}, not {path.name}")
        models, step = _export_state(Path(run_dir))
    else:
        if not path.is_file():
            raise RunError(f"{run_dir}: no {path.name} (train with `uvtrain fit --run-dir {run_dir}` first)")
        ck = load_checkpoint(path, WEIGHT_KEYS, WEIGHT_NETS)  # verified: readable, its SHA-256, finite weights
        models, step = ck["models"], int(ck["step"])
    uv_size = (bundle or read_bundle(Path(run_dir), cfg.store)).uv_size
    sampler, generator = UVSampler(cfg.sampler), UVGenerator(uv_size, cfg.generator)
    load_networks({"sampler": sampler, "generator": generator}, models, path)
    return cfg, sampler.to(device).eval(), generator.to(device).eval(), step


@dataclass(frozen=True)
class TrainedRun:
    """A trained model as ``uvtrain infer`` and ``uvtrain eval`` open it from ``--checkpoint``
    (:func:`open_trained`)."""

    run_dir: Path
    """The run or export directory."""
    config: TrainConfig
    bundle: InferenceBundle
    sampler: UVSampler
    generator: UVGenerator
    step: int
    weights: Path
    """The file the weights came from."""


def open_trained(checkpoint: Path, device: str = "cpu") -> TrainedRun:
    """The trained networks of ``--checkpoint`` (a run or export directory, or a checkpoint file in a run), in eval
    mode on ``device``, with the run's config and inference bundle; a :class:`RunError` names what is missing."""
    ck = Path(checkpoint)
    run_dir = trained_run_dir(ck)  # one line naming what is missing, not the store
    cfg = load_run_config(run_dir)
    bundle = read_bundle(run_dir, cfg.store)
    chosen = ck if ck.is_file() else None
    _, sampler, generator, step = load_trained(run_dir, device, bundle, checkpoint=chosen, config=cfg)
    return TrainedRun(run_dir, cfg, bundle, sampler, generator, step, chosen or weights_file(run_dir))


def weights_file(run_dir: Path) -> Path:
    """The file :func:`load_trained` reads the weights from: ``checkpoint.pt`` or an export's ``model.safetensors``."""
    return Path(run_dir) / (EXPORT_WEIGHTS if is_export(run_dir) else CHECKPOINT)


def _export_state(d: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """({"sampler": state dict, "generator": state dict}, step) of an export directory :func:`load_run_config` has
    verified."""
    from safetensors.torch import load_file

    manifest = json.loads((d / EXPORT_MANIFEST).read_text())
    models: dict[str, dict[str, torch.Tensor]] = {"sampler": {}, "generator": {}}
    for key, value in load_file(d / EXPORT_WEIGHTS).items():
        net, _, name = key.partition(".")
        models[net][name] = value
    return models, int(manifest["step"])


def sampled_inside(grid: torch.Tensor) -> torch.Tensor:
    """The generator's validity mask: texels whose sampling point lies inside the image, (B, U, U, 2) -> (B, 1, U, U).

    The sampler needs no 3D shape, so this is all that is known at inference; texels it points outside the
    image are 0 in UV_spl (``grid_sample`` zero padding) and marked empty.
    """
    return (grid.abs() <= 1.0).all(-1, keepdim=True).permute(0, 3, 1, 2).float()


@torch.no_grad()
def predict_uv(sampler: UVSampler, generator: UVGenerator, image: torch.Tensor, uv_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """UV_spl and UV_pred of images (B, 3, S, S) in [0, 1]: ((B, 3, U, U), (B, 3, U, U)), as the generator phase."""
    uv_spl, grid = sampler(image, out_size=uv_size)
    return uv_spl, generator(uv_spl, sampled_inside(grid), grid=grid)
