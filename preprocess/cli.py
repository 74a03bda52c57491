"""`uvprep`: the preprocessing command line. Thin: flags -> frozen config -> one function call."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build face-texture training stores from photo collections (Yin et al.).")


def _not_yet(what: str, issue: str) -> None:
    typer.secho(f"{what} is not implemented yet ({issue}).", fg="yellow", err=True)
    raise typer.Exit(code=2)


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
    src: str = typer.Option("synthetic", help="synthetic | ffhq | celeba-hq | folder | aflw2000"),
    out: Path = typer.Option(..., help="Output Zarr store."),
) -> None:
    """Preprocess a photo collection into a resumable Zarr training store."""
    _not_yet("uvprep build", "issue 5: Dask-parallel preprocessing into a Zarr store")


@app.command()
def info(store: Path) -> None:
    """Print a store's schema, counts, config and failure reasons."""
    _not_yet("uvprep info", "issue 5")


@app.command()
def check(store: Path) -> None:
    """Validate a store (shapes, dtypes, completion, value ranges); non-zero exit when broken."""
    _not_yet("uvprep check", "issue 5")


@app.command()
def show(store: Path, index: str = "0", out: Path = Path("grid.png")) -> None:
    """Write image | UV_gt | UV_bl | crops for the given samples side by side."""
    _not_yet("uvprep show", "issue 5")


if __name__ == "__main__":
    app()
