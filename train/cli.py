"""`uvtrain`: the training command line. Thin: flags -> frozen configs -> one function call."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train the UV sampler and UV generator on a store built by `uvprep build`.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code=2)


@app.command()
def fit(
    store: str = typer.Option(..., help="Zarr store written by `uvprep build` (path or fsspec URL)."),
    run_dir: Path = typer.Option(..., help="Run directory: config, checkpoints, metrics, previews, TensorBoard."),
    phase: str = typer.Option("all", help="sampler | generator | all"),
    sampler_steps: int = typer.Option(30_000, min=0, help="UV sampler steps, fine-tuning included (paper: 30k)."),
    sampler_finetune_steps: int = typer.Option(None, min=0, help="Last sampler steps at --image-size (default 20%)."),
    generator_steps: int = typer.Option(100_000, min=0, help="UV generator steps (paper: 100k)."),
    batch_size: int = typer.Option(6, min=1, help="Batch per rank (paper: 6)."),
    image_size: int = typer.Option(256, min=32, help="Input side of the generator and the sampler fine-tune."),
    sampler_image_size: int = typer.Option(128, min=32, help="Input side of the sampler's first stage."),
    sampler_grid: int = typer.Option(152, min=8, help="UV sampler grid side S (paper: 152)."),
    channels: int = typer.Option(64, min=4, help="Base channels of every network (smaller for quick tries)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    workers: int = typer.Option(2, min=0, help="DataLoader workers per rank (part of the data order)."),
    seed: int = typer.Option(0, help="Seed of weights and data order."),
    log_every: int = typer.Option(50, min=1, help="Steps between metrics lines."),
    checkpoint_every: int = typer.Option(1000, min=1, help="Steps between checkpoints."),
    preview_every: int = typer.Option(None, min=1, help="Steps between preview PNGs (default: every checkpoint)."),
    overwrite: bool = typer.Option(False, help="Restart a run directory that holds another run."),
    lr_sampler: float = typer.Option(1e-4, min=0.0, help="Adam learning rate of the sampler."),
    lr_generator: float = typer.Option(1e-4, min=0.0, help="Adam learning rate of the generator."),
    lr_discriminator: float = typer.Option(1e-4, min=0.0, help="Adam learning rate of the discriminators."),
    w_face: float = typer.Option(10.0, min=0.0, help="Weight of the face L1 (Eq. 5, 11)."),
    w_uv: float = typer.Option(1.0, min=0.0, help="Weight of the UV L1 (Eq. 5, 11)."),
    w_sym: float = typer.Option(1.0, min=0.0, help="Weight of the symmetry loss (Eq. 12), lambda_2 of Eq. 14."),
    w_tv: float = typer.Option(0.1, min=0.0, help="Weight of TV (Eq. 7), lambda of Eq. 5 and lambda_4 of Eq. 14."),
    w_id: float = typer.Option(0.1, min=0.0, help="Weight of the identity loss (Eq. 13), lambda_3 of Eq. 14."),
    w_adv: float = typer.Option(0.01, min=0.0, help="Weight of the adversarial loss (Eq. 10), lambda_1 of Eq. 14."),
    w_side: float = typer.Option(0.5, min=0.0, help="Extra factor of D_sd's adversarial term."),
    w_grid: float = typer.Option(1.0, min=0.0, help="Weight of the auxiliary sampling-grid L1 to the fit (not in "
                                                    "the paper; 0: Eq. 5 alone)."),
    r1_gamma: float = typer.Option(0.0, min=0.0, help="R1 penalty weight of the discriminators (0: off)."),
    rotate_share: float = typer.Option(0.25, min=0.0, max=1.0, help="Share of rotate-and-render inputs."),
    max_yaw: float = typer.Option(60.0, min=0.0, max=90.0, help="|yaw| bound of the random poses (degrees)."),
    identity: str = typer.Option("dlib", help="Identity network of Eq. 13: dlib (CC0, the identity extra) | "
                                              "dlib:PATH | lightcnn:PATH (LightCNN-29 v2 checkpoint) | PATH.pt "
                                              "(TorchScript) | none."),
    amp: str = typer.Option("auto", help="auto | bf16 | fp16 | none (auto: bf16 on CUDA)."),
    render_on: str = typer.Option("auto", help="Rasterise in the loader or on the device: auto | loader | device."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the networks."),
    progress: bool = typer.Option(True, help="Show the progress line."),
    tensorboard: bool = typer.Option(True, help="Write TensorBoard event files."),
    dist_timeout: float = typer.Option(600.0, min=1.0, help="Under torchrun: seconds a collective waits for the "
                                                            "other ranks before the job fails (a frozen rank or a "
                                                            "lost node)."),
) -> None:
    """Pre-train the UV sampler, then train the UV generator with its three discriminators.

    Rerunning the same command resumes. SIGUSR1 or SIGTERM stops after the current step with a checkpoint and exit
    code 124 (requeue; see pipelines/slurm/train.sbatch).
    """
    from train.config import OptimConfig, RunOptions, TrainConfig
    from train.losses import LossWeights
    from train.models import DiscriminatorConfig, GeneratorConfig, SamplerConfig

    try:
        cfg = TrainConfig(
            store=store, sampler_steps=sampler_steps, sampler_finetune_steps=sampler_finetune_steps,
            generator_steps=generator_steps, batch_size=batch_size, image_size=image_size,
            sampler_image_size=sampler_image_size, workers=workers, seed=seed, rotate_share=rotate_share,
            max_yaw=max_yaw, identity=identity,
            weights=LossWeights(face=w_face, uv=w_uv, sym=w_sym, tv=w_tv, id=w_id, adv=w_adv, side=w_side,
                                grid=w_grid, r1_gamma=r1_gamma),
            optim=OptimConfig(lr_sampler=lr_sampler, lr_generator=lr_generator, lr_discriminator=lr_discriminator),
            sampler=SamplerConfig(grid_size=sampler_grid, channels=channels),
            generator=GeneratorConfig(channels=channels), discriminator=DiscriminatorConfig(channels=channels))
        run = RunOptions(run_dir=run_dir, phase=phase, device=device, overwrite=overwrite, log_every=log_every,
                         checkpoint_every=checkpoint_every, preview_every=preview_every, amp=amp, render_on=render_on,
                         compile=compile, progress=progress, tensorboard=tensorboard,
                         dist_timeout=dist_timeout)
    except ValueError as e:
        _fail(str(e))
    from train.console import run_fit

    code = run_fit(cfg, run)
    if code:
        raise typer.Exit(code=code)


@app.command()
def infer(
    checkpoint: Path = typer.Option(..., help="A `uvtrain fit` run directory (or its checkpoint.pt)."),
    images: Path = typer.Option(..., help="A face photo, or a folder of photos."),
    out: Path = typer.Option(..., help="Output folder: NAME_uv.png (+ NAME.obj/.mtl, NAME_views.png), "
                                       "failures.csv."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(8, help="Photos per network batch."),
    framing: str = typer.Option("detect", help="detect (face detector) | aligned (FFHQ / CelebA-HQ portraits) | "
                                              "none (the photo is the frame)."),
    fitter: str = typer.Option("auto", help="Shape fit for meshes and views: auto | tddfa | given | none."),
    params: Path = typer.Option(None, help="Known 62 parameters per photo (.npz keys/params or .csv) for "
                                           "--fitter given."),
    bfm_v2_dir: Path = typer.Option(None, help="3DDFA_V2 checkout (weights, statistics, FaceBoxes)."),
    tddfa_weights: Path = typer.Option(None, help="3DDFA_V2 regressor weights (mb1/mb05_120x120.pth)."),
    param_stats: Path = typer.Option(None, help="3DDFA_V2 param_mean_std_62d_120x120.pkl."),
    detector_weights: Path = typer.Option(None, help="FaceBoxesProd.pth (else OpenCV's Haar cascade)."),
    views: str = typer.Option("-60,-30,0,30,60", help="Yaw angles (degrees) of NAME_views.png."),
    view_size: int = typer.Option(256, help="Side of each rendered view."),
    progress: bool = typer.Option(True, help="Show a progress bar and the summary."),
) -> None:
    """Complete UV textures (and textured meshes) from face photos with a trained run."""
    from train.infer import InferConfig

    try:
        yaws = tuple(float(v) for v in views.split(",") if v.strip())
        cfg = InferConfig(checkpoint=checkpoint, images=images, out=out, device=device, batch_size=batch_size,
                          framing=framing, fitter=fitter, params=params, bfm_v2_dir=bfm_v2_dir,
                          tddfa_weights=tddfa_weights, param_stats=param_stats, detector_weights=detector_weights,
                          views=yaws, view_size=view_size, progress=progress)
    except ValueError as e:
        _fail(str(e))
    from train.console import run_infer

    code = run_infer(cfg)
    if code:
        raise typer.Exit(code=code)


@app.command("eval")
def eval_(
    store: str = typer.Option(..., help="Store to evaluate on (path or URL; --src aflw2000 for the paper's "
                                        "protocol)."),
    out: Path = typer.Option(..., help="metrics.json to write (every number, hashes, sample count, failures)."),
    checkpoint: Path = typer.Option(None, help="A `uvtrain fit` run directory (or its checkpoint.pt)."),
    method: list[str] = typer.Option(None, help="bfm | bl | sampler | generator (repeatable); default: generator "
                                                "with --checkpoint."),
    baselines: bool = typer.Option(False, "--baselines", help="Also evaluate bfm, bl and the sampler alone on the "
                                                              "same samples."),
    identity: str = typer.Option("dlib", help="Identity network of the Recon / Front columns: dlib | "
                                              "lightcnn:PATH | PATH.pt | none."),
    batch_size: int = typer.Option(8, help="Samples per batch."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    limit: int = typer.Option(0, help="Evaluate only the first N usable samples (0: all)."),
    progress: bool = typer.Option(True, help="Show a progress bar and the tables."),
) -> None:
    """Table 1 (reconstruction L1 / SSIM, identity Recon / Front) and completion against the truth."""
    from train.evaluate import METHODS, EvalConfig

    methods = list(method or [])
    if not methods:
        if checkpoint is None:
            _fail("pass --checkpoint (a trained run), or --method bfm / bl to evaluate the store's own textures")
        methods = ["generator"]
    if baselines:
        extra = ["bfm", "bl"] + (["sampler"] if checkpoint is not None else [])
        methods = [m for m in METHODS if m in extra or m in methods]
    try:
        cfg = EvalConfig(store=store, out=out, checkpoint=checkpoint, methods=tuple(dict.fromkeys(methods)),
                         identity=identity, batch_size=batch_size, device=device, limit=limit, progress=progress)
    except ValueError as e:
        _fail(str(e))
    from train.console import run_eval

    code = run_eval(cfg)
    if code:
        raise typer.Exit(code=code)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _v

    typer.echo(_v("uvtex"))


if __name__ == "__main__":
    app()
