"""``uvtrain infer``: complete UV textures from face photos, and textured meshes where a shape fit is at hand.

For every photo (a file, or every image in a folder):

1. **Framing** (:func:`common.faces.fit.frame_face`): the square crop ``uvprep build`` would store, at the
   training store's working size S: ``context`` x 3DDFA_V2's ROI around the largest detected face (FaceBoxes
   when its weights are known, else OpenCV's Haar cascade), the photo resized for pre-aligned portraits
   (``--framing aligned``), or the photo itself (``--framing none``).
2. **UV texture**: the UV sampler and generator (Section 3) on the crop resized to the run's ``image_size``;
   written as ``NAME_uv.png`` (U x U, row 0 is v = 1). No 3D shape is used.
3. **Shape** (optional): with a fitter (``tddfa``: 3DDFA_V2 on the crop, needs its weights; ``given``: the
   user's 62 parameters per photo in a ``.npz``/``.csv``, like ``uvprep build --params``) the mesh is written as
   ``NAME.obj`` + ``NAME.mtl`` (texture ``NAME_uv.png``) and rendered at ``--views`` yaw angles into
   ``NAME_views.png`` (the paper's Fig. 1: the framed photo, then the views).

Photos are read as ``uvprep build`` reads its sources (:func:`common.imageio.read_photo`: the same ``--max-bytes`` /
``--max-pixels`` limits, truncation check and colour conversions). A photo that cannot be read (its ``uvprep`` reason:
``not_an_image``, ``truncated``, ``too_large``, ...), has no face, lacks parameters or fails to fit gets a line in
``OUT/failures.csv`` and is counted in the summary; the run goes on.
"""

from __future__ import annotations

import csv
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import FitConfig
from common.faces.assets import TDDFAAssets
from common.faces.fit import FitResult, ShapeFitter, frame_face, read_given_params
from common.files import check_output_folder
from common.geometry import split_params
from common.imageio import image_grid, read_photo, resize_image, to_uint8, write_png
from common.meshio import write_textured_obj
from common.store import Reason
from train.bundle import InferenceBundle
from train.config import InferConfig
from train.data import images_to_tensor, resize_images
from train.render import PosedMesh, render_lookup, rotated_params
from train.runs import (
    BEST,
    CHECKPOINT,
    RunError,
    open_trained,
    resolve_device,
    sampled_inside,
    trained_run_dir,
)

__all__ = ["IMAGE_SUFFIXES", "InferSummary", "Inferencer", "infer", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class InferSummary:
    photos: int = 0
    written: int = 0
    meshes: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    fitter: str = "none"
    framing: str = "detect"
    detector: str = "-"
    notes: list[str] = field(default_factory=list)


def list_images(path: Path) -> list[Path]:
    """The photos to process: ``path`` itself, or the image files directly in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RunError(f"--images {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not files:
        raise RunError(f"--images {path}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files in this folder")
    return files


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique (``a.jpg`` and ``a.png`` -> ``a_jpg``, ``a_png``)."""
    stems = Counter(p.stem for p in paths)
    return [p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix[1:].lower()}" for p in paths]


def _first(*paths) -> Path | None:
    """The first of the given paths that is a file (None entries skipped)."""
    return next((Path(p) for p in paths if p is not None and Path(p).is_file()), None)


@dataclass
class _Item:
    name: str
    image: np.ndarray                   # (S, S, 3) uint8 working crop
    params: np.ndarray | None = None    # (62,) in the crop's frame


class Inferencer:
    """Holds the trained networks, the face model and the framing / fitting tools of one ``uvtrain infer`` run."""

    def __init__(self, cfg: InferConfig) -> None:
        self.cfg = cfg
        ck = Path(cfg.checkpoint)
        trained_run_dir(ck)  # first: one line naming what is missing, not the store
        if ck.is_file() and ck.name not in (CHECKPOINT, BEST):
            raise RunError(f"--checkpoint {ck}: expected a run directory, its {CHECKPOINT} or its {BEST}")
        self.device = resolve_device(cfg.device)
        run = open_trained(ck, str(self.device))
        self.bundle: InferenceBundle = run.bundle
        self.train_cfg, self.sampler, self.generator, self.step = run.config, run.sampler, run.generator, run.step
        self.model = self.bundle.face_model
        self.posed = PosedMesh(self.model, self.device)
        self.summary = InferSummary(framing=cfg.framing)
        self._setup_fitting()

    # --------------------------------------------------------------------------------------- set-up
    def _paths(self) -> dict[str, Path | None]:
        """Each file from the first source that has it: the flag, then --bfm-v2-dir, then the training store."""
        c, stored = self.cfg, self.bundle.fit
        v2 = TDDFAAssets.from_dir(c.bfm_v2_dir) if c.bfm_v2_dir is not None else None
        return {
            "tddfa_weights": _first(c.tddfa_weights, v2.regressor if v2 else None, stored.get("tddfa_weights")),
            "param_stats": _first(c.param_stats, v2.param_stats if v2 else None, stored.get("param_stats")),
            "detector_weights": _first(c.detector_weights, v2.detector if v2 else None, stored.get("detector_weights")),
            "landmarks_dir": next((Path(p) for p in (stored.get("landmarks_dir"),) if p and Path(p).is_dir()), None),
        }

    def _setup_fitting(self) -> None:
        c, s = self.cfg, self.bundle.image_size
        paths = self._paths()
        stored = self.bundle.fit
        can_tddfa = paths["tddfa_weights"] is not None and paths["param_stats"] is not None
        bfm = stored.get("fitter") == "tddfa" or self.model.name.startswith("bfm")
        fitter = c.fitter
        if fitter == "auto":
            fitter = "given" if c.params is not None else ("tddfa" if can_tddfa and bfm else "none")
        if fitter == "tddfa" and not can_tddfa:
            raise RunError("--fitter tddfa needs the 3DDFA_V2 weights and parameter statistics: pass --bfm-v2-dir "
                           "or --tddfa-weights and --param-stats")
        if fitter == "tddfa" and not bfm:
            raise RunError(f"--fitter tddfa: 3DDFA_V2 predicts BFM coefficients, but this run's face model is "
                           f"{self.model.name!r}; use --params with parameters of that model, or --fitter none")
        fit_cfg = FitConfig(fitter="tddfa" if fitter == "tddfa" else "given", image_size=s,
                            tddfa_weights=paths["tddfa_weights"], param_stats=paths["param_stats"],
                            detector_weights=paths["detector_weights"],
                            landmarks_dir=paths["landmarks_dir"] if stored.get("second_pass") else None,
                            second_pass=bool(stored.get("second_pass")) and paths["landmarks_dir"] is not None,
                            context=float(stored.get("context", 1.25)),
                            min_face_px=float(stored.get("min_face_px", 24.0)),
                            max_outside=float(stored.get("max_outside", 0.25)), device=str(self.device))
        try:
            self.fitter = ShapeFitter(self.model, fit_cfg) if fitter != "none" else None
        except ValueError as e:
            raise RunError(str(e)) from None
        self.fit_cfg = fit_cfg
        self.summary.fitter = fitter
        self.known: dict[str, np.ndarray] = {}
        if fitter == "given":
            try:
                self.known = read_given_params(c.params)
            except (OSError, ValueError) as e:
                raise RunError(f"--params {c.params}: {e}") from None
        self.detector = None
        if fitter != "given" and c.framing == "detect":
            if paths["detector_weights"] is not None:
                from common.faces.detect import FaceBoxesDetector

                self.detector = FaceBoxesDetector.from_path(paths["detector_weights"], device=str(self.device))
                self.summary.detector = "FaceBoxes"
            else:
                from common.faces.detect import HaarDetector

                haar = HaarDetector()
                if not haar.available():
                    raise RunError("no face detector: pass --detector-weights (FaceBoxesProd.pth) or --bfm-v2-dir, "
                                   "or --framing none / aligned for photos that are already framed")
                self.detector = haar
                self.summary.detector = "OpenCV Haar cascade"
                self.summary.notes.append("faces framed by OpenCV's Haar cascade (no FaceBoxes weights given): "
                                          "weaker than the training store's framing on hard poses")
        if fitter == "none":
            self.summary.notes.append("no shape fitter (pass --bfm-v2-dir, or --params with known parameters): "
                                      "UV textures only, no meshes or views")

    # ------------------------------------------------------------------------------------ per photo
    def prepare(self, path: Path, name: str) -> _Item | tuple[str, str]:
        """Read, frame and fit one photo: an item for the networks, or (reason, detail) of its failure."""
        t = time.perf_counter()
        photo, why = read_photo(path, self.cfg.max_bytes, self.cfg.max_pixels)  # as uvprep build reads its photos
        self.summary.seconds["read"] += time.perf_counter() - t
        if why is not None:
            limits = f" (--max-bytes {self.cfg.max_bytes}, --max-pixels {self.cfg.max_pixels})"
            return why.short, why.description + (limits if why is Reason.TOO_LARGE else "")
        s = self.bundle.image_size
        if self.summary.fitter == "given":
            params = next((self.known[k] for k in (path.name, str(path), path.stem) if k in self.known), None)
            if params is None:
                return "no_params", f"no entry for {path.name} in {self.cfg.params}"
            t = time.perf_counter()
            res = self.fitter.fit_given(photo, params)
            self.summary.seconds["fit"] += time.perf_counter() - t
            return self._item(name, res)
        t = time.perf_counter()
        if self.cfg.framing == "none":
            framed = FitResult(resize_image(photo, s), box=np.array([0, 0, s, s], np.float32))
        else:
            framed = frame_face(photo, self.detector if self.cfg.framing == "detect" else None, s,
                                self.fit_cfg.context, self.fit_cfg.min_face_px)
        self.summary.seconds["detect"] += time.perf_counter() - t
        if not framed.ok or self.fitter is None:
            return self._item(name, framed)
        t = time.perf_counter()
        res = self.fitter.fit_framed(framed.image, framed.box)
        self.summary.seconds["fit"] += time.perf_counter() - t
        if not res.ok and res.image is not None:  # a failed fit still gives its texture, without a mesh
            self.summary.failures.append((path.name, res.reason, "shape fit failed; UV texture written, no mesh"))
            return _Item(name, res.image)
        return self._item(name, res)

    @staticmethod
    def _item(name: str, res: FitResult) -> _Item | tuple[str, str]:
        if not res.ok:
            return res.reason or "failed", ""
        return _Item(name, res.image, res.params)

    # ------------------------------------------------------------------------------------- networks
    @torch.no_grad()
    def run_batch(self, items: list[_Item]) -> None:
        """UV_pred for a batch of framed photos; write each one's UV map, and mesh + views when it has a fit."""
        x = resize_images(images_to_tensor(np.stack([it.image for it in items])).to(self.device),
                          self.train_cfg.image_size)
        uv_size = self.bundle.uv_size
        t = time.perf_counter()
        uv_spl, grid = self.sampler(x, out_size=uv_size)
        _sync(self.device)
        self.summary.seconds["sampler"] += time.perf_counter() - t
        t = time.perf_counter()
        uv_pred = self.generator(uv_spl, sampled_inside(grid), grid=grid).clamp(0, 1)
        _sync(self.device)
        self.summary.seconds["generator"] += time.perf_counter() - t
        t = time.perf_counter()
        out = Path(self.cfg.out)
        for i, it in enumerate(items):
            tex = to_uint8(uv_pred[i].permute(1, 2, 0).cpu().numpy())
            try:
                write_png(out / f"{it.name}_uv.png", tex)
                self.summary.written += 1
                if it.params is not None:
                    self._write_mesh(it, out)
                    write_png(out / f"{it.name}_views.png", self._views(it, uv_pred[i]))
                    self.summary.meshes += 1
            except OSError as e:  # the folder was checked at the start: a disk filled or a name taken by a folder since
                raise RunError(f"--out {out}: cannot write the outputs of {it.name} ({e}); {self.summary.written} "
                               f"photo(s) written before it") from None
        self.summary.seconds["write"] += time.perf_counter() - t

    def _write_mesh(self, it: _Item, out: Path) -> None:
        _, a_id, a_exp = split_params(it.params[None].astype(np.float32))
        verts = self.model.shape(a_id[:, :self.model.n_id], a_exp[:, :self.model.n_exp])[0]
        write_textured_obj(out / f"{it.name}.obj", verts, self.model.uv, self.model.triangles, f"{it.name}_uv.png")

    def _views(self, it: _Item, uv: torch.Tensor) -> np.ndarray:
        """(H, W, 3) uint8: the framed photo, then the textured face at each ``--views`` yaw (Fig. 1)."""
        n, vs, s = len(self.cfg.views), self.cfg.view_size, self.bundle.image_size
        params = rotated_params(np.repeat(it.params[None], n, 0), np.asarray(self.cfg.views), s, self.model)
        verts = self.posed.verts(torch.from_numpy(params).to(self.device), s, vs)
        grid, cover = self.posed.lookup(verts, vs)
        img = render_lookup(uv[None].expand(n, -1, -1, -1), grid, cover)
        img = img + (1.0 - cover) * 0.85  # light grey background
        tiles = [resize_image(it.image, vs)] + [to_uint8(v.permute(1, 2, 0).cpu().numpy()) for v in img]
        labels = ["input"] + [f"{y:+.0f} deg" for y in self.cfg.views]
        return image_grid([tiles], labels=[labels])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer(cfg: InferConfig, on_photo=None) -> InferSummary:
    """Run ``uvtrain infer``; ``on_photo(done, total)`` reports progress. Returns the summary (also written as
    ``OUT/failures.csv``, one line per failed photo)."""
    paths = list_images(cfg.images)
    names = _output_names(paths)
    try:
        out = check_output_folder(cfg.out)  # before the networks load and the photos are read
    except ValueError as e:
        raise RunError(f"--out {cfg.out}: {e}; pass a writable folder (it is created)") from None
    inf = Inferencer(cfg)
    sm = inf.summary
    pending: list[_Item] = []
    for k, (path, name) in enumerate(zip(paths, names, strict=True)):
        sm.photos += 1
        item = inf.prepare(path, name)
        if isinstance(item, tuple):
            sm.failures.append((path.name, *item))
        else:
            pending.append(item)
        if len(pending) == cfg.batch_size or (k == len(paths) - 1 and pending):
            inf.run_batch(pending)
            pending = []
        if on_photo is not None:
            on_photo(k + 1, len(paths))
    with open(out / "failures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "reason", "detail"])
        w.writerows(sm.failures)
    return sm
