"""Recorded behaviour of a small synthetic build and a fixed-seed short fit, so that refactors can prove they change
nothing: ``python -m tests.golden record`` writes ``tests/data/golden.npz`` (every store array) and
``tests/data/golden.json`` (their SHA-256 digests and the fit's logged losses); ``tests/test_golden.py`` rebuilds,
retrains and compares."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
NPZ, JSON = DATA / "golden.npz", DATA / "golden.json"

# 8 samples of 64 px photos and 32² UV maps in two chunks; centre crops up to |yaw| 25 so both crop kinds occur.
BUILD_FLAGS = {"count": 8, "image_size": 64, "uv_size": 32, "chunk": 4, "pca_samples": 8, "n_tex": 4,
               "frontal_yaw": 25.0, "seed": 3}
SKIP = {"manifest_mtime"}  # when the build ran, not what it computed


def build(out: Path) -> dict[str, np.ndarray]:
    """Build the golden store at ``out`` in-process and return every array of its root group (group/name keys for
    the ``model/``, ``uv_layout/`` and ``texture/`` groups)."""
    import zarr

    from preprocess.build import build_store
    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, run = make_config(BuildArgs(out=out, **BUILD_FLAGS))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    assert summary.ok == BUILD_FLAGS["count"], summary
    root = zarr.open_group(str(out), mode="r")
    arrays: dict[str, np.ndarray] = {}

    def walk(group, prefix: str) -> None:
        for name, member in sorted(group.members()):
            key = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, f"{key}/")
            elif name == "chunk_record":  # the data's SHA-256, not the writing build's random generation token
                arrays[key] = np.asarray(member[...])[:, :32]
            elif name not in SKIP:
                arrays[key] = np.asarray(member[...])

    walk(root, "")
    return arrays


def digest(a: np.ndarray) -> str:
    if a.dtype.kind in "OUT":
        return hashlib.sha256("\n".join(map(str, a.ravel())).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def train(store: Path, run_dir: Path) -> list[dict]:
    """A fixed-seed fit of the tiny trainer-test networks through all three stages; the logged loss terms per step."""
    from tests.test_train import opts, tiny
    from train.loop import fit

    cfg = tiny(str(store), sampler_steps=4, sampler_finetune_steps=2, generator_steps=3, seed=5)
    fit(cfg, opts(run_dir))
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in rows]


def record() -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        arrays = build(Path(tmp) / "store.zarr")
        losses = train(Path(tmp) / "store.zarr", Path(tmp) / "run")
    DATA.mkdir(exist_ok=True)
    # The values of the per-sample arrays, for a tolerance comparison on machines whose float rounding differs; the
    # face model (megabytes, procedural, not computed by the build) is checked by digest only.
    np.savez_compressed(NPZ, **{k: v for k, v in arrays.items() if "/" not in k and v.dtype.kind not in "OUT"})
    JSON.write_text(json.dumps({"build_flags": BUILD_FLAGS, "digests": {k: digest(v) for k, v in arrays.items()},
                                "losses": losses}, indent=1) + "\n")
    print(f"wrote {NPZ} ({NPZ.stat().st_size} bytes) and {JSON}: {len(arrays)} arrays, {len(losses)} loss rows")


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python -m tests.golden record")
    record()
