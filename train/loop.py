"""The training loop of ``uvtrain fit``: UV sampler pre-training, then the UV generator against three discriminators.

Schedule (Section 4.1), one global step counter over three stages:

1. ``sampler``: steps [0, Ns - Nf), input ``sampler_image_size`` (128), UV_spl at the grid size S (152), Eq. 5.
2. ``finetune``: steps [Ns - Nf, Ns), input ``image_size`` (256), the predicted grid bilinearly upsampled to the
   store's UV size U, Eq. 5.
3. ``generator``: steps [Ns, Ns + Ng), the sampler frozen; Eq. 11-14 for the generator, Eq. 10 for D_ctr, D_sd
   and D_face.

Run directory ``R``: ``config.json`` (the :class:`TrainConfig`; a rerun with another config is refused),
``checkpoint.pt`` (written atomically; models, optimisers, scaler, step, data position, RNG states, log
accumulators), ``sampler.pt`` (the sampler at the end of its phase), ``metrics.jsonl``, ``previews/*.png`` and
``tb/`` (TensorBoard). Rerunning the same command resumes from ``checkpoint.pt``, and a run stopped at step k and
resumed gives the same weights and logged losses as one that never stopped (the data stream and every random draw
are functions of the step; tested). SIGUSR1 or SIGTERM (SLURM's warning before the time limit) stops the run after
the current step with a checkpoint, every rank at the same step (:class:`StopSignals`); ``fit`` then returns with
``preempted`` set and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.identity import load_identity as common_load_identity
from common.imageio import image_grid, write_png
from common.signals import signal_handlers
from common.store import StoreReader, flatten_mapping
from train.bundle import InferenceBundle, layout_valid, read_bundle, write_bundle
from train.config import RunOptions, TrainConfig
from train.data import DataConfig, StoreStream, add_renders, make_loader
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
)
from train.models import PatchDiscriminator, UVGenerator, UVSampler
from train.render import PosedMesh, render_lookup
from train.uvops import centre_crop, resize_masked, side_crops

CHECKPOINT, SAMPLER_CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "sampler.pt", "config.json", "metrics.jsonl"
DISCRIMINATORS = ("ctr", "sd", "face")
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class RunError(RuntimeError):
    """A problem the user fixes (bad run directory, config mismatch, missing CUDA...): printed as one line."""


@dataclass(frozen=True)
class Stage:
    """A stretch of the schedule with fixed data settings."""

    name: str
    start: int
    stop: int
    image_size: int
    uv_out: int
    with_targets: bool


def schedule(cfg: TrainConfig, uv_size: int) -> list[Stage]:
    """The stages of a run (empty ones dropped)."""
    ns, nf = cfg.sampler_steps, cfg.finetune_steps
    stages = [Stage("sampler", 0, ns - nf, cfg.sampler_image_size, cfg.sampler.grid_size, False),
              Stage("finetune", ns - nf, ns, cfg.image_size, uv_size, False),
              Stage("generator", ns, ns + cfg.generator_steps, cfg.image_size, uv_size, True)]
    return [s for s in stages if s.stop > s.start]


# ------------------------------------------------------------------------------------ run directory
def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``key: run dir X, this run Y`` lines for every differing (nested) config field."""
    a, b = flatten_mapping(old), flatten_mapping(new)
    return [f"{k}: run dir {a.get(k, '<absent>')!r}, this run {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def prepare_run_dir(cfg: TrainConfig, run: RunOptions, write: bool) -> None:
    """Create or check ``run.run_dir``: refuse a different config unless ``overwrite`` (which clears the state)."""
    rd = Path(run.run_dir)
    if not rd.parent.is_dir():
        raise RunError(f"run directory {rd}: its parent {rd.parent} does not exist; create it first")
    if rd.exists() and not rd.is_dir():
        raise RunError(f"run directory {rd} exists and is not a directory")
    cfg_path = rd / CONFIG
    if cfg_path.exists() and not run.overwrite:
        diffs = config_differences(json.loads(cfg_path.read_text()), cfg.to_json())
        if diffs:
            raise RunError(f"{rd} holds a run with another config ({'; '.join(diffs)}); pass --overwrite to "
                           f"restart it or choose another --run-dir")
    if not write:
        return
    try:
        rd.mkdir(exist_ok=True)
        if run.overwrite:
            for name in (CHECKPOINT, SAMPLER_CHECKPOINT, METRICS, CONFIG):
                (rd / name).unlink(missing_ok=True)
            for name in ("previews", "tb"):
                shutil.rmtree(rd / name, ignore_errors=True)
        (rd / "previews").mkdir(exist_ok=True)
        if not cfg_path.exists():
            _atomic_write_text(cfg_path, json.dumps(cfg.to_json(), indent=2))
    except PermissionError as e:
        raise RunError(f"run directory {rd} is not writable ({e.strerror})") from None


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` a checkpoint atomically (temporary file, fsync, rename over ``path``)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------------------------------ helpers
def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                       f"use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: expected cpu, cuda or cuda:N")
    return dev


def load_identity(spec: str, device: torch.device) -> torch.nn.Module | None:
    """The frozen face-recognition network of Eq. 13 (:func:`common.identity.load_identity`): None for ``none``.

    It maps (B, 3, H, W) images in [0, 1] and their (B, 68, 2) landmarks to (B, D) identity features.
    """
    try:
        return common_load_identity(spec, device)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, timeout: float = 600.0) -> Dist:
        """Join the torchrun job described by the environment (``WORLD_SIZE``, ``RANK``, ...). timeout: seconds a
        collective waits for the other ranks before it raises (``RunOptions.dist_timeout``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class StopSignals:
    """SIGUSR1 / SIGTERM as a request to stop after the current step (SLURM's ``--signal=B:USR1@120`` warning).

    A context manager: on entry it installs its handler for ``signals``, in the main thread only (elsewhere
    nothing is installed and it never fires); on exit it restores the previous handlers. ``received`` is the name
    of the first signal this process got; ``stopped`` becomes True when :meth:`should_stop` agreed to stop.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self.stopped = False
        self._installed = contextlib.ExitStack()

    def __enter__(self) -> StopSignals:
        self._installed.enter_context(signal_handlers({s: self._handle for s in self.signals}))
        return self

    def __exit__(self, *exc) -> None:
        self._installed.close()

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def should_stop(self, world: Dist, device: torch.device) -> bool:
        """True on every rank once any rank got a signal: under torchrun an all-reduce (max) of the flag, so call it
        at the same step on every rank."""
        flag = self.received is not None
        if world.world_size > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        self.stopped = self.stopped or flag
        return flag


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """The models, optimisers, AMP scaler and logging state of one run, and its steps; :func:`fit` drives it."""

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
        ro = run.render_on
        self.render_in_loader = ro == "loader" or (ro == "auto" and dev.type != "cuda")
        self.posed = PosedMesh(self.face_model, dev)
        self.mesh = None if self.render_in_loader else self.posed
        self._build_models()
        self.identity = load_identity(cfg.identity, dev)
        self.step = 0
        self.accum: dict[str, float] = defaultdict(float)
        self.accum_n = 0
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
        self.generator = UVGenerator(self.uv_size, cfg.generator).to(dev)
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

    # ---------------------------------------------------------------------------------- state
    def state_dict(self, stage: Stage) -> dict:
        return {"step": self.step, "stage": stage.name,
                "models": {"sampler": self.sampler.state_dict(), "generator": self.generator.state_dict(),
                           "discriminators": self.discs.state_dict()},
                "optims": {"sampler": self.opt_s.state_dict(), "generator": self.opt_g.state_dict(),
                           "discriminators": self.opt_d.state_dict()},
                "scaler": self.scaler.state_dict(), "rng": _rng_state(),
                "accum": dict(self.accum), "accum_n": self.accum_n, "config": self.cfg.to_json()}

    def load_state_dict(self, ck: dict) -> None:
        self.sampler.load_state_dict(ck["models"]["sampler"])
        self.generator.load_state_dict(ck["models"]["generator"])
        self.discs.load_state_dict(ck["models"]["discriminators"])
        self.opt_s.load_state_dict(ck["optims"]["sampler"])
        self.opt_g.load_state_dict(ck["optims"]["generator"])
        self.opt_d.load_state_dict(ck["optims"]["discriminators"])
        if ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        self.accum = defaultdict(float, ck["accum"])
        self.accum_n = int(ck["accum_n"])

    def save(self, stage: Stage, path: Path | None = None) -> None:
        if self.world.main:
            atomic_save(self.state_dict(stage), path or self.rd / CHECKPOINT)

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` when present (``weights_only=True``); True if the run resumed."""
        path = self.rd / CHECKPOINT
        if not path.exists():
            return False
        ck = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay CPU tensors
        self.load_state_dict(ck)
        if self.world.main:
            _truncate_metrics(self.rd / METRICS, self.step)
        return True

    # ---------------------------------------------------------------------------------- template
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
    def sampler_step(self, b: dict, stage: Stage) -> dict[str, torch.Tensor]:
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
        check_finite(terms, self.step)
        self.opt_s.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.opt_s)
        self.scaler.update()
        self._last = {"image": b["image"], "uv_spl": uv_spl.detach(), "uv_gt": uv_gt, "render0": render.detach(),
                      "target": b["target"]}
        return terms

    def _fakes(self, b: dict, uv_pred: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fake inputs of the three discriminators, masked like their real counterparts.

        Real partial crops have holes where their photo saw nothing; every fake crop takes the mask of a real
        crop of this batch (a permutation drawn from the step), so a discriminator cannot tell them by the holes.
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        out = {}
        lay = self.layout
        if "ctr_real" in b:
            perm = torch.randperm(uv_pred.shape[0], generator=g).to(uv_pred.device)
            out["ctr"] = centre_crop(uv_pred, lay.ctr_box, self.ctr_region) * b["ctr_real_mask"][perm]
        if "sd_real" in b:
            perm = torch.randperm(2 * uv_pred.shape[0], generator=g).to(uv_pred.device)
            masks = torch.cat([b["sd_real_mask"], b["sd_real_mask"]])[perm]
            out["sd"] = side_crops(uv_pred, lay.sd_box, self.sd_region, self.mirror) * masks
        face1 = (render_lookup(self.uv_valid.expand(r1.shape[0], -1, -1, -1), b["grid1"], b["cover1"]) > 0.5)
        out["face"] = torch.cat([r0 * b["face"], r1 * face1.to(r1.dtype)])
        return out

    def generator_step(self, b: dict) -> dict[str, torch.Tensor]:
        """One step of the UV generator (Eq. 11-14) and of the three discriminators (Eq. 10)."""
        w = self.cfg.weights
        with torch.no_grad(), self.autocast():
            uv_spl, grid = self.sampler(b["image"], out_size=self.uv_size)
        uv_spl, inside = uv_spl.float(), sampled_inside(grid)
        with self.autocast():
            uv_pred = self.generator_t(uv_spl, inside)
        uv_pred = uv_pred.float()
        r0 = render_lookup(uv_pred, b["grid0"], b["cover0"])
        r1 = render_lookup(uv_pred, b["grid1"], b["cover1"])
        terms = dict(reconstruction_loss(uv_pred, b["uv_bl"], self.uv_valid.expand_as(uv_pred[:, :1]), r0,
                                         b["target"], b["face"] * b["cover0"], w.uv, w.face))
        terms["loss_sym"] = symmetry_loss(uv_pred, self.mirror, self.uv_valid)
        terms["loss_tv"] = tv_loss(uv_pred)
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
        check_finite(terms, self.step)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.opt_g)
        terms.update(self.discriminator_step(b, {k: v.detach() for k, v in fakes.items()}))
        self.scaler.update()
        self._last = {"image": b["image"], "uv_spl": uv_spl, "uv_pred": uv_pred.detach(), "uv_bl": b["uv_bl"],
                      "render0": r0.detach(), "render1": r1.detach(), "target": b["target"],
                      **{f"fake_{k}": v.detach() for k, v in fakes.items() if k != "face"},
                      **{f"real_{k}": b[f"{k}_real"] for k in ("ctr", "sd") if f"{k}_real" in b}}
        return terms

    def discriminator_step(self, b: dict, fakes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 10 for each discriminator with real data this batch: one forward over [real; fake]."""
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
        check_finite(terms, self.step)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_d)
        return terms

    # ---------------------------------------------------------------------------------- logging
    def log_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.accum[k] += float(v.detach())
        self.accum_n += 1

    def flush_log(self, stage: Stage, extra: dict[str, float], tb) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "phase": stage.name}
        row.update({k: v / max(1, self.accum_n) for k, v in sorted(self.accum.items())})
        row.update(extra)
        self.accum, self.accum_n = defaultdict(float), 0
        if self.world.main:
            with open(self.rd / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, float | int) and k != "step":
                        tb.add_scalar(f"{stage.name}/{k}", v, self.step)
        return row

    def preview(self, stage: Stage, tb) -> Path | None:
        """PNG (and TensorBoard image) of the last batch: input | UV_spl | UV_pred | UV_bl | I0 | I1 | I^m | crops."""
        if not self.world.main or not getattr(self, "_last", None):
            return None
        last = self._last
        keys = [k for k in ("image", "uv_spl", "uv_gt", "uv_pred", "uv_bl", "render0", "render1", "target",
                            "fake_ctr", "real_ctr", "fake_sd", "real_sd") if k in last]
        n = min(4, last["image"].shape[0])
        rows = [[_np_image(last[k][i]) for k in keys] for i in range(n)]
        labels = [keys if i == 0 else [""] * len(keys) for i in range(n)]
        grid = image_grid(rows, labels=labels, height=max(96, self.cfg.image_size // 2))
        path = write_png(self.rd / "previews" / f"{stage.name}_{self.step:07d}.png", grid)
        if tb is not None:
            tb.add_image(f"{stage.name}/preview", grid, self.step, dataformats="HWC")
        return path


def sampled_inside(grid: torch.Tensor) -> torch.Tensor:
    """The generator's validity mask: texels whose sampling point lies inside the image, (B, U, U, 2) -> (B, 1, U, U).

    The sampler needs no 3D shape, so this is all that is known at inference; texels it points outside the
    image are 0 in UV_spl (``grid_sample`` zero padding) and marked empty.
    """
    return (grid.abs() <= 1.0).all(-1, keepdim=True).permute(0, 3, 1, 2).float()


def _np_image(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    _atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _tensorboard(run: RunOptions, rd: Path, main: bool):
    if not (run.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(rd / "tb"))


# ------------------------------------------------------------------------------------------ driver
def _stage_loader(tr: Trainer, stage: Stage):
    cfg = tr.cfg
    data = DataConfig(batch_size=cfg.batch_size, image_size=stage.image_size, seed=cfg.seed + 1000 * stage.start,
                      shuffle_window=cfg.shuffle_window, with_targets=stage.with_targets,
                      rotate_share=cfg.rotate_share, max_yaw=cfg.max_yaw, render_in_loader=tr.render_in_loader)
    ds = StoreStream(cfg.store, data, tr.world.rank, tr.world.world_size, start_batch=tr.step - stage.start)
    usable = ds.usable(cfg.workers)
    if not usable["samples"]:
        raise RunError(f"{cfg.store}: {len(ds.ok)} usable samples, fewer than the {ds.n_shards(cfg.workers)} "
                       f"data shards (ranks x --workers); use fewer workers or a larger store")
    if stage.with_targets:
        for key, what in (("ctr", "centre"), ("sd", "side")):
            if not usable[key]:
                tr.notes.append(f"D_{key} is off: the store has {len(getattr(ds, key))} valid {what} crops, fewer "
                                f"than the {ds.n_shards(cfg.workers)} data shards")
    return make_loader(ds, cfg.workers, pin_memory=tr.device.type == "cuda")


def _phase_end(cfg: TrainConfig, phase: str) -> int:
    return cfg.sampler_steps if phase == "sampler" else cfg.total_steps


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
    prepare_run_dir(cfg, run, write=world.main)
    if world.world_size > 1:
        dist.barrier()
    tr = Trainer(cfg, run, world)
    if world.main:
        write_bundle(tr.rd, tr.reader, cfg.store)  # what infer / eval need without the store
    resumed = tr.resume()
    if run.phase == "generator" and tr.step < cfg.sampler_steps:
        raise RunError(f"--phase generator: the sampler phase is not done in {run.run_dir} (step {tr.step} of "
                       f"{cfg.sampler_steps}); run --phase sampler (or all) first")
    if not resumed and cfg.sampler_steps > 0:
        tr.init_sampler_template()
    if tr.identity is None and cfg.weights.id > 0 and cfg.generator_steps > 0:
        tr.notes.append("identity loss (Eq. 13) is off: --identity none")
    end = _phase_end(cfg, run.phase)
    tb = _tensorboard(run, tr.rd, world.main)
    rows: list[dict] = []
    try:
        for stage in schedule(cfg, tr.uv_size):
            if tr.step >= min(stage.stop, end):
                continue
            rows += _run_stage(tr, stage, min(stage.stop, end), tb, on_log, on_step, signals)
            done = tr.step == stage.stop
            if done and (stage.name == "finetune" or (stage.name == "sampler" and cfg.finetune_steps == 0)):
                tr.save(stage, tr.rd / SAMPLER_CHECKPOINT)
            if signals.stopped:
                break
    finally:
        if tb is not None:
            tb.close()
    preempted = (signals.received or "a signal to another rank") if signals.stopped else None
    return {"step": tr.step, "resumed": resumed, "rows": rows, "notes": tr.notes, "preempted": preempted}


def _run_stage(tr: Trainer, stage: Stage, stop: int, tb, on_log, on_step, signals: StopSignals) -> list[dict]:
    run = tr.run_opts
    tr.sampler.train(not stage.with_targets).requires_grad_(not stage.with_targets)  # frozen in the generator phase
    loader = _stage_loader(tr, stage)
    it = iter(loader)
    rows = []
    every_preview = run.preview_every or run.checkpoint_every
    t_log, wait = time.perf_counter(), 0.0
    steps_in_window = 0
    try:
        while tr.step < stop:
            t0 = time.perf_counter()
            b = _to(next(it), tr.device)
            wait += time.perf_counter() - t0
            if tr.mesh is not None:
                add_renders(b, tr.mesh, stage.image_size)
            terms = tr.generator_step(b) if stage.with_targets else tr.sampler_step(b, stage)
            tr.step += 1
            steps_in_window += 1
            tr.log_terms(terms)
            if on_step is not None:
                on_step(tr.step, stage.name)
            if tr.step % run.log_every == 0 or tr.step == stop:
                dt = time.perf_counter() - t_log
                extra = {"lr": _lr(tr, stage), "steps_per_s": steps_in_window / dt,
                         "data_wait_s": wait / steps_in_window}
                row = tr.flush_log(stage, extra, tb)
                rows.append(row)
                if on_log is not None:
                    on_log(row, stop)
                t_log, wait, steps_in_window = time.perf_counter(), 0.0, 0
            if tr.step % every_preview == 0 or tr.step == stop:
                tr.preview(stage, tb)
            saved = tr.step % run.checkpoint_every == 0 or tr.step == stop
            if saved:
                tr.save(stage)
            if signals.should_stop(tr.world, tr.device):
                if not saved:
                    tr.save(stage)
                if tr.world.world_size > 1:
                    dist.barrier()  # no rank exits (torchrun then stops the rest) before the checkpoint is written
                break
    except NonFiniteLoss as e:
        raise RunError(f"{e}; stopped without saving, the last good checkpoint ({tr.rd / CHECKPOINT}) is intact; "
                       f"lower the learning rates or try --amp none") from None
    finally:
        del it, loader
    return rows


def _lr(tr: Trainer, stage: Stage) -> float:
    opt = tr.opt_g if stage.with_targets else tr.opt_s
    return float(opt.param_groups[0]["lr"])


def load_run_config(run_dir: Path) -> TrainConfig:
    """The :class:`TrainConfig` stored in a run directory."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunError(f"{run_dir}: not a uvtrain run directory (no {CONFIG})")
    return TrainConfig.from_json(json.loads(path.read_text()))


__all__ = ["RunError", "Stage", "Trainer", "atomic_save", "config_differences", "fit", "load_run_config",
           "load_identity", "load_trained", "predict_uv", "prepare_run_dir", "schedule"]


def load_trained(run_dir: Path, device: str = "cpu", bundle: InferenceBundle | None = None
                 ) -> tuple[TrainConfig, UVSampler, UVGenerator, int]:
    """(config, sampler, generator, step) of a run directory's last checkpoint, in eval mode on ``device``.

    bundle: the run's :class:`train.bundle.InferenceBundle` when the caller has read it already (it sizes the
    generator); read here otherwise."""
    cfg = load_run_config(run_dir)
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{run_dir}: no {CHECKPOINT} (train with `uvtrain fit --run-dir {run_dir}` first)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    uv_size = (bundle or read_bundle(Path(run_dir), cfg.store)).uv_size
    sampler, generator = UVSampler(cfg.sampler), UVGenerator(uv_size, cfg.generator)
    sampler.load_state_dict(ck["models"]["sampler"])
    generator.load_state_dict(ck["models"]["generator"])
    return cfg, sampler.to(device).eval(), generator.to(device).eval(), int(ck["step"])


@torch.no_grad()
def predict_uv(sampler: UVSampler, generator: UVGenerator, image: torch.Tensor, uv_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """UV_spl and UV_pred of images (B, 3, S, S) in [0, 1]: ((B, 3, U, U), (B, 3, U, U)), as the generator phase."""
    uv_spl, grid = sampler(image, out_size=uv_size)
    return uv_spl, generator(uv_spl, sampled_inside(grid))
