"""The training loop of ``uvtrain fit``: UV sampler pre-training, then the UV generator against three discriminators.

Schedule (Section 4.1), one global step counter over three stages:

1. ``sampler``: steps [0, Ns - Nf), input ``sampler_image_size`` (128), UV_spl at the grid size S (152), Eq. 5.
2. ``finetune``: steps [Ns - Nf, Ns), input ``image_size`` (256), the predicted grid bilinearly upsampled to the
   store's UV size U, Eq. 5.
3. ``generator``: steps [Ns, Ns + Ng), the sampler frozen; Eq. 11-14 for the generator, Eq. 10 for D_ctr, D_sd
   and D_face.

A run lives in its run directory (:mod:`train.runs`). Rerunning the same command resumes from its checkpoint, and
a run stopped at step k and resumed gives the same weights and logged losses as one that never stopped (the data
stream and every random draw are functions of the step; tested). SIGUSR1 or SIGTERM (SLURM's warning before the
time limit) stops the run after the current step with a checkpoint, every rank at the same step
(:class:`train.distributed.StopSignals`); ``fit`` then returns with ``preempted`` set and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from common.configdiff import dotted_differences
from common.store import StoreReader
from train.bundle import layout_valid, write_bundle
from train.config import LossWeights, RunOptions, TrainConfig
from train.data import DataConfig, StoreStream, add_renders, make_loader
from train.distributed import Dist, StopSignals
from train.losses import (
    NonFiniteLoss,
    check_finite,
    d_loss,
    g_adv_loss,
    grid_loss,
    identity_loss,
    r1_penalty,
    reconstruction_loss,
    sampler_loss,
    symmetry_loss,
    total_generator_loss,
    tv_loss,
    visibility_loss,
)
from train.models import PatchDiscriminator, UVGenerator, UVSampler
from train.render import PosedMesh, render_lookup
from train.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    DAMAGED_FIX,
    DIGEST,
    SAMPLER_CHECKPOINT,
    MetricsLog,
    RunError,
    atomic_save,
    atomic_write_text,
    check_batch_size,
    check_run_store,
    load_checkpoint,
    load_identity,
    load_networks,
    nonfinite_tensors,
    prepare_run_dir,
    remove_stale_temps,
    resolve_device,
    rng_state,
    run_lock,
    sampled_inside,
    set_rng_state,
)
from train.uvops import centre_crop, resize_masked, side_crops
from train.validate import Validator, best_record, validate
from train.warmstart import INIT_SAMPLER, init_sampler_source, record_init_sampler

DISCRIMINATORS = ("ctr", "sd", "face")
def active_discriminators(weights: LossWeights) -> tuple[str, ...]:
    """The discriminators a run trains: those whose adversarial term weighs more than 0 in Eq. 14 (D_ctr:
    ``adv * ctr``, D_sd: ``adv * side``, D_face: ``adv``). The others are never run: no fake crops, no step, no loss
    rows, so an ablation without them does not pay for them."""
    w = {"ctr": weights.adv * weights.ctr, "sd": weights.adv * weights.side, "face": weights.adv}
    return tuple(k for k in DISCRIMINATORS if w[k] > 0)


# ------------------------------------------------------------------------------------------ schedule
class StageKind(enum.Enum):
    """What a stage trains: the UV sampler (Eq. 5), or the UV generator (Eq. 11-14) and its discriminators (Eq. 10)
    with the sampler frozen."""

    SAMPLER = "sampler"
    GENERATOR = "generator"


@dataclass(frozen=True)
class Stage:
    """Steps [start, stop) of the schedule, with fixed data settings: input images ``image_size`` pixels, the
    sampler's UV output ``uv_out`` texels."""

    name: str
    kind: StageKind
    start: int
    stop: int
    image_size: int
    uv_out: int


def schedule(cfg: TrainConfig, uv_size: int) -> list[Stage]:
    """The stages of a run (empty ones dropped)."""
    ns, nf = cfg.sampler_steps, cfg.finetune_steps
    stages = [Stage("sampler", StageKind.SAMPLER, 0, ns - nf, cfg.sampler_image_size, cfg.sampler.grid_size),
              Stage("finetune", StageKind.SAMPLER, ns - nf, ns, cfg.image_size, uv_size),
              Stage("generator", StageKind.GENERATOR, ns, ns + cfg.generator_steps, cfg.image_size, uv_size)]
    return [s for s in stages if s.stop > s.start]


@dataclass
class StepResult:
    """What a step hands back: its loss terms (scalar tensors, for the log) and its batch's pictures for the preview
    (``images``, each (B, 3|1, H, W) in [0, 1], in column order); a generator step adds the discriminators' fake
    inputs (``fakes``, detached), which :meth:`Trainer.discriminator_step` trains on."""

    terms: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    fakes: dict[str, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """The models, optimisers, AMP scaler and metrics log of one run, and its steps; :func:`fit` drives it."""

    def __init__(self, cfg: TrainConfig, run: RunOptions, world: Dist | None = None) -> None:
        self.cfg, self.run_opts = cfg, run
        self.world = world or Dist()
        dev = resolve_device(run.device)
        if dev.type == "cuda" and self.world.world_size > 1:
            dev = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(dev)
        self.device = dev
        self.rd = Path(run.run_dir)
        reader = StoreReader(cfg.store)
        self.reader = reader
        self.uv_size = reader.layout.uv_size
        self.face_model = reader.face_model()
        self.layout = reader.crop_layout()
        self.mirror = torch.from_numpy(reader.mirror_index()).to(dev)
        self.uv_valid = torch.from_numpy(layout_valid(reader).astype(np.float32))[None, None].to(dev)
        self.ctr_region = torch.from_numpy(self.layout.ctr_region.astype(np.float32)).to(dev)
        self.sd_region = torch.from_numpy(self.layout.sd_region.astype(np.float32)).to(dev)
        if cfg.weights.r1_gamma > 0 and self.world.world_size > 1:
            raise RunError("--r1-gamma > 0 under torchrun: the R1 penalty's double backward through "
                           "DistributedDataParallel is not supported; use one process or --r1-gamma 0")
        self.amp_dtype = self._amp_dtype()
        self.active = active_discriminators(cfg.weights)
        ro = run.render_on
        self.render_in_loader = ro == "loader" or (ro == "auto" and dev.type != "cuda")
        self.posed = PosedMesh(self.face_model, dev)
        self.mesh = None if self.render_in_loader else self.posed
        self._build_models()
        self.identity = load_identity(cfg.identity, dev)
        self.step = 0
        self.saved_step: int | None = None  # the step of checkpoint.pt, once written or resumed from
        self.log = MetricsLog(self.rd, self.world.main)
        self.validator = None if run.val_store is None else Validator(  # every rank checks it, rank 0 runs it
            run, self.face_model.fingerprint(), self.uv_size, dev,
            self.identity if run.val_identity == cfg.identity else load_identity(run.val_identity, dev))
        self.val_best = best_record(self.rd / BEST) if self.validator is not None and self.world.main else None
        self.notes: list[str] = []

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.run_opts.amp
        if amp == "none" or (amp == "auto" and self.device.type != "cuda"):
            return None
        return torch.float16 if amp == "fp16" else torch.bfloat16

    def _build_models(self) -> None:
        cfg, dev = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.sampler = UVSampler(cfg.sampler).to(dev)
        self.generator = UVGenerator(self.uv_size, cfg.generator, mirror_index=self.mirror).to(dev)
        self.discs = torch.nn.ModuleDict({k: PatchDiscriminator(cfg.discriminator) for k in DISCRIMINATORS}).to(dev)
        o = cfg.optim
        betas = (o.beta1, o.beta2)
        self.opt_s = torch.optim.Adam(self.sampler.parameters(), lr=o.lr_sampler, betas=betas)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=o.lr_generator, betas=betas)
        self.opt_d = torch.optim.Adam(self.discs.parameters(), lr=o.lr_discriminator, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        wrap = self._wrap
        self.sampler_t, self.generator_t = wrap(self.sampler), wrap(self.generator)
        self.discs_t = {k: wrap(d) for k, d in self.discs.items()}

    def _wrap(self, m: torch.nn.Module) -> torch.nn.Module:
        if self.world.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            m = DistributedDataParallel(m, device_ids=ids, broadcast_buffers=False)
        if self.run_opts.compile:
            m = torch.compile(m)
        return m

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimiser(self, kind: StageKind) -> torch.optim.Optimizer:
        """The optimiser of the network a stage of this kind trains (the discriminators' aside)."""
        return self.opt_g if kind is StageKind.GENERATOR else self.opt_s

    # ---------------------------------------------------------------------------------- checkpoint
    def state_dict(self, stage: Stage) -> dict:
        return {"step": self.step, "stage": stage.name,
                "models": {"sampler": self.sampler.state_dict(), "generator": self.generator.state_dict(),
                           "discriminators": self.discs.state_dict()},
                "optims": {"sampler": self.opt_s.state_dict(), "generator": self.opt_g.state_dict(),
                           "discriminators": self.opt_d.state_dict()},
                "scaler": self.scaler.state_dict(), "rng": rng_state(), **self.log.state_dict(),
                "config": self.cfg.to_json(), "val_best": self.val_best}

    def load_state_dict(self, ck: dict, path: Path | None = None) -> None:
        """Restore what :meth:`state_dict` saved (read from ``path``, which a mismatch names)."""
        where = path or self.rd / CHECKPOINT
        load_networks({"sampler": self.sampler, "generator": self.generator, "discriminators": self.discs},
                      ck["models"], where)
        try:
            self.opt_s.load_state_dict(ck["optims"]["sampler"])
            self.opt_g.load_state_dict(ck["optims"]["generator"])
            self.opt_d.load_state_dict(ck["optims"]["discriminators"])
            if ck["scaler"]:
                self.scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise RunError(f"{where}: its optimiser, scaler or RNG state does not fit this run ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120]}); {DAMAGED_FIX}") from None
        self.step = int(ck["step"])
        self.log.load_state_dict(ck)

    def save(self, stage: Stage, path: Path | None = None) -> None:
        """Write the state to ``path`` (default ``checkpoint.pt``) on rank 0, never with a NaN or inf in a weight or
        an optimiser state: every rank then stops with a :class:`RunError` and the last finite checkpoint stays."""
        state = self.state_dict(stage)
        bad = nonfinite_tensors({"models": state["models"], "optims": state["optims"]})  # the same on every rank
        if bad and path is not None and Path(path).name == BEST:
            return  # rank 0 alone writes best.pt: the next step's loss or checkpoint stops every rank instead
        if bad:
            raise RunError(f"{len(bad)} tensor(s) hold NaN or inf after step {self.step} (first: {bad[0]}): "
                           f"{(path or self.rd / CHECKPOINT).name} not written; {self._last_good()}; lower the "
                           f"learning rates (`--overwrite` restarts the run) or try --amp none")
        if self.world.main:
            atomic_save(state, path or self.rd / CHECKPOINT)
        if path is None or Path(path).name == CHECKPOINT:
            self.saved_step = self.step

    def _last_good(self) -> str:
        """Which checkpoint a run stopped by a NaN or inf keeps, and its step."""
        if self.saved_step is None:
            return "no checkpoint was written yet (a rerun starts from step 0)"
        return f"the last good checkpoint {self.rd / CHECKPOINT} (step {self.saved_step}) is kept"

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` when present (verified by :func:`train.runs.load_checkpoint`); True if the run
        resumed. Rank 0 first removes the temporary files of interrupted writes; a checkpoint of another config is
        refused, and a ``sampler.pt`` lost after the sampler phase is written again from the checkpoint."""
        path = self.rd / CHECKPOINT
        if self.world.main and (gone := remove_stale_temps(self.rd)):
            self.notes.append(f"removed {len(gone)} temporary file(s) of interrupted writes "
                              f"({sum(gone.values()) / 1e6:.1f} MB, e.g. {next(iter(gone)).name})")
        ck = load_checkpoint(path, warn=False)
        if ck is None:
            return False
        if DIGEST not in ck:
            self.notes.append(f"{path} has no SHA-256 (written before uvtrain checked checkpoints): resumed "
                              f"unverified; the next checkpoint carries one")
        self._check_config(ck, path)
        self.load_state_dict(ck, path)
        self.saved_step = self.step
        self.log.truncate(self.step)
        self._restore_sampler_checkpoint()
        return True

    def _check_config(self, ck: dict, path: Path) -> None:
        """Refuse a checkpoint trained with another config than this run's (``config.json`` lost and rewritten by a
        rerun with other flags): one line naming the fields. ``config.json`` is put back as the checkpoint has it
        when it holds this run's config, so the corrected command is not refused in turn."""
        if "config" not in ck:  # older than configs in checkpoints
            return
        ours = self.cfg.to_json()
        diffs = dotted_differences(TrainConfig.current_json(ck["config"]), ours, old_name="checkpoint")
        if not diffs:
            return
        cfg_path = self.rd / CONFIG
        restored = ""
        if self.world.main and cfg_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(cfg_path.read_text()) == ours:
                    atomic_write_text(cfg_path, json.dumps(ck["config"], indent=2))
                    restored = f"; {cfg_path} holds the checkpoint's config again"
        raise RunError(f"{path} was trained with another config ({'; '.join(diffs)}){restored}: rerun with the "
                       f"checkpoint's settings, or pass --overwrite to restart the run")

    def _restore_sampler_checkpoint(self) -> None:
        """``sampler.pt`` again, from the state just resumed, when the sampler phase is done and the file is missing
        (a kill while it was written). Exact when the run resumed at the phase's last step; later, the sampler is the
        same (frozen since) but the rest of the state is the later step's (a note says so)."""
        ns, path = self.cfg.sampler_steps, self.rd / SAMPLER_CHECKPOINT
        if ns == 0 or self.step < ns or path.is_file():
            return
        last = [s for s in schedule(self.cfg, self.uv_size) if s.kind is StageKind.SAMPLER][-1]
        self.save(last, path)
        later = "" if self.step == ns else (f" (the sampler as the phase left it at step {ns}; the rest of the state "
                                            f"is step {self.step}'s)")
        self.notes.append(f"{path} was missing: written again from {CHECKPOINT} at step {self.step}{later}")

    def start_from_sampler(self, path: Path, ck: dict) -> None:
        """Begin this new run at the end of the sampler phase (step ``sampler_steps``) with the sampler of ``ck``
        (read from ``path`` by :func:`train.warmstart.read_init_sampler`), everything else as built (fresh generator,
        discriminators, optimisers). ``sampler.pt`` and ``checkpoint.pt`` are written at that step, so the run is
        another run's source in turn and a rerun resumes there."""
        load_networks({"sampler": self.sampler}, ck["models"], path)
        self.step = self.cfg.sampler_steps
        last = [s for s in schedule(self.cfg, self.uv_size) if s.kind is StageKind.SAMPLER][-1]
        self.save(last, self.rd / SAMPLER_CHECKPOINT)
        self.save(last)

    def init_sampler_template(self, n: int = 64) -> None:
        """Start the sampler from the mean texel -> pixel map of up to ``n`` samples (see UVSampler.set_template)."""
        s = self.cfg.sampler.grid_size
        idx = self.reader.ok_indices()
        idx = idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).astype(np.int64)]
        params = torch.from_numpy(self.reader.batch(idx, ["params"])["params"])
        h = self.reader.layout.image_size
        grid = self.posed.texel_grid(self.posed.verts(params, h, h), s, h)
        mean = torch.nanmean(grid, 0)
        mean = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
        self.sampler.set_template(mean.to(self.device))

    # ---------------------------------------------------------------------------------- steps
    def sampler_step(self, b: dict, stage: Stage) -> StepResult:
        """One Eq. 5 step of the UV sampler (plus the auxiliary :func:`train.losses.grid_loss`, weight ``grid``)."""
        with self.autocast():
            uv_spl, grid = self.sampler_t(b["image"], out_size=stage.uv_out)
        uv_spl = uv_spl.float()
        uv_gt, mask = b["uv_gt"], b["uv_gt_mask"]
        if stage.uv_out != self.uv_size:
            uv_gt, mask = resize_masked(uv_gt, mask, stage.uv_out)
        render = render_lookup(uv_spl, b["grid0"], b["cover0"])
        w = self.cfg.weights
        terms = sampler_loss(uv_spl, uv_gt, mask, render, b["target"], b["face"] * b["cover0"], w.tv)
        if w.grid > 0:
            verts = self.posed.verts(b["params0"], b["frame"], stage.image_size)
            target = self.posed.texel_grid(verts, stage.uv_out, stage.image_size)
            terms["loss_grid"] = grid_loss(grid, target, mask)
            terms["loss"] = terms["loss"] + w.grid * terms["loss_grid"]
        check_finite(terms, self.step + 1)  # the step being taken, as metrics.jsonl counts
        self.opt_s.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.opt_s)
        return StepResult(terms, {"image": b["image"], "uv_spl": uv_spl.detach(), "uv_gt": uv_gt,
                                  "render0": render.detach(), "target": b["target"]})

    def _fakes(self, b: dict, uv_pred: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fake inputs of the discriminators this run trains (:func:`active_discriminators`), masked like their
        real counterparts.

        Real partial crops have holes where their photo saw nothing; every fake crop takes the mask of a real
        crop of this batch (a permutation drawn from the step), so a discriminator cannot tell them by the holes.
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        out = {}
        lay = self.layout
        if "ctr" in self.active and "ctr_real" in b:
            perm = torch.randperm(uv_pred.shape[0], generator=g).to(uv_pred.device)
            out["ctr"] = centre_crop(uv_pred, lay.ctr_box, self.ctr_region) * b["ctr_real_mask"][perm]
        if "sd" in self.active and "sd_real" in b:
            perm = torch.randperm(2 * uv_pred.shape[0], generator=g).to(uv_pred.device)
            masks = torch.cat([b["sd_real_mask"], b["sd_real_mask"]])[perm]
            out["sd"] = side_crops(uv_pred, lay.sd_box, self.sd_region, self.mirror) * masks
        if "face" in self.active:
            face1 = (render_lookup(self.uv_valid.expand(r1.shape[0], -1, -1, -1), b["grid1"], b["cover1"]) > 0.5)
            out["face"] = torch.cat([r0 * b["face"], r1 * face1.to(r1.dtype)])
        return out

    def generator_step(self, b: dict) -> StepResult:
        """One step of the UV generator (Eq. 11-14) against the discriminators as they stand."""
        w = self.cfg.weights
        with torch.no_grad(), self.autocast():
            uv_spl, grid = self.sampler(b["image"], out_size=self.uv_size)
        uv_spl, inside = uv_spl.float(), sampled_inside(grid)
        gated = self.generator.config.visibility_gate
        with self.autocast():
            out = self.generator_t(uv_spl, inside, grid=grid, return_gate=gated)
        uv_pred, gate_logit = out if gated else (out, None)
        uv_pred = uv_pred.float()
        r0 = render_lookup(uv_pred, b["grid0"], b["cover0"])
        r1 = render_lookup(uv_pred, b["grid1"], b["cover1"])
        terms = dict(reconstruction_loss(uv_pred, b["uv_bl"], self.uv_valid.expand_as(uv_pred[:, :1]), r0,
                                         b["target"], b["face"] * b["cover0"], w, unseen=1.0 - b["uv_gt_mask"]))
        terms["loss_sym"] = symmetry_loss(uv_pred, self.mirror, self.uv_valid)
        terms["loss_tv"] = tv_loss(uv_pred)
        if gate_logit is not None:
            terms["loss_vis"] = visibility_loss(gate_logit, b["uv_gt_mask"], self.uv_valid)
        fakes = self._fakes(b, uv_pred, r0, r1)
        for name in self.discs:
            self.discs[name].requires_grad_(False)
        with self.autocast():
            for name, fake in fakes.items():
                terms[f"loss_adv_{name}"] = g_adv_loss(self.discs[name](fake).float())
        if self.identity is not None:
            with torch.no_grad():  # F(I^m) does not depend on the generator
                feat_target = self.identity(b["target"], b.get("points0"))
            terms["loss_id"] = identity_loss(self.identity(r1, b.get("points1")), feat_target)
        terms["loss"] = total_generator_loss(terms, w)
        check_finite(terms, self.step + 1)  # the step being taken, as metrics.jsonl counts
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.opt_g)
        fakes = {k: v.detach() for k, v in fakes.items()}
        images = {"image": b["image"], "uv_spl": uv_spl, "uv_pred": uv_pred.detach(), "uv_bl": b["uv_bl"],
                  "render0": r0.detach(), "render1": r1.detach(), "target": b["target"]}
        for k in ("ctr", "sd"):
            if k in fakes:
                images[f"fake_{k}"], images[f"real_{k}"] = fakes[k], b[f"{k}_real"]
        return StepResult(terms, images, fakes)

    def discriminator_step(self, b: dict, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 10 for each discriminator with fakes this step (trained, with real data this batch): one forward over
        [real; fake]. None (``--w-adv 0``): nothing to do."""
        if not fakes:
            return {}
        reals = {"ctr": b.get("ctr_real"), "sd": b.get("sd_real"), "face": b["target"]}
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        for name, fake in fakes.items():
            real = reals[name]
            self.discs[name].requires_grad_(True)
            if self.cfg.weights.r1_gamma > 0:
                real = real.detach().requires_grad_(True)
            with self.autocast():
                logits = self.discs_t[name](torch.cat([real, fake])).float()
            lr, lf = logits[: real.shape[0]], logits[real.shape[0]:]
            loss = d_loss(lr, lf)
            if self.cfg.weights.r1_gamma > 0:
                loss = loss + 0.5 * self.cfg.weights.r1_gamma * r1_penalty(lr, real)
            terms[f"loss_d_{name}"] = loss.detach()
            total = total + loss
        check_finite(terms, self.step + 1)  # the step being taken, as metrics.jsonl counts
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_d)
        return terms


# ------------------------------------------------------------------------------------------ driver
def fit(cfg: TrainConfig, run: RunOptions, on_log=None, on_step=None) -> dict[str, Any]:
    """Train (or resume) the run in ``run.run_dir`` up to the end of ``run.phase``; returns a summary dict.

    SIGUSR1 / SIGTERM (handled while ``fit`` runs, from the main thread) end the run early: the current step
    finishes, the checkpoint is written, and the summary's ``preempted`` names the signal (None when the run
    reached its end).

    on_log(row, stop): optional callback receiving each metrics row (the CLI's progress line, tests);
    on_step(step, phase): optional callback after every step (the progress bar).
    """
    with StopSignals() as signals:  # from the start: a signal while the store opens stops after the first step
        return _fit(cfg, run, on_log, on_step, signals)


def _fit(cfg: TrainConfig, run: RunOptions, on_log, on_step, signals: StopSignals) -> dict[str, Any]:
    world = Dist.from_env(run.device, run.dist_timeout)
    prepare_run_dir(cfg, run, write=False)  # checks only: nothing is written before every start-up check passed
    with run_lock(run.run_dir, hold=world.main):  # a second `uvtrain fit` into this run directory is refused
        return _fit_locked(cfg, run, on_log, on_step, signals, world)


def _fit_locked(cfg: TrainConfig, run: RunOptions, on_log, on_step, signals: StopSignals, world: Dist
                ) -> dict[str, Any]:
    tr = Trainer(cfg, run, world)  # the store opened, the device, the identity and validation networks
    init = init_sampler_source(tr)
    notes: list[str] = []
    if world.main:
        store, notes = check_run_store(tr.rd, tr.reader.group, cfg.store, run.overwrite)
        check_batch_size(cfg, store["samples_ok"], world.world_size)
        prepare_run_dir(cfg, run, write=True, store=store)  # config.json only now (and --overwrite's clearing)
        if run.overwrite:
            tr.val_best = None  # best.pt was just deleted
            (tr.rd / INIT_SAMPLER).unlink(missing_ok=True)
        write_bundle(tr.rd, tr.reader, cfg.store)  # what infer / eval need without the store
        if init is not None:
            record_init_sampler(tr.rd, *init)
    world.barrier()  # no rank resumes from a checkpoint --overwrite is deleting
    resumed = tr.resume()
    if not resumed:
        tr.log.truncate(0)  # rows of an attempt stopped before its first checkpoint
    tr.notes += notes + tr.log.notes
    if not resumed and init is not None:
        tr.start_from_sampler(*init)
    if run.phase == "generator" and tr.step < cfg.sampler_steps:
        raise RunError(f"--phase generator: the sampler phase is not done in {run.run_dir} (step {tr.step} of "
                       f"{cfg.sampler_steps}); run --phase sampler (or all) first")
    if not resumed and init is None and cfg.sampler_steps > 0:
        tr.init_sampler_template()
    tr.notes += _generator_notes(tr)
    end = cfg.sampler_steps if run.phase == "sampler" else cfg.total_steps
    tr.log.open_tensorboard(run.tensorboard)
    rows: list[dict] = []
    try:
        for stage in schedule(cfg, tr.uv_size):
            if tr.step >= min(stage.stop, end):
                continue
            rows += _run_stage(tr, stage, min(stage.stop, end), on_log, on_step, signals)
            if stage.kind is StageKind.SAMPLER and tr.step == stage.stop == cfg.sampler_steps:
                tr.save(stage, tr.rd / SAMPLER_CHECKPOINT)  # the sampler as its phase left it
            if signals.stopped:
                break
    finally:
        tr.log.close()
    preempted = (signals.received or "a signal to another rank") if signals.stopped else None
    return {"step": tr.step, "resumed": resumed, "rows": rows, "notes": tr.notes, "preempted": preempted,
            "val_best": tr.val_best}


def _generator_notes(tr: Trainer) -> list[str]:
    """What the generator phase leaves out by the run's flags: the identity loss, discriminators weighted 0."""
    cfg, notes = tr.cfg, []
    if cfg.generator_steps == 0:
        return notes
    if tr.identity is None and cfg.weights.id > 0:
        notes.append("identity loss (Eq. 13) is off: --identity none")
    if "face" not in tr.active:
        notes.append("no discriminator is trained: --w-adv 0")
    elif off := [f"D_{k} (--w-{'ctr' if k == 'ctr' else 'side'} 0)" for k in ("ctr", "sd") if k not in tr.active]:
        notes.append(f"{' and '.join(off)} not trained: adversarial weight 0")
    return notes


def _stage_loader(tr: Trainer, stage: Stage):
    cfg = tr.cfg
    generator = stage.kind is StageKind.GENERATOR
    data = DataConfig(batch_size=cfg.batch_size, image_size=stage.image_size, seed=cfg.seed + 1000 * stage.start,
                      shuffle_window=cfg.shuffle_window, with_targets=generator,
                      rotate_share=cfg.rotate_share, max_yaw=cfg.max_yaw, render_in_loader=tr.render_in_loader)
    ds = StoreStream(cfg.store, data, tr.world.rank, tr.world.world_size, start_batch=tr.step - stage.start)
    usable = ds.usable(cfg.workers)
    if not usable["samples"]:
        raise RunError(f"{cfg.store}: {len(ds.ok)} usable samples, fewer than the {ds.n_shards(cfg.workers)} "
                       f"data shards (ranks x --workers); use fewer workers or a larger store")
    if generator:
        for key, what in (("ctr", "centre"), ("sd", "side")):
            if key in tr.active and not usable[key]:
                tr.notes.append(f"D_{key} is off: the store has {len(getattr(ds, key))} valid {what} crops, fewer "
                                f"than the {ds.n_shards(cfg.workers)} data shards")
    return make_loader(ds, cfg.workers, pin_memory=tr.device.type == "cuda")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _run_stage(tr: Trainer, stage: Stage, stop: int, on_log, on_step, signals: StopSignals) -> list[dict]:
    """Steps ``tr.step`` .. ``stop`` of ``stage``: the metrics rows logged."""
    run, generator = tr.run_opts, stage.kind is StageKind.GENERATOR
    tr.sampler.train(not generator).requires_grad_(not generator)  # frozen in the generator phase
    loader = _stage_loader(tr, stage)
    it = iter(loader)
    rows = []
    every_preview = run.preview_every or run.checkpoint_every
    t_log, wait = time.perf_counter(), 0.0
    steps_in_window = 0
    try:
        while tr.step < stop:
            # ---- data
            t0 = time.perf_counter()
            b = _to(next(it), tr.device)
            wait += time.perf_counter() - t0
            if tr.mesh is not None:
                add_renders(b, tr.mesh, stage.image_size)
            # ---- step: the sampler, or the generator and then the discriminators on its fakes
            if generator:
                out = tr.generator_step(b)
                terms = out.terms | tr.discriminator_step(b, out.fakes)
            else:
                out = tr.sampler_step(b, stage)
                terms = out.terms
            tr.scaler.update()  # once per step, after its optimiser steps (the fp16 loss scale)
            tr.step += 1
            steps_in_window += 1
            tr.log.add(terms)
            if on_step is not None:
                on_step(tr.step, stage.name)
            # ---- log, preview, checkpoint
            if tr.step % run.log_every == 0 or tr.step == stop:
                dt = time.perf_counter() - t_log
                extra = {"lr": float(tr.optimiser(stage.kind).param_groups[0]["lr"]),
                         "steps_per_s": steps_in_window / dt, "data_wait_s": wait / steps_in_window}
                rows.append(tr.log.flush(tr.step, stage.name, extra))
                if on_log is not None:
                    on_log(rows[-1], stop)
                t_log, wait, steps_in_window = time.perf_counter(), 0.0, 0
            if tr.validator is not None and (tr.step % run.val_every == 0 or tr.step == stop):
                t_log += validate(tr, stage, generator)  # steps_per_s counts training only
            if tr.step % every_preview == 0 or tr.step == stop:
                tr.log.preview(stage.name, tr.step, out.images, height=max(96, tr.cfg.image_size // 2))
            saved = tr.step % run.checkpoint_every == 0 or tr.step == stop
            if saved:
                tr.save(stage)
            # ---- preemption: every rank stops at the same step, after the checkpoint is written
            if signals.should_stop(tr.world, tr.device):
                if not saved:
                    tr.save(stage)
                tr.world.barrier()  # no rank exits (torchrun then stops the rest) before the checkpoint is written
                break
    except NonFiniteLoss as e:
        raise RunError(f"{e}; stopped without saving: {tr._last_good()}; lower the learning rates (`--overwrite` "
                       f"restarts the run) or try --amp none") from None
    finally:
        del it, loader
    return rows


__all__ = ["Stage", "StageKind", "StepResult", "Trainer", "fit", "schedule"]
