"""`uvtrain`: the training command line. Thin: flags -> frozen config -> one function call."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train the UV sampler and UV generator on a store built by `uvprep build`.")


@app.command()
def fit(store: Path = typer.Option(..., help="Zarr store written by `uvprep build`.")) -> None:
    """Pre-train the UV sampler, then train the UV generator with its three discriminators."""
    typer.secho("uvtrain fit is not implemented yet (the trainer issue).", fg="yellow", err=True)
    raise typer.Exit(code=2)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _v

    typer.echo(_v("uvtex"))


if __name__ == "__main__":
    app()
