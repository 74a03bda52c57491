"""``uvtrain export``: a trained run as a folder one can hand over.

Export directory ``D`` (read back by :func:`train.runs.load_trained`, so ``uvtrain infer --checkpoint D`` and
``uvtrain eval --checkpoint D`` take it as they take a run directory):

- ``model.safetensors``: the UV sampler's and the UV generator's weights (keys ``sampler.*``, ``generator.*``); no
  optimiser state, no discriminators;
- ``config.json``: the run's :class:`train.config.TrainConfig` (it sizes the networks);
- ``inference/``: the run's inference bundle (:mod:`train.bundle`: face model, UV and image sizes, the store's
  fitter settings);
- ``README.md``: a model card (data, steps, held-out metrics, licence);
- ``export.json``: the step, the source checkpoint and the SHA-256 of every other file, checked on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from common.files import sha256_file
from train.bundle import BUNDLE_DIR, InferenceBundle, read_bundle
from train.config import ExportConfig, TrainConfig
from train.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    EXPORT_MANIFEST,
    EXPORT_WEIGHTS,
    METRICS,
    WEIGHT_KEYS,
    WEIGHT_NETS,
    RunError,
    is_export,
    load_checkpoint,
    load_run_config,
)

MODEL_CARD = "README.md"
FORMAT = "uvtex-export/1"


def pick_checkpoint(run_dir: Path, which: str) -> Path:
    """``RUN/checkpoint.pt`` (``last``), ``RUN/best.pt`` (``best``), or ``best.pt`` where it exists (``auto``)."""
    rd = Path(run_dir)
    best, last = rd / BEST, rd / CHECKPOINT
    if which == "best" or (which == "auto" and best.is_file()):
        if not best.is_file():
            raise RunError(f"{rd}: no {BEST} (a run writes one with `uvtrain fit --val-store`); pass --which last")
        return best
    if not last.is_file():
        raise RunError(f"{rd}: no {CHECKPOINT} to export (train with `uvtrain fit --run-dir {rd}` first)")
    return last


def export_tensors(models: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The sampler's and generator's state dicts as one flat ``{"sampler.KEY" | "generator.KEY": tensor}``;
    a non-finite floating-point weight is a :class:`RunError`."""
    flat = {f"{net}.{k}": v.detach().cpu().contiguous() for net in ("sampler", "generator")
            for k, v in models[net].items()}
    bad = [k for k, v in flat.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); not exported: export an "
                       f"earlier checkpoint (--which) or retrain")
    return flat


def last_validation(run_dir: Path) -> dict | None:
    """The last row of ``RUN/metrics.jsonl`` with held-out (``val/...``) metrics, or None."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    return val[-1] if val else None


def store_summary(store: str) -> dict:
    """The training store's fingerprint and sample counts, where the store can still be read (else empty)."""
    try:
        from common.store import StoreReader
        from train.evaluate import store_fingerprint

        reader = StoreReader(store)
        return {"fingerprint": store_fingerprint(reader), "samples": len(reader),
                "usable": int(len(reader.ok_indices()))}
    except Exception:  # a store moved or deleted since training: the card says so
        return {}


def model_card(cfg: TrainConfig, bundle: InferenceBundle, manifest: dict, store: dict, val: dict | None) -> str:
    """The export's README.md: what the model is, what it was trained on, how far, how it scores, its licence."""
    bfm = "bfm" in bundle.face_model.name.lower()
    data = (f"fingerprint `{store['fingerprint']}`, {store['usable']} usable of {store['samples']} samples"
            if store else "not readable at export time (fingerprint and sample count unknown)")
    if val:
        metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in val.items() if k.startswith("val/")
                            and isinstance(v, int | float))
        held_out = (f"The run's last held-out validation (`uvtrain fit --val-store`; step {val.get('step')}, stage "
                    f"{val.get('stage', '-')}, {val.get('method', '-')}):\n\n| metric | value |\n|---|---|\n{metrics}")
    else:
        held_out = ("None: the run logged no held-out validation (`uvtrain fit --val-store`); measure with "
                    "`uvtrain eval`.")
    licence = ("The training store was built with a BFM-derived face model "
               f"(`{bundle.face_model.name}`): the Basel Face Model's licence allows non-commercial research only, "
               "and this model inherits that restriction (as does `inference/face_model.npz`, which is BFM-derived)."
               if bfm else
               f"Face model `{bundle.face_model.name}` (not BFM-derived). A model trained on a BFM-derived store "
               "inherits the BFM's non-commercial restriction; check also the licences of the training photos.")
    licence += " The code is MIT-licensed (uvtex)."
    return f"""# UV texture model (uvtex)

The UV sampler and UV generator of Yin et al., "Weakly-Supervised Photo-realistic Texture Generation for 3D Face
Reconstruction", exported by `uvtrain export` from `{manifest['source']['run']}`
({manifest['source']['checkpoint']}, step {manifest['step']} of {cfg.total_steps}).

```bash
uvtrain infer --checkpoint THIS_DIR --images photos/ --out textures/
uvtrain eval --checkpoint THIS_DIR --store test.zarr --out metrics.json --baselines
```

## Model

- Input: a face photo framed as the training store's ({bundle.image_size}² there; the networks see
  {cfg.image_size}²). Output: a complete {bundle.uv_size}² UV texture of face model `{bundle.face_model.name}`
  (fingerprint `{bundle.face_model.fingerprint()}`).
- Sampler grid {cfg.sampler.grid_size}; base channels: sampler {cfg.sampler.channels}, generator
  {cfg.generator.channels}. The whole training config is `config.json`.

## Training

- Data: `{bundle.store}`; {data}.
- Steps: {manifest['step']} of {cfg.total_steps} (sampler {cfg.sampler_steps}, its last {cfg.finetune_steps} the
  fine-tune; generator {cfg.generator_steps}), batch {cfg.batch_size}, seed {cfg.seed}.

## Held-out metrics

{held_out}

## Licence

{licence}

## Files

`model.safetensors` (weights), `config.json`, `inference/`, this card; `export.json` holds the SHA-256 of each,
checked whenever the export is loaded.
"""


def _prepare_out(cfg: ExportConfig) -> Path:
    out, rd = Path(cfg.out), Path(cfg.run_dir)
    if out.resolve() == rd.resolve():
        raise RunError(f"--out {out} is the run directory; choose another folder")
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: its parent {out.parent} does not exist; create it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not cfg.overwrite:
            raise RunError(f"--out {out} exists and is not empty; pass --overwrite to replace an export there")
        if not is_export(out):
            raise RunError(f"--out {out} holds something other than an export; choose an empty folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def export_run(cfg: ExportConfig) -> dict:
    """Write the export directory ``cfg.out`` from run ``cfg.run_dir`` and return its manifest (``export.json``).

    Written into a temporary sibling folder and renamed into place, so ``cfg.out`` is never half written."""
    from safetensors.torch import save_file

    rd = Path(cfg.run_dir)
    if is_export(rd):
        raise RunError(f"{rd} is an export already, not a run directory")
    train_cfg = load_run_config(rd)
    src = pick_checkpoint(rd, cfg.which)
    ck = load_checkpoint(src, WEIGHT_KEYS, WEIGHT_NETS)  # verified: readable, its SHA-256, finite weights
    tensors = export_tensors(ck["models"])
    try:
        bundle = read_bundle(rd, train_cfg.store)
    except (OSError, ValueError) as e:
        raise RunError(f"{rd}: no usable inference bundle and the training store cannot be read ({e})") from None
    tmp = _prepare_out(cfg)
    try:
        save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": FORMAT, "step": str(int(ck["step"]))})
        (tmp / CONFIG).write_text(json.dumps(train_cfg.to_json(), indent=2))
        _write_bundle(rd, tmp, train_cfg.store)
        manifest = {"format": FORMAT, "step": int(ck["step"]), "total_steps": train_cfg.total_steps,
                    "source": {"run": str(rd.resolve()), "checkpoint": src.name, "sha256": sha256_file(src)}}
        (tmp / MODEL_CARD).write_text(model_card(train_cfg, bundle, manifest, store_summary(train_cfg.store),
                                                 last_validation(rd)))
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        out = Path(cfg.out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_bundle(rd: Path, out: Path, store: str) -> None:
    """Copy ``RUN/inference/``; a run from before bundles existed gets one written from its store."""
    if (rd / BUNDLE_DIR / "info.json").is_file():
        shutil.copytree(rd / BUNDLE_DIR, out / BUNDLE_DIR, ignore=shutil.ignore_patterns("*.tmp*"))
        return
    from common.store import StoreReader
    from train.bundle import write_bundle

    write_bundle(out, StoreReader(store), store)
