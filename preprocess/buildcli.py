"""Flags of ``uvprep build`` (:class:`preprocess.config.BuildArgs`) -> the frozen
:class:`preprocess.config.BuildConfig` and :class:`preprocess.config.RunOptions`, and the build run with them."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from common.config import CropConfig, FitConfig
from common.signals import signal_handlers
from preprocess.config import (
    BlendConfig,
    BuildArgs,
    BuildConfig,
    MaskedPCAConfig,
    OcclusionConfig,
    RunOptions,
    StageConfig,
    UVGTConfig,
)


def validate_args(a: BuildArgs) -> None:
    """Every option checked before anything is read or created; raises ValueError naming the flag."""
    choices = {"fitter": (None, "given", "tddfa"), "face_model": (None, "procedural", "bfm-public"),
               "blend_mode": ("fill", "paste"), "fill_mode": ("relit", "mirror")}
    for name, allowed in choices.items():
        if getattr(a, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)!r}: expected one of "
                             f"{' | '.join(x for x in allowed if x)}")
    if a.refine is not None and a.refine != "dlib68" and not a.refine.startswith("dlib68:"):
        raise ValueError(f"--refine {a.refine!r}: expected dlib68 or dlib68:PATH "
                         f"(shape_predictor_68_face_landmarks.dat)")
    if a.texture_model not in ("pca", "model") and not Path(a.texture_model).is_file():
        raise ValueError(f"--texture-model {a.texture_model!r}: expected pca, model or an existing basis .npz file")
    for name, lo, hi in (("erosion", 0.0, 1.0), ("ridge_lambda", 0.0, float("inf")), ("frontal_yaw", 0.0, 90.0),
                         ("profile_yaw", 0.0, 90.0)):
        v = float(getattr(a, name))
        if not (math.isfinite(v) or v == hi) or not lo <= v <= hi:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a number in [{lo}, {hi}]")


_SLURM_FIELDS = {"slurm_cores": "cores", "slurm_memory": "memory", "slurm_walltime": "walltime",
                 "slurm_partition": "partition", "slurm_account": "account", "slurm_job_extra": "job_extra_directives",
                 "slurm_prologue": "job_script_prologue", "slurm_min_jobs": "min_jobs", "slurm_max_jobs": "max_jobs",
                 "slurm_local_directory": "local_directory", "slurm_log_directory": "log_directory"}


def slurm_config(a: BuildArgs):
    """The :class:`pipelines.dask_slurm.SlurmConfig` of ``--cluster slurm`` (None without it), checked against the
    other flags and the submit host; raises ValueError / RuntimeError naming the flag."""
    from pipelines.dask_slurm import SlurmConfig, check_submit_host

    given = {k: (tuple(v) if isinstance(v, list) else v) for k in _SLURM_FIELDS
             if (v := getattr(a, k)) is not None and v != [] and v != ()}
    if a.cluster not in (None, "local", "slurm"):
        raise ValueError(f"--cluster {a.cluster!r}: expected local | slurm")
    if a.cluster != "slurm":
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} needs --cluster slurm")
        return None
    for flag, value in (("--scheduler", a.scheduler), ("--workers", a.workers)):
        if value is not None:
            raise ValueError(f"--cluster slurm and {flag} are exclusive: SLURM jobs are the workers (size them "
                             f"with --slurm-cores / --threads / --slurm-max-jobs)")
    cfg = SlurmConfig(**{_SLURM_FIELDS[k]: v for k, v in given.items()})
    check_submit_host(cfg, a.threads)
    return cfg


def make_config(a: BuildArgs):
    """Returns (BuildConfig, RunOptions). Real-photo defaults come from the 3DDFA_V2 folder when given."""
    validate_args(a)
    slurm = slurm_config(a)
    from common.faces.assets import TDDFAAssets
    from common.synthetic import SyntheticConfig
    from preprocess.sources import SyntheticSource, make_source

    synthetic = a.src == "synthetic"
    if synthetic:
        source = SyntheticSource(count=a.count, seed=a.seed,
                                 config=SyntheticConfig(image_size=a.image_size, uv_size=a.uv_size))
    else:
        if a.images is None:
            raise ValueError(f"--src {a.src} needs --images (a folder or .zip of images)")
        extra = {"params": str(a.params)} if a.params is not None else {}
        extra.update({k: v for k, v in (("max_bytes", a.max_bytes), ("max_pixels", a.max_pixels)) if v is not None})
        source = make_source(a.src, images=str(a.images), **extra)
    fitter = a.fitter or ("given" if synthetic or a.params is not None or a.src == "aflw2000" else "tddfa")
    v2 = TDDFAAssets.from_dir(a.bfm_v2_dir) if a.bfm_v2_dir is not None else None
    fit = FitConfig(fitter=fitter, image_size=a.image_size)
    if fitter == "tddfa":
        fit = replace(fit, tddfa_weights=a.tddfa_weights or (v2.regressor if v2 else None),
                      param_stats=v2.param_stats if v2 else None,
                      detector_weights=a.detector_weights or (v2.detector if v2 else None))
        lm = (a.bfm_v1_dir / "c++" / "weights") if a.bfm_v1_dir is not None else None
        if a.second_pass and lm is not None and lm.is_dir():  # NME 3.29 % vs 3.43 % on the AFLW2000-3D samples
            fit = replace(fit, landmarks_dir=lm, second_pass=True)
        if a.refine:  # opt-in: dlib's 68-point model is trained on iBUG 300-W (non-commercial)
            fit = _refine_fit(fit, a.refine, lm)
    stages = StageConfig(
        face_model=a.face_model or ("procedural" if synthetic else "bfm-public"),
        bfm_v1_dir=a.bfm_v1_dir, bfm_v2_dir=a.bfm_v2_dir, fit=fit,
        uvgt=UVGTConfig(uv_size=a.uv_size, erosion_frac=a.erosion), texture_model=a.texture_model,
        pca=MaskedPCAConfig(n_components=a.n_tex), pca_samples=a.pca_samples, ridge_lambda=a.ridge_lambda,
        blend=BlendConfig(mode=a.blend_mode) if a.fill_mode == "relit" else BlendConfig.paper_mirror(mode=a.blend_mode),
        crops=CropConfig(frontal_yaw_max=a.frontal_yaw, profile_yaw_min=a.profile_yaw),
        # photos have no face parser: reject occluders by default; the synthetic world's exact mask needs none
        occlusion=OcclusionConfig() if (not synthetic if a.occlusion is None else a.occlusion) else None)
    workers = 0 if slurm else a.workers if a.workers is not None else max(1, (os.cpu_count() or 1) // a.threads)
    from common.store import store_location

    run = RunOptions(out=store_location(a.out), workers=workers, threads=a.threads, scheduler=a.scheduler, slurm=slurm,
                     overwrite=a.overwrite, verify=a.verify, lock=a.lock)
    return BuildConfig(source=source, stages=stages, chunk=a.chunk), run


def _refine_fit(fit, spec: str, lm: Path | None):
    """``--refine dlib68[:PATH]`` -> the fit config with the landmark refinement on (needs the 68-landmark bases)."""
    from common.faces.dlib68 import dlib68_model_path
    from common.faces.refine import RefineConfig

    if lm is None or not lm.is_dir():
        raise ValueError("--refine needs the 68-landmark bases: pass --bfm-v1-dir (3DDFA's folder with c++/weights)")
    path = Path(spec.removeprefix("dlib68:")) if spec.startswith("dlib68:") else dlib68_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"--refine {spec}: {path} not found (dlib's shape_predictor_68_face_landmarks.dat)")
    return replace(fit, landmarks_dir=lm, refine=RefineConfig(), refine_landmarks=path)


@contextlib.contextmanager
def _interruptible():
    """SIGTERM raises KeyboardInterrupt("SIGTERM") like Ctrl-C does, so the build unwinds the same way: the lock
    is released, the local Dask cluster shut down (its workers ignore SIGINT, so a Ctrl-C in the terminal does
    not make each of them print a traceback), and one line is printed."""
    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    with signal_handlers({signal.SIGTERM: on_term}):
        yield


def run_build(a: BuildArgs, console: Console | None = None) -> int:
    """Run the build and print the summary; exit code 0 when every chunk is written, 1 otherwise."""
    from common.store import StoreLocked, StoreMismatch
    from preprocess.build import build_store
    from preprocess.progress import summary_table

    console = console or Console(stderr=True)
    try:
        cfg, run = make_config(a)
        with _interruptible():
            summary = build_store(cfg, run)
    except (StoreMismatch, StoreLocked, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        console.print(f"[red]uvprep build: {e}", soft_wrap=True, highlight=False)  # one line, never wrapped
        return 2
    except PermissionError as e:
        console.print(f"[red]uvprep build: {a.out}: permission denied ({e.strerror}); choose a writable --out",
                      soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt as e:
        code = 143 if str(e) == "SIGTERM" else 130
        console.print(f"[yellow]uvprep build: interrupted ({'SIGTERM' if code == 143 else 'SIGINT'}); completed "
                      f"chunks are kept: rerun the same command to resume", soft_wrap=True, highlight=False)
        return code
    console.print(summary_table(summary, cfg.stages.fit))
    if cfg.stages.fit.fitter == "tddfa" and a.second_pass and not cfg.stages.fit.second_pass:
        console.print("[yellow]one fitting pass only: the landmark second pass needs the 68-landmark bases in "
                      "--bfm-v1-dir (c++/weights)")
    for err in summary.errors[:5]:
        console.print(f"[yellow]{err}")
    if not summary.complete:
        console.print(f"[red]{len(summary.failed_chunks)} chunk(s) failed after retries; rerun the same command to "
                      f"retry them (completed chunks are kept)")
        return 1
    return 0
