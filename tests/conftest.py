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


@pytest.fixture
def assets():
    return asset_path
