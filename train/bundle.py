"""What inference needs from the training store, kept in the run directory (``RUN/inference/``).

``uvtrain infer`` and ``uvtrain eval`` load a checkpoint without the store it was trained on: ``uvtrain fit``
writes, once per run,

- ``face_model.npz``: the store's face model (:func:`common.loaders.save_face_model`; same fingerprint);
- ``info.json``: the UV size U, the store's working image size S, the store's fitter config (``stages.fit``:
  how faces were framed and fitted), the face-model fingerprint and the store's path;
- ``uv_valid.npy``: (U, U) bool, the texels the face model's layout covers.

Runs from before this file existed fall back to the store named in their config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.facemodel import FaceModel
from common.loaders import load_face_model, save_face_model
from common.store import StoreReader

__all__ = ["BUNDLE_DIR", "InferenceBundle", "layout_valid", "read_bundle", "write_bundle"]

BUNDLE_DIR = "inference"


@dataclass(frozen=True, eq=False)
class InferenceBundle:
    """face_model; uv_size U; image_size S (the store's frame); fit: the store's fitter config (dict);
    uv_valid (U, U) bool; store: the training store's path or URL (informational)."""

    face_model: FaceModel
    uv_size: int
    image_size: int
    fit: dict
    uv_valid: np.ndarray
    store: str


def layout_valid(reader: StoreReader) -> np.ndarray:
    """(U, U) bool, the face texels of a store: its texture basis's ``valid`` mask, else (no basis written yet)
    the face model's UV coverage. The mask of the UV losses, the completion metrics and ``uv_valid.npy``."""
    basis = reader.texture_basis()
    if basis is not None:
        return np.asarray(basis.valid, bool)
    from common.uvtools import model_uv_fragments

    return model_uv_fragments(reader.face_model(), reader.layout.uv_size).tri_id[0].numpy() >= 0


def _from_reader(reader: StoreReader, store: str) -> InferenceBundle:
    stages = dict(reader.attrs.get("config", {})).get("stages", {})
    return InferenceBundle(reader.face_model(), reader.layout.uv_size, reader.layout.image_size,
                           dict(stages.get("fit", {})), layout_valid(reader), store)


def write_bundle(run_dir: Path, reader: StoreReader, store: str) -> None:
    """Write ``RUN/inference/`` from the training store, unless it is already there (atomic per file)."""
    d = Path(run_dir) / BUNDLE_DIR
    if (d / "info.json").is_file():
        return
    b = _from_reader(reader, store)
    d.mkdir(exist_ok=True)
    tmp = d / f"face_model.npz.tmp{os.getpid()}"
    save_face_model(b.face_model, tmp)
    os.replace(tmp, d / "face_model.npz")
    np.save(d / "uv_valid.npy", b.uv_valid)
    info = {"uv_size": b.uv_size, "image_size": b.image_size, "fit": b.fit,
            "face_model_hash": b.face_model.fingerprint(), "store": store}
    tmp = d / f"info.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, d / "info.json")  # last: a bundle with info.json is complete


def read_bundle(run_dir: Path, store: str | None = None) -> InferenceBundle:
    """The run's bundle, or the same read from ``store`` (the run config's store for older runs)."""
    d = Path(run_dir) / BUNDLE_DIR
    if (d / "info.json").is_file():
        info = json.loads((d / "info.json").read_text())
        model = load_face_model(d / "face_model.npz")
        if model.fingerprint() != info["face_model_hash"]:
            raise ValueError(f"{d / 'face_model.npz'} does not match {d / 'info.json'} (fingerprint "
                             f"{model.fingerprint()} vs {info['face_model_hash']}): the run directory is damaged")
        return InferenceBundle(model, int(info["uv_size"]), int(info["image_size"]), dict(info["fit"]),
                               np.load(d / "uv_valid.npy"), str(info["store"]))
    if store is None:
        raise FileNotFoundError(f"{d}: no inference bundle in this run directory and no store to read it from")
    return _from_reader(StoreReader(store), store)
