"""Start a run from another run's pre-trained sampler (``uvtrain fit --init-sampler``): pre-train the sampler once
(``--phase sampler``) and train several generator variants from it (the ablations of ``scripts/ablations.sh``).

What decided a sampler (:data:`SAMPLER_RECIPE`) must match between the source and the new run; what the phases
share (:data:`SAMPLER_SHARED`) may differ with a note. The source and its checks are recorded in
``RUN/init_sampler.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.configdiff import dotted_differences, flatten_mapping
from common.files import sha256_file
from train.bundle import BUNDLE_DIR
from train.config import TrainConfig
from train.runs import (
    CHECKPOINT,
    DIGEST,
    SAMPLER_CHECKPOINT,
    RunError,
    atomic_write_text,
    load_checkpoint,
    read_run_json,
)

if TYPE_CHECKING:
    from train.loop import Trainer

INIT_SAMPLER = "init_sampler.json"
"""A run started by ``--init-sampler``: where its sampler came from (path, SHA-256 of the file and of its contents,
step, the source's config), so the run can be reproduced from its own folder."""
SAMPLER_RECIPE = ("sampler", "sampler_steps", "finetune_steps", "sampler_image_size", "image_size",
                  "optim.lr_sampler", "weights.grid", "store.uv_size", "store.face_model")
"""What decides the sampler at the end of its phase and must match for ``--init-sampler`` (dotted keys of
:func:`sampler_recipe`)."""
SAMPLER_SHARED = ("batch_size", "seed", "workers", "shuffle_window", "store.path", "weights.face", "weights.uv",
                  "weights.tv", "optim.beta1", "optim.beta2")
"""Settings that also shaped the sampler phase but are the generator phase's too: a difference is a note, so that
generator variants may change them."""


def sampler_recipe(cfg: TrainConfig, uv_size: int, face_model: str) -> dict[str, Any]:
    """What decided (or will decide) a run's sampler at the end of its phase, by dotted key (:data:`SAMPLER_RECIPE`
    and :data:`SAMPLER_SHARED`), for :func:`common.configdiff.dotted_differences`. ``uv_size`` and ``face_model``
    (fingerprint): the training store's."""
    full = flatten_mapping(cfg.to_json())
    full.update({"finetune_steps": cfg.finetune_steps, "store.uv_size": uv_size, "store.face_model": face_model,
                 "store.path": cfg.store})
    return _pick(full, SAMPLER_RECIPE + SAMPLER_SHARED)


def _pick(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The entries of flat ``d`` named by ``keys`` or under one of them (``sampler`` picks ``sampler.n_down``)."""
    return {k: v for k, v in d.items() if any(k == key or k.startswith(key + ".") for key in keys)}


def read_init_sampler(tr: Trainer, source: Path) -> tuple[Path, dict]:
    """(file, checkpoint) of ``--init-sampler SOURCE`` (a run's ``sampler.pt``, or the run directory holding it),
    verified by :func:`train.runs.load_checkpoint` and checked against this run: a sampler at the end of its
    phase, trained with this run's :data:`SAMPLER_RECIPE` on a store of the same UV size and face model (read
    from the inference bundle beside the file); anything else is a one-line :class:`RunError`. Differences in
    :data:`SAMPLER_SHARED` are notes."""
    src = Path(source)
    path = src / SAMPLER_CHECKPOINT if src.is_dir() else src
    if not path.is_file():
        raise RunError(f"--init-sampler {source}: no such file {path}; pass a run directory whose sampler phase "
                       f"is done (`uvtrain fit --phase sampler`), or its {SAMPLER_CHECKPOINT}")
    ck = load_checkpoint(path, keys=("step", "models"), nets=("sampler",))
    try:
        theirs = TrainConfig.from_json(ck["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunError(f"--init-sampler {path}: it holds no readable run config ({type(e).__name__}: {e}), so "
                       f"what trained its sampler is unknown; use a {SAMPLER_CHECKPOINT} of a current uvtrain "
                       f"run") from None
    info_path = path.parent / BUNDLE_DIR / "info.json"
    if not info_path.is_file():
        raise RunError(f"--init-sampler {path}: no {info_path} beside it, so the store it was trained on (UV size, "
                       f"face model) is unknown; pass the {SAMPLER_CHECKPOINT} inside its run directory")
    info = read_run_json(info_path, "restore it from a copy of that run directory")
    step = int(ck["step"])
    if theirs.sampler_steps == 0 or step < theirs.sampler_steps:
        raise RunError(f"--init-sampler {path}: it holds the sampler at step {step}, not at the end of its sampler "
                       f"phase (step {theirs.sampler_steps}); finish that phase first (`uvtrain fit --phase "
                       f"sampler --run-dir {path.parent}`)")
    src = sampler_recipe(theirs, int(info["uv_size"]), str(info["face_model_hash"]))
    ours = sampler_recipe(tr.cfg, tr.uv_size, tr.face_model.fingerprint())

    diffs = dotted_differences(_pick(src, SAMPLER_RECIPE), _pick(ours, SAMPLER_RECIPE), old_name="its sampler")
    if diffs:
        raise RunError(f"--init-sampler {path}: its sampler was trained with other sampler settings "
                       f"({'; '.join(diffs)}); give this run the same sampler flags and store, or train its own "
                       f"sampler (leave out --init-sampler)")
    shared = dotted_differences(_pick(src, SAMPLER_SHARED), _pick(ours, SAMPLER_SHARED), old_name="its sampler")
    if shared:
        tr.notes.append(f"--init-sampler {path}: its sampler phase ran with other shared settings "
                          f"({'; '.join(shared)}; recorded in {INIT_SAMPLER})")
    return path, ck


def init_sampler_source(tr: Trainer) -> tuple[Path, dict] | None:
    """The checked source of ``--init-sampler`` (:func:`read_init_sampler`) when this invocation starts a new
    run from it; None otherwise. The run directory's checkpoint wins: a rerun of the same command (a SLURM requeue)
    resumes, and --init-sampler is ignored with a note. A run started from one and stopped before its first
    checkpoint needs the flag again (its ``init_sampler.json`` says which)."""
    run, rd = tr.run_opts, tr.rd
    fresh = run.overwrite or not (rd / CHECKPOINT).is_file()
    if run.init_sampler is None:
        recorded = rd / INIT_SAMPLER
        if fresh and not run.overwrite and recorded.is_file():
            was = read_run_json(recorded, f"delete it, or pass --overwrite to restart the run in {rd}")
            raise RunError(f"{rd} was started with --init-sampler {was.get('path')} ({recorded}) and has no "
                           f"{CHECKPOINT} yet: pass --init-sampler again, or --overwrite to train its own sampler")
        return None
    if run.phase == "sampler":
        raise RunError("--init-sampler starts a run at the generator phase; --phase sampler would train nothing: "
                       "use --phase generator or all")
    if not fresh:
        tr.notes.append(f"--init-sampler {run.init_sampler} ignored: {rd} resumes from its {CHECKPOINT}")
        return None
    return read_init_sampler(tr, run.init_sampler)


def record_init_sampler(run_dir: Path, path: Path, ck: dict) -> None:
    """Write ``RUN/init_sampler.json``: the source file, its SHA-256 and its contents' digest, its step and config."""
    atomic_write_text(Path(run_dir) / INIT_SAMPLER, json.dumps(
        {"path": str(path.resolve()), "sha256": sha256_file(path), "checkpoint_sha256": ck.get(DIGEST),
         "step": int(ck["step"]), "config": ck["config"]}, indent=2))
