"""Shared test fixtures: the licensed/public asset folder and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("UVTEX_SHARED_ASSETS", ROOT.parent / "shared" / "assets"))


def asset_path(*parts: str) -> Path:
    """Path of a file under ../shared/assets, or skip the test with the reason when it is absent."""
    p = SHARED_ASSETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the shared asset folder next to the project; set UVTEX_SHARED_ASSETS "
                    f"to point elsewhere)")
    return p


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module at one torch thread: setup outside the build's chunk tasks runs at torch's default thread count,
    which on 2 shared cores spins (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def assets():
    return asset_path


# A small synthetic training store shared by the trainer tests (data, loop, CLI): 24 samples of 64 px images and
# 32² UV maps in chunks of 4 (centre crops up to |yaw| 25 so that D_ctr has real data), built once per session.
TRAIN_STORE_FLAGS = {"count": 24, "image_size": 64, "uv_size": 32, "chunk": 4, "pca_samples": 24, "n_tex": 4,
                     "frontal_yaw": 25.0}


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> str:
    import dataclasses

    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    out = tmp_path_factory.mktemp("train") / "store.zarr"
    cfg, run = make_config(BuildArgs(out=out, **TRAIN_STORE_FLAGS))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    assert summary.ok == TRAIN_STORE_FLAGS["count"], summary
    return str(out)


@pytest.fixture(scope="session")
def trained_run(train_store, tmp_path_factory):
    """A run directory trained for a few steps on ``train_store`` by the tiny networks of the trainer tests."""
    from tests.test_train import tiny
    from train.config import RunOptions
    from train.loop import fit

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny(train_store, sampler_steps=2, sampler_finetune_steps=0, generator_steps=2)
    fit(cfg, RunOptions(run_dir=run_dir, progress=False, tensorboard=False, checkpoint_every=1000))
    return run_dir
