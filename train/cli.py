"""`uvtrain`: the training command line. Thin: flags -> frozen configs -> one function call."""

from __future__ import annotations

from pathlib import Path

import typer

from common.options import field_default, given, option
from train.config import (
    EXIT_PREEMPTED,
    METHODS,
    DiscriminatorConfig,
    EvalConfig,
    ExportConfig,
    GeneratorConfig,
    InferConfig,
    LossWeights,
    OptimConfig,
    RunOptions,
    SamplerConfig,
    TrainConfig,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train the UV sampler and UV generator on a store built by `uvprep build`.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code=2)


def _run(command: str, runner: str, *args) -> None:
    """Call ``train.console.<runner>(*args)`` and exit with its code. SIGINT, SIGTERM and SIGUSR1 raise a
    KeyboardInterrupt (:func:`common.signals.signals_interrupt`) until the runner installs its own handling (fit's stop
    request): one line and a defined exit code for a signal at any time, also while torch loads (the longest part of
    the start-up), where SIGTERM and SIGUSR1 ended the command silently."""
    import signal

    from common.signals import STOP_SIGNALS, interrupt_signal, interrupted_exit_code, signals_interrupt

    try:
        with signals_interrupt((signal.SIGINT, *STOP_SIGNALS)):
            from train import console

            code = getattr(console, runner)(*args)
    except KeyboardInterrupt as e:  # before the runner could say more
        sig = interrupt_signal(e)
        code = interrupted_exit_code(sig, EXIT_PREEMPTED if command == "fit" else None)
        typer.secho(f"uvtrain {command}: interrupted by {sig} during start-up: nothing written; rerun the same "
                    f"command (exit code {code})", err=True)
    if code:
        raise typer.Exit(code=code)


@app.command()
def fit(
    store: str = typer.Option(..., help="Zarr store written by `uvprep build` (path or fsspec URL)."),
    run_dir: Path = typer.Option(..., help="Run directory: config, checkpoints, metrics, previews, TensorBoard."),
    phase: str = option(RunOptions, "phase", help="sampler | generator | all"),
    sampler_steps: int = option(TrainConfig, "sampler_steps", min=0, help="UV sampler steps, fine-tuning included "
                                                                          "(paper: 30k)."),
    sampler_finetune_steps: int = option(TrainConfig, "sampler_finetune_steps", min=0, help="Last sampler steps at "
                                         "--image-size (default: a fifth of --sampler-steps)."),
    generator_steps: int = option(TrainConfig, "generator_steps", min=0, help="UV generator steps (paper: 100k)."),
    batch_size: int = option(TrainConfig, "batch_size", min=1, help="Batch per rank (paper: 6)."),
    image_size: int = option(TrainConfig, "image_size", min=32, help="Input side of the generator and the sampler "
                                                                     "fine-tune."),
    sampler_image_size: int = option(TrainConfig, "sampler_image_size", min=32, help="Input side of the sampler's "
                                                                                     "first stage."),
    sampler_grid: int = option(SamplerConfig, "grid_size", min=8, help="UV sampler grid side S (paper: 152)."),
    sampler_n_down: int = option(SamplerConfig, "n_down", min=1, help="Halving residual blocks of the sampler's "
                                 "feature extractor; keep the last map >= 8x8 for small inputs (docs/experiments.md)."),
    sampler_pool: int = option(SamplerConfig, "pool_size", min=1, help="Side of the pooled last feature map the "
                               "sampler head reads."),
    sampler_control_size: int = option(SamplerConfig, "control_size", min=0, help="Side of the sampler head's grid "
                                       "of control points, bilinearly upsampled to S; 0: the paper's per-texel head "
                                       "(2 S² outputs, docs/experiments.md)."),
    init_sampler: Path = option(RunOptions, "init_sampler", help="Start a new run from another run's sampler (its "
                                "run directory or sampler.pt, whose sampler flags and store must match) at the "
                                "generator phase; ignored when the run resumes."),
    generator_residual: bool = option(GeneratorConfig, "residual", help="The generator corrects UV_spl instead of "
                                      "predicting UV_pred from scratch (docs/experiments.md)."),
    generator_mirror_input: bool = option(GeneratorConfig, "mirror_input", help="Also feed the generator UV_spl "
                                          "mirrored across the face (docs/experiments.md)."),
    generator_grid_input: bool = option(GeneratorConfig, "grid_input", help="Also feed the generator the sampler's "
                                        "sampling grid (docs/experiments.md)."),
    generator_visibility_gate: bool = option(GeneratorConfig, "visibility_gate", help="With --generator-residual: "
                                             "blend the corrected UV_spl with a fresh fill by a predicted map of "
                                             "the texels the photo saw (docs/experiments.md)."),
    channels: int = option(SamplerConfig, "channels", min=4, help="Base channels of every network (smaller for "
                                                                  "quick tries)."),
    device: str = option(RunOptions, "device", help="cpu | cuda | cuda:N"),
    workers: int = option(TrainConfig, "workers", min=0, help="DataLoader workers per rank (part of the data "
                                                              "order)."),
    seed: int = option(TrainConfig, "seed", help="Seed of weights and data order."),
    log_every: int = option(RunOptions, "log_every", min=1, help="Steps between metrics lines."),
    checkpoint_every: int = option(RunOptions, "checkpoint_every", min=1, help="Steps between checkpoints."),
    preview_every: int = option(RunOptions, "preview_every", min=1, help="Steps between preview PNGs (default: every "
                                                                         "checkpoint)."),
    overwrite: bool = option(RunOptions, "overwrite", help="Restart a run directory that holds another run."),
    lr_sampler: float = option(OptimConfig, "lr_sampler", min=0.0, help="Adam learning rate of the sampler."),
    lr_generator: float = option(OptimConfig, "lr_generator", min=0.0, help="Adam learning rate of the generator."),
    lr_discriminator: float = option(OptimConfig, "lr_discriminator", min=0.0, help="Adam learning rate of the "
                                                                                    "discriminators."),
    w_face: float = option(LossWeights, "face", min=0.0, help="Weight of the face L1 (Eq. 5, 11)."),
    w_uv: float = option(LossWeights, "uv", min=0.0, help="Weight of the UV L1 (Eq. 5, 11)."),
    w_uv_unseen: float = option(LossWeights, "uv_unseen", min=0.0, help="Factor on the UV term at the texels UV_gt "
                                "did not observe (not in the paper; 1: Eq. 11)."),
    w_sym: float = option(LossWeights, "sym", min=0.0, help="Weight of the symmetry loss (Eq. 12), lambda_2 of "
                                                            "Eq. 14."),
    w_tv: float = option(LossWeights, "tv", min=0.0, help="Weight of TV (Eq. 7), lambda of Eq. 5 and lambda_4 of "
                                                          "Eq. 14."),
    w_id: float = option(LossWeights, "id", min=0.0, help="Weight of the identity loss (Eq. 13), lambda_3 of "
                                                          "Eq. 14."),
    w_adv: float = option(LossWeights, "adv", min=0.0, help="Weight of the adversarial loss (Eq. 10), lambda_1 of "
                                                            "Eq. 14."),
    w_ctr: float = option(LossWeights, "ctr", min=0.0, help="Extra factor of D_ctr's adversarial term (0: D_ctr is "
                                                          "not trained at all)."),
    w_side: float = option(LossWeights, "side", min=0.0, help="Extra factor of D_sd's adversarial term (0: D_sd is "
                                                              "not trained at all)."),
    w_vis: float = option(LossWeights, "vis", min=0.0, help="Weight of the visibility gate's cross-entropy (not in "
                                                            "the paper; with --generator-visibility-gate)."),
    w_grid: float = option(LossWeights, "grid", min=0.0, help="Weight of the auxiliary sampling-grid L1 to the fit "
                                                              "(not in the paper; 0: Eq. 5 alone)."),
    r1_gamma: float = option(LossWeights, "r1_gamma", min=0.0, help="R1 penalty weight of the discriminators (0: "
                                                                    "off)."),
    rotate_share: float = option(TrainConfig, "rotate_share", min=0.0, max=1.0, help="Share of rotate-and-render "
                                                                                     "inputs."),
    max_yaw: float = option(TrainConfig, "max_yaw", min=0.0, max=90.0, help="|yaw| bound of the random poses "
                                                                           "(degrees)."),
    identity: str = option(TrainConfig, "identity", help="Identity network of Eq. 13: dlib (CC0, the identity "
                           "extra) | dlib:PATH | lightcnn:PATH (LightCNN-29 v2 checkpoint) | PATH.pt (TorchScript) "
                           "| none."),
    amp: str = option(RunOptions, "amp", help="auto | bf16 | fp16 | none (auto: bf16 on CUDA)."),
    render_on: str = option(RunOptions, "render_on", help="Rasterise in the loader or on the device: auto | loader | "
                                                          "device."),
    compile: bool = option(RunOptions, "compile", "--compile", help="torch.compile the networks."),
    progress: bool = option(RunOptions, "progress", help="Show the progress line."),
    tensorboard: bool = option(RunOptions, "tensorboard", help="Write TensorBoard event files."),
    dist_timeout: float = option(RunOptions, "dist_timeout", min=1.0, help="Under torchrun: seconds a collective "
                                 "waits for the other ranks before the job fails (a frozen rank or a lost node)."),
    val_store: str = option(RunOptions, "val_store", help="Held-out store validated during training (`uvtrain eval`'s "
                            "metrics as val rows of metrics.jsonl, and best.pt); same face model and UV size."),
    val_every: int = option(RunOptions, "val_every", min=1, help="Steps between validations (also at each stage's "
                                                                 "end)."),
    val_samples: int = option(RunOptions, "val_samples", min=0, help="Samples of --val-store validated, the same "
                                                                     "ones each time (0: all)."),
    val_metric: str = option(RunOptions, "val_metric", help="Metric that picks best.pt: l1 | l1_face | ssim | "
                             "seen_mae | unseen_mae | all_mae | id_recon | id_front (ssim, id_*: higher is better)."),
    val_identity: str = option(RunOptions, "val_identity", help="Identity network of the held-out ID columns: none | "
                                                                "dlib | lightcnn:PATH | PATH.pt."),
) -> None:
    """Pre-train the UV sampler, then train the UV generator with its three discriminators.

    Rerunning the same command resumes. SIGUSR1 or SIGTERM stops after the current step with a checkpoint and exit
    code 124 (requeue; see pipelines/slurm/train.sbatch). An option left out takes its config field's default.
    """
    try:
        cfg = TrainConfig(
            store=store, **given(
                sampler_steps=sampler_steps, sampler_finetune_steps=sampler_finetune_steps,
                generator_steps=generator_steps, batch_size=batch_size, image_size=image_size,
                sampler_image_size=sampler_image_size, workers=workers, seed=seed, rotate_share=rotate_share,
                max_yaw=max_yaw, identity=identity),
            weights=LossWeights(**given(face=w_face, uv=w_uv, sym=w_sym, tv=w_tv, id=w_id, adv=w_adv, ctr=w_ctr,
                                        side=w_side, grid=w_grid, r1_gamma=r1_gamma, vis=w_vis,
                                        uv_unseen=w_uv_unseen)),
            optim=OptimConfig(**given(lr_sampler=lr_sampler, lr_generator=lr_generator,
                                      lr_discriminator=lr_discriminator)),
            sampler=SamplerConfig(**given(grid_size=sampler_grid, channels=channels, n_down=sampler_n_down,
                                           pool_size=sampler_pool), **({} if sampler_control_size is None else
                                                                      {"control_size": sampler_control_size or None})),
            generator=GeneratorConfig(**given(channels=channels, residual=generator_residual,
                                              mirror_input=generator_mirror_input,
                                              visibility_gate=generator_visibility_gate,
                                              grid_input=generator_grid_input)),
            discriminator=DiscriminatorConfig(**given(channels=channels)))
        run = RunOptions(run_dir=run_dir, **given(
            phase=phase, device=device, overwrite=overwrite, log_every=log_every, checkpoint_every=checkpoint_every,
            preview_every=preview_every, amp=amp, render_on=render_on, compile=compile, progress=progress,
            tensorboard=tensorboard, dist_timeout=dist_timeout, val_store=val_store, val_every=val_every,
            val_samples=val_samples, val_metric=val_metric, val_identity=val_identity, init_sampler=init_sampler))
    except ValueError as e:
        _fail(str(e))
    _run("fit", "run_fit", cfg, run)


@app.command()
def infer(
    checkpoint: Path = typer.Option(..., help="A `uvtrain fit` run directory (or its checkpoint.pt / best.pt), or a "
                                              "`uvtrain export` folder."),
    images: Path = typer.Option(..., help="A face photo, or a folder of photos."),
    out: Path = typer.Option(..., help="Output folder: NAME_uv.png (+ NAME.obj/.mtl, NAME_views.png), "
                                       "failures.csv."),
    device: str = option(InferConfig, "device", help="cpu | cuda | cuda:N."),
    batch_size: int = option(InferConfig, "batch_size", help="Photos per network batch."),
    framing: str = option(InferConfig, "framing", help="detect (face detector) | aligned (FFHQ / CelebA-HQ "
                                                       "portraits) | none (the photo is the frame)."),
    fitter: str = option(InferConfig, "fitter", help="Shape fit for meshes and views: auto | tddfa | given | none."),
    params: Path = option(InferConfig, "params", help="Known 62 parameters per photo (.npz keys/params or .csv) for "
                                                      "--fitter given."),
    bfm_v2_dir: Path = option(InferConfig, "bfm_v2_dir", help="3DDFA_V2 checkout (weights, statistics, "
                                                              "FaceBoxes)."),
    tddfa_weights: Path = option(InferConfig, "tddfa_weights", help="3DDFA_V2 regressor weights "
                                                                    "(mb1/mb05_120x120.pth)."),
    param_stats: Path = option(InferConfig, "param_stats", help="3DDFA_V2 param_mean_std_62d_120x120.pkl."),
    detector_weights: Path = option(InferConfig, "detector_weights", help="FaceBoxesProd.pth (else OpenCV's Haar "
                                                                          "cascade)."),
    views: str = option(InferConfig, "views", help="Yaw angles (degrees) of NAME_views.png, comma-separated."),
    view_size: int = option(InferConfig, "view_size", help="Side of each rendered view."),
    max_bytes: int = option(InferConfig, "max_bytes", min=1, help="Read limit per photo in bytes (as `uvprep build "
                            "--max-bytes`): larger ones fail with too_large, unread."),
    max_pixels: int = option(InferConfig, "max_pixels", min=1, help="Pixel limit per photo from its header (as "
                             "`uvprep build --max-pixels`): larger ones fail with too_large, undecoded."),
    progress: bool = option(InferConfig, "progress", help="Show a progress bar and the summary."),
) -> None:
    """Complete UV textures (and textured meshes) from face photos with a trained run."""
    try:
        yaws = tuple(float(v) for v in views.split(",") if v.strip()) if views is not None else None
        cfg = InferConfig(checkpoint=checkpoint, images=images, out=out, **given(
            device=device, batch_size=batch_size, framing=framing, fitter=fitter, params=params, bfm_v2_dir=bfm_v2_dir,
            tddfa_weights=tddfa_weights, param_stats=param_stats, detector_weights=detector_weights, views=yaws,
            view_size=view_size, max_bytes=max_bytes, max_pixels=max_pixels, progress=progress))
    except ValueError as e:
        _fail(str(e))
    _run("infer", "run_infer", cfg)


@app.command("eval")
def eval_(
    store: str = typer.Option(..., help="Store to evaluate on (path or URL; --src aflw2000 for the paper's "
                                        "protocol)."),
    out: Path = typer.Option(..., help="metrics.json to write (every number, hashes, sample count, failures)."),
    checkpoint: Path = option(EvalConfig, "checkpoint", help="A `uvtrain fit` run directory (or its "
                                                             "checkpoint.pt / best.pt), or a `uvtrain export` "
                                                             "folder."),
    method: list[str] = option(EvalConfig, "methods", help="bfm | bl | sampler | generator (repeatable); the "
                                                           "default needs --checkpoint."),
    baselines: bool = typer.Option(False, "--baselines", help="Also evaluate bfm, bl and the sampler alone on the "
                                                              "same samples."),
    identity: str = option(EvalConfig, "identity", help="Identity network of the Recon / Front columns: dlib | "
                                                        "lightcnn:PATH | PATH.pt | none."),
    batch_size: int = option(EvalConfig, "batch_size", help="Samples per batch."),
    device: str = option(EvalConfig, "device", help="cpu | cuda | cuda:N."),
    limit: int = option(EvalConfig, "limit", help="Evaluate only the first N usable samples (0: all)."),
    progress: bool = option(EvalConfig, "progress", help="Show a progress bar and the tables."),
) -> None:
    """Table 1 (reconstruction L1 / SSIM, identity Recon / Front) and completion against the truth."""
    methods = list(method or [])
    if not methods:
        if checkpoint is None:
            _fail("pass --checkpoint (a trained run), or --method bfm / bl to evaluate the store's own textures")
        methods = list(field_default(EvalConfig, "methods"))
    if baselines:
        extra = ["bfm", "bl"] + (["sampler"] if checkpoint is not None else [])
        methods = [m for m in METHODS if m in extra or m in methods]
    try:
        cfg = EvalConfig(store=store, out=out, methods=tuple(dict.fromkeys(methods)), **given(
            checkpoint=checkpoint, identity=identity, batch_size=batch_size, device=device, limit=limit,
            progress=progress))
    except ValueError as e:
        _fail(str(e))
    _run("eval", "run_eval", cfg)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A `uvtrain fit` run directory."),
    out: Path = typer.Option(..., help="Export folder: model.safetensors, config.json, inference/, README.md "
                                       "(model card), export.json (SHA-256 of each file)."),
    which: str = option(ExportConfig, "which", help="auto (best.pt where the run has one) | last (checkpoint.pt) | "
                                                    "best (best.pt)."),
    overwrite: bool = option(ExportConfig, "overwrite", help="Replace an export already in --out."),
) -> None:
    """The sampler's and generator's weights as safetensors, with the run's config, inference bundle and a model card:
    a folder `uvtrain infer --checkpoint` and `uvtrain eval --checkpoint` take as they take a run directory."""
    try:
        cfg = ExportConfig(run_dir=run, out=out, **given(which=which, overwrite=overwrite))
    except ValueError as e:
        _fail(str(e))
    from train.console import run_export

    code = run_export(cfg)
    if code:
        raise typer.Exit(code=code)


@app.command()
def plot(
    run: Path = typer.Argument(..., help="A `uvtrain fit` run directory."),
    out: Path = typer.Option(None, help="PNG to write (default: RUN/curves.png)."),
) -> None:
    """Draw a run's held-out validation curves and training loss terms (RUN/metrics.jsonl) into a PNG."""
    from train.plot import plot_run

    try:
        typer.echo(f"wrote {plot_run(run, out)}")
    except FileNotFoundError as e:
        _fail(str(e))


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _v

    typer.echo(_v("uvtex"))


if __name__ == "__main__":
    app()
