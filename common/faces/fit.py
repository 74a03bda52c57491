"""The "fits shapes" stage: photo -> working-resolution face crop + 62 parameters + mesh in its pixels.

Two fitters behind one interface (:class:`ShapeFitter`):

* ``given``: parameters come with the sample (the synthetic world's truth, or a user's NPZ/CSV),
  already expressed in the working image's frame;
* ``tddfa``: the 3DDFA_V2 regressor (:mod:`common.faces.tddfa`) on a FaceBoxes detection
  (in-the-wild photos) or on the fixed box of pre-aligned FFHQ / CelebA-HQ images.

Every result's parameters are in the *working image's* frame: ``common.geometry.project_to_image``
with ``frame_size = image_size`` puts the mesh on the stored image. A photo that cannot be fitted
gives a typed failure (:class:`FitResult` with ``reason``), never an exception.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.config import FitConfig
from common.facemodel import FaceModel
from common.faces.refine import RefineConfig
from common.geometry import N_PARAMS, params_to_euler, project_to_image, split_params
from common.imageio import resize_image


@dataclass(frozen=True, eq=False)
class FitResult:
    """image: (S, S, 3) uint8 working crop (or None on failure); params: (62,) float32 in its frame;
    pose: (3,) yaw/pitch/roll degrees; verts_px: (V, 3) float32 mesh in working pixels;
    box: (4,) the face box in the working image; reason: None or a failure name."""

    image: np.ndarray | None
    params: np.ndarray | None = None
    pose: np.ndarray | None = None
    verts_px: np.ndarray | None = None
    box: np.ndarray | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def crop_params_to_image(params: np.ndarray, roi_boxes: np.ndarray, frame_size: float, size: int = 120) -> np.ndarray:
    """Re-express 3DDFA parameters of ROI crops in the photo's own frame.

    params: (N, 62) regressed on ROI crops ``[sx, sy, ex, ey]`` (N, 4) of side ``size``; frame_size: the
    photo's height S. Returns (N, 62) float32 whose pose ``[s'R | t']`` satisfies
    ``project_to_image(V, pose', S) == common.faces.tddfa.params_to_image_vertices(params, rois, V)``:
    with ``k = roi / size``, ``s' = k s``, ``t'_x = k t_x + sx - k/2``, ``t'_y = k t_y + S - sy - k (size + 1/2)``,
    ``t'_z = k t_z`` (square ROIs; see the half-pixel note in :mod:`common.faces.tddfa`).
    """
    params = np.asarray(params, np.float64).reshape(-1, N_PARAMS)
    rois = np.asarray(roi_boxes, np.float64).reshape(-1, 4)
    k = ((rois[:, 2] - rois[:, 0]) + (rois[:, 3] - rois[:, 1])) / (2 * size)
    pose, _, _ = split_params(params.copy())
    out = params.copy()
    new = pose * k[:, None, None]
    new[:, 0, 3] += rois[:, 0] - 0.5 * k
    new[:, 1, 3] += frame_size - rois[:, 1] - k * (size + 0.5)
    out[:, :12] = new.reshape(-1, 12)
    return out.astype(np.float32)


def aflw2000_params(pose_para: np.ndarray, shape_para: np.ndarray, exp_para: np.ndarray,
                    image_height: float) -> np.ndarray:
    """AFLW2000-3D / 300W-LP annotation (Zhu et al.) -> the 62 parameters in the photo's own frame.

    pose_para: (7,) ``[pitch, yaw, roll, tx, ty, tz, s]``; shape_para: (199,) BFM shape coefficients;
    exp_para: (29,) expression coefficients; image_height: H. The annotation projects ``s R V + t`` with
    ``R = Rx(pitch) Ry(yaw) Rz(roll)`` in Zhu's (transposed) convention into 1-based pixel centres with y
    up (``y_img = H + 1 - y``); 3DDFA's 40 shape / 10 expression bases are the leading columns of the same
    bases, so ``alpha_id = shape_para[:40]``, ``alpha_exp = exp_para[:10]`` (truncation). Checked in
    ``tests/test_fit.py`` against the official 68 landmarks with the public sparse basis (0.9-1.7 px mean).
    Returns (62,) float32 for :func:`common.geometry.project_to_image` with ``frame_size = H``.
    """
    pitch, yaw, roll, tx, ty, tz, scale = np.asarray(pose_para, np.float64).reshape(7)

    def rx(a):
        return np.array([[1, 0, 0], [0, np.cos(a), np.sin(a)], [0, -np.sin(a), np.cos(a)]])

    def ry(a):
        return np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])

    def rz(a):
        return np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]])

    rot = rx(pitch) @ ry(yaw) @ rz(roll)
    # 1-based centres -> pixel edges: x = X - 0.5, y = (H + 1 - Y) - 0.5 = H - (Y - 0.5)
    pose = np.concatenate([scale * rot, np.array([[tx - 0.5], [ty - 0.5], [tz]])], 1)
    out = np.zeros(N_PARAMS, np.float32)
    out[:12] = pose.reshape(12)
    out[12:52] = np.asarray(shape_para, np.float64).reshape(-1)[:40]
    out[52:62] = np.asarray(exp_para, np.float64).reshape(-1)[:10]
    return out


def reframe_params(params: np.ndarray, frame_size: float, origin: np.ndarray, side: float,
                   size: int) -> np.ndarray:
    """Parameters of a photo (frame ``frame_size`` = its height) -> those of its square crop resized to ``size``.

    params: (N, 62); the crop is the square of ``side`` photo pixels whose top-left corner is ``origin`` (x, y).
    With ``k = size / side``: ``x' = k (x - x0)``, ``y' = k (y - y0)``, depth scaled by k.
    """
    params = np.asarray(params, np.float64).reshape(-1, N_PARAMS).copy()
    k = size / side
    pose = params[:, :12].reshape(-1, 3, 4) * k
    pose[:, 0, 3] -= k * origin[0]
    pose[:, 1, 3] += size - k * frame_size + k * origin[1]
    params[:, :12] = pose.reshape(-1, 12)
    return params.astype(np.float32)


def mesh_in_image(model: FaceModel, params: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 62) image-frame parameters -> (N, V, 3) float32 mesh in the working image's pixels."""
    pose, a_id, a_exp = split_params(np.asarray(params, np.float32))
    return project_to_image(model.shape(a_id[:, :model.n_id], a_exp[:, :model.n_exp]), pose, float(image_size))


def _square_crop(image: np.ndarray, centre: np.ndarray, side: float, size: int) -> np.ndarray:
    """Cut the square of ``side`` photo pixels around ``centre`` (x, y) and resize it to (size, size)."""
    a = side / size
    x0, y0 = centre[0] - side / 2, centre[1] - side / 2
    m = np.array([[a, 0, x0 + 0.5 * a - 0.5], [0, a, y0 + 0.5 * a - 0.5]])
    if a > 1:  # area-average for downscaling: warpAffine has no INTER_AREA, so pre-shrink the photo
        small = cv2.resize(image, None, fx=1 / a, fy=1 / a, interpolation=cv2.INTER_AREA)
        m = np.array([[1.0, 0, x0 / a], [0, 1.0, y0 / a]])
        return cv2.warpAffine(small, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def describe_fit(fit: FitConfig | dict) -> str:
    """One line saying which fitter, weights and passes a build ran (a :class:`FitConfig` or its stored dict)."""
    d = dataclasses.asdict(fit) if isinstance(fit, FitConfig) else dict(fit)
    if d.get("fitter") != "tddfa":
        return "given (parameters supplied by the source)"
    name = lambda p: Path(str(p)).name if p else "-"  # noqa: E731
    passes = "2 passes (box ROI, then landmark ROI)" if d.get("second_pass") else "1 pass (box ROI)"
    r = d.get("refine")
    if isinstance(r, RefineConfig):
        r = dataclasses.asdict(r)
    refine = (f", refined on {name(d.get('refine_landmarks'))} landmarks ({r.get('prior')} prior, contour weight "
              f"{r.get('contour_weight')})" if r else "")
    return (f"tddfa: 3DDFA_V2 {name(d.get('tddfa_weights'))}, detector {name(d.get('detector_weights'))}, "
            f"{passes}{refine}")


def frame_face(image: np.ndarray, detector, size: int, context: float = 1.25,
               min_face_px: float = 24.0) -> FitResult:
    """The working crop of a photo, framed as ``uvprep build`` frames faces for the ``tddfa`` fitter.

    image: (H, W, 3) uint8 RGB. detector: anything with ``detect(image, select="largest") -> Detection``
    (:class:`common.faces.detect.FaceBoxesDetector`, :class:`~common.faces.detect.HaarDetector`), or None for a
    pre-aligned portrait (FFHQ / CelebA-HQ: the photo resized, :class:`~common.faces.detect.AlignedCrop`'s box).
    The crop is the square of ``context`` x 3DDFA_V2's ROI around the largest detection, resized to ``size``.
    Returns a :class:`FitResult` with ``image`` (size, size, 3) and ``box`` (4,) the face box in it (no
    parameters), or with ``reason="no_face"``.
    """
    from common.faces.detect import AlignedCrop
    from common.faces.tddfa import roi_from_bbox

    if detector is None:
        work = resize_image(image, size)
        return FitResult(work, box=AlignedCrop().detect(work).boxes[0, :4].astype(np.float32))
    det = detector.detect(image, select="largest")
    if not det.found:
        return FitResult(None, reason="no_face")
    b = det.boxes[0, :4].astype(np.float64)
    if min(b[2] - b[0], b[3] - b[1]) < min_face_px:
        return FitResult(None, reason="no_face")
    roi = roi_from_bbox(b[None])[0].astype(np.float64)
    side = (roi[2] - roi[0]) * context
    centre = (roi[:2] + roi[2:]) / 2
    scale, origin = size / side, centre - side / 2
    box = np.concatenate([(b[:2] - origin) * scale, (b[2:] - origin) * scale]).astype(np.float32)
    return FitResult(_square_crop(image, centre, side, size), box=box)


class ShapeFitter:
    """Per-worker fitter: holds the face model and, for ``tddfa``, the networks (built lazily, once)."""

    def __init__(self, model: FaceModel, config: FitConfig):
        self.model = model
        self.config = config
        self._detector = None
        self._regressor = None
        self._landmarker = None
        if config.fitter == "tddfa":
            missing = [n for n in ("tddfa_weights", "param_stats") if getattr(config, n) is None]
            if missing:
                raise ValueError(f"fitter 'tddfa' needs {missing}: the 3DDFA_V2 regressor weights and parameter "
                                 f"statistics (see docs/real-photos.md)")
            if config.refine is not None and (config.landmarks_dir is None or config.refine_landmarks is None):
                raise ValueError("refine needs the 68-landmark bases (landmarks_dir: 3DDFA's c++/weights) and "
                                 "refine_landmarks (dlib's shape_predictor_68_face_landmarks.dat)")
            if model.n_id < 40 or model.n_exp < 10:
                raise ValueError(f"fitter 'tddfa' predicts 40 identity + 10 expression BFM coefficients; face model "
                                 f"{model.name!r} has {model.n_id} + {model.n_exp}: use a 3DDFA BFM model")
        elif config.fitter != "given":
            raise ValueError(f"unknown fitter {config.fitter!r}; expected 'given' or 'tddfa'")

    # ------------------------------------------------------------------ networks (lazy)
    def _nets(self, need_detector: bool):
        from common.faces.detect import FaceBoxesDetector
        from common.faces.tddfa import TDDFARegressor

        cfg = self.config
        if self._regressor is None:
            self._regressor = TDDFARegressor.from_paths(cfg.tddfa_weights, cfg.param_stats, cfg.landmarks_dir,
                                                        second_pass=cfg.second_pass, device=cfg.device)
        if need_detector and self._detector is None:
            if cfg.detector_weights is None:
                raise ValueError("in-the-wild photos need a face detector: pass --detector-weights "
                                 "(FaceBoxesProd.pth), or use an aligned source (ffhq, celeba-hq)")
            self._detector = FaceBoxesDetector.from_path(cfg.detector_weights, device=cfg.device)
        return self._detector, self._regressor

    # ------------------------------------------------------------------------- fitting
    def fit_given(self, image: np.ndarray, params: np.ndarray) -> FitResult:
        """Known parameters in the photo's own frame (synthetic truth, AFLW2000 annotations, user files).

        A photo at the working size is used as is; any other photo is cropped to a square around the
        projected face (``context`` x 1.58 x the mesh's bounding box, like 3DDFA's ROI rule), resized to the
        working size, and the parameters are re-expressed in the crop's frame.
        """
        s = self.config.image_size
        params = np.asarray(params, np.float32).reshape(1, N_PARAMS)
        h, w = image.shape[:2]
        if (h, w) == (s, s):
            return self._finish(image, params, box=np.array([0, 0, s, s], np.float32))
        if not np.isfinite(params).all():
            return FitResult(None, reason="nan")
        xy = mesh_in_image(self.model, params, h)[0, :, :2].astype(np.float64)
        lo, hi = xy.min(0), xy.max(0)
        side = 1.58 * self.config.context * float((hi - lo).max())
        if not np.isfinite(side) or side < self.config.min_face_px:
            return FitResult(None, reason="fit_diverged")
        origin = (lo + hi) / 2 - side / 2
        work = _square_crop(image, origin + side / 2, side, s)
        box = np.concatenate([(lo - origin), (hi - origin)]) * (s / side)
        return self._finish(work, reframe_params(params, h, origin, side, s), box=box.astype(np.float32))

    def fit_photo(self, image: np.ndarray, aligned: bool) -> FitResult:
        """``tddfa`` on a photo (H, W, 3) uint8 RGB: aligned sources use a fixed box, others the detector."""
        detector, regressor = self._nets(need_detector=not aligned)
        framed = frame_face(image, None if aligned else detector, self.config.image_size, self.config.context,
                            self.config.min_face_px)
        if not framed.ok:
            return framed
        return self.fit_framed(framed.image, framed.box)

    def fit_framed(self, work: np.ndarray, box: np.ndarray) -> FitResult:
        """``tddfa`` on a working crop (S, S, 3) uint8 from :func:`frame_face` and its (4,) face box."""
        _, regressor = self._nets(need_detector=False)
        fit = regressor.predict(work, np.asarray(box, np.float32)[None])
        params = crop_params_to_image(fit.params, fit.roi_boxes, float(self.config.image_size))
        if self.config.refine is not None and np.isfinite(params).all():
            params = self._refine(work, params, regressor)
        return self._finish(work, params, np.asarray(box, np.float32))

    def _refine(self, work: np.ndarray, params: np.ndarray, regressor) -> np.ndarray:
        """(1, 62) working-frame parameters -> refined against dlib's 68 landmarks on the working crop."""
        from common.faces.dlib68 import Dlib68Predictor, dlib_box_from_landmarks
        from common.faces.refine import refine_to_landmarks

        if self._landmarker is None:
            self._landmarker = Dlib68Predictor.from_path(self.config.refine_landmarks)
        s = float(self.config.image_size)
        lm = regressor.landmark_model
        pose, a_id, a_exp = split_params(params)
        start = project_to_image(lm.shape(a_id, a_exp), pose, s)
        targets = self._landmarker.predict(work, dlib_box_from_landmarks(start))
        return refine_to_landmarks(params, targets, lm, s, regressor.param_mean, regressor.param_std,
                                   self.config.refine).params

    def _finish(self, image: np.ndarray, params: np.ndarray, box: np.ndarray) -> FitResult:
        s = self.config.image_size
        if not np.isfinite(params).all():
            return FitResult(image, reason="nan")
        verts = mesh_in_image(self.model, params, s)[0]
        inside = ((verts[:, 0] >= 0) & (verts[:, 0] < s) & (verts[:, 1] >= 0) & (verts[:, 1] < s)).mean()
        if not np.isfinite(verts).all() or inside < 1.0 - self.config.max_outside:
            return FitResult(image, params=params[0], reason="fit_diverged")
        pose = params_to_euler(params)[0].astype(np.float32)
        return FitResult(image, params=params[0], pose=pose, verts_px=verts.astype(np.float32), box=box)


def read_given_params(path: str | Path) -> dict[str, np.ndarray]:
    """Known 62 parameters per image key from a ``.npz`` (``keys``, ``params``) or ``.csv`` (``key,p0..p61``).

    The parameters put the mesh on the photo as stored: ``common.geometry.project_to_image(V, pose, H)`` with
    H the photo's height (x right, y down, pixel j covering [j, j+1)). Raises ValueError naming the problem.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "keys" not in z or "params" not in z:
                raise ValueError(f"{path}: expected arrays 'keys' (N,) and 'params' (N, 62), found {sorted(z.files)}")
            keys, params = [str(k) for k in z["keys"]], np.asarray(z["params"], np.float32)
    elif path.suffix.lower() == ".csv":
        rows = np.genfromtxt(path, delimiter=",", dtype=str, comments=None)
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.shape[0] and not _is_number(rows[0, 1]):
            rows = rows[1:]  # header
        keys, params = list(rows[:, 0]), rows[:, 1:].astype(np.float32)
    else:
        raise ValueError(f"{path}: parameter files are .npz or .csv")
    if params.ndim != 2 or params.shape[1] != 62 or len(keys) != len(params):
        raise ValueError(f"{path}: expected one row of 62 parameters per key, found {params.shape} for "
                         f"{len(keys)} keys")
    return dict(zip(keys, params, strict=True))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
