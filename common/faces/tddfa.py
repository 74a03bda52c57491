"""3DDFA_V2 regressor (Guo et al., ECCV 2020): a face box -> the 62 3DMM parameters, and the 68 landmarks.

Parameters follow :mod:`common.geometry` (``[P (3x4 row-major), alpha_id (40), alpha_exp (10)]``), as the
network outputs them after de-normalisation ``param * std + mean``; ``P`` projects BFM model space into a
y-up frame of ``size`` (120) pixels: the network's input crop of the ROI box.

Pixel conventions. The 3DDFA frame uses MATLAB's: ``X = P [v; 1]`` is in 1-based pixel-*centre*
coordinates of the crop with y up, which is why 3DDFA_V2's ``similar_transform`` does ``x -= 1``,
``y = size - y`` (0-based centres, y down) before scaling by ``roi / size`` and adding the ROI origin.
This project uses pixel-*edge* coordinates (pixel ``j`` covers ``[j, j + 1)``, centre ``j + 0.5``), and
the crop maps edges exactly (``image = roi_origin + crop * roi_size / size``, which is what an
``INTER_LINEAR`` resize / warp does), so here

    x = sx + (X_x - 0.5) * (ex - sx) / size,     y = sy + (size - X_y + 0.5) * (ey - sy) / size,

i.e. the pose translation is shifted by ``-0.5`` in x and y (:func:`crop_frame_pose`) and then
:func:`common.geometry.project_to_image` with ``frame_size=size`` gives crop pixels. Compared with
3DDFA_V2's output (0-based centres) plus 0.5, this differs by ``0.5 (roi / size - 1)`` pixels, because
3DDFA_V2 scales centre rather than edge coordinates (well under a pixel for typical faces). Depth is
``z = X_z * roi / size`` (larger is nearer the camera; 3DDFA_V2 also subtracts its minimum, we do not).

The network sees the ROI crop in **BGR** order (3DDFA_V2 feeds ``cv2.imread`` images unchanged), scaled
to ``(x - 127.5) / 128``; :class:`TDDFARegressor` takes RGB photos and flips them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import nn

from common import loaders
from common.faces.assets import TDDFA_URL
from common.faces.detect import check_rgb_image
from common.geometry import N_PARAMS, params_to_euler, project_to_image, split_params

TDDFA_V1_URL = "https://github.com/cleardusk/3DDFA (c++/weights/)"


# --------------------------------------------------------------------------------------------- network
class _DepthWiseBlock(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU (names as 3DDFA_V2's checkpoints)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.conv_sep = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_dw(self.conv_dw(x)))
        return self.relu(self.bn_sep(self.conv_sep(x)))


class MobileNetV1(nn.Module):
    """3DDFA_V2's MobileNetV1 backbone with the 62-parameter head ``fc_param`` (and the unused ``fc_lm``).

    forward: (B, 3, size, size) float32 BGR in ``(x - 127.5) / 128`` -> (B, 62) normalised parameters.
    """

    _PLAN = (  # name, input channels, output channels (x widen), stride
        ("dw2_1", 32, 64, 1), ("dw2_2", 64, 128, 2), ("dw3_1", 128, 128, 1), ("dw3_2", 128, 256, 2),
        ("dw4_1", 256, 256, 1), ("dw4_2", 256, 512, 2), ("dw5_1", 512, 512, 1), ("dw5_2", 512, 512, 1),
        ("dw5_3", 512, 512, 1), ("dw5_4", 512, 512, 1), ("dw5_5", 512, 512, 1), ("dw5_6", 512, 1024, 2),
        ("dw6", 1024, 1024, 1),
    )

    def __init__(self, widen: float = 1.0, num_params: int = N_PARAMS, num_landmarks: int = 68):
        super().__init__()
        c = lambda n: int(n * widen)  # noqa: E731
        self.conv1 = nn.Conv2d(3, c(32), 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.relu = nn.ReLU(inplace=True)
        for name, cin, cout, stride in self._PLAN:
            self.add_module(name, _DepthWiseBlock(c(cin), c(cout), stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc_param = nn.Linear(c(1024), num_params)
        self.fc_lm = nn.Linear(c(1024), 2 * num_landmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name, *_ in self._PLAN:
            x = getattr(self, name)(x)
        return self.fc_param(self.avgpool(x).flatten(1))


def load_tddfa_checkpoint(path: str | Path, widen: float | None = None) -> MobileNetV1:
    """Build a :class:`MobileNetV1` from a 3DDFA_V2 checkpoint (``{'state_dict': {'module.…': …}}``).

    widen: 1.0 or 0.5; None reads it from ``conv1``. Every backbone and ``fc_param`` tensor must load;
    only the unused landmark head ``fc_lm`` may be absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DDFA_V2 weights not found at {path}; download mb1_120x120.pth or "
                                f"mb05_120x120.pth from {TDDFA_URL} and pass its path")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "conv1.weight" not in state:
        raise ValueError(f"{path} is not a 3DDFA_V2 MobileNet checkpoint (no conv1.weight)")
    found = state["conv1.weight"].shape[0] / 32
    if widen is None:
        widen = found
    elif abs(widen - found) > 1e-6:
        raise ValueError(f"{path} holds a MobileNet of widen {found}, the config asks for widen {widen}")
    net = MobileNetV1(widen=widen)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc_lm.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match MobileNetV1(widen={widen}): missing {missing}, "
                         f"unexpected {unexpected}")
    return net.eval()


def load_param_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """3DDFA_V2's ``param_mean_std_62d_120x120.pkl`` -> mean (62,), std (62,) float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter statistics not found at {path}; download "
                                f"configs/param_mean_std_62d_120x120.pkl from {TDDFA_URL}")
    return loaders.load_param_stats(path)


# ----------------------------------------------------------------------------------------- ROI boxes
def roi_from_bbox(boxes: np.ndarray) -> np.ndarray:
    """3DDFA_V2's ``parse_roi_box_from_bbox``: face boxes (N, 4+) -> square ROI boxes (N, 4) float32.

    Side ``int(1.58 s)`` with ``s`` the mean of the box width and height, centred on the box centre
    moved down by ``0.14 s`` (detector boxes sit high on the face).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, np.shape(boxes)[-1])[:, :4]
    old = (b[:, 2] - b[:, 0] + b[:, 3] - b[:, 1]) / 2
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2 + 0.14 * old
    side = np.floor(old * 1.58)
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1).astype(np.float32)


def roi_from_landmarks(points: np.ndarray) -> np.ndarray:
    """3DDFA_V2's ``parse_roi_box_from_landmark``: points (N, K, 2+) -> square ROI boxes (N, 4) float32.

    The square around the points' bounding box (side ``d`` = its larger side), grown to side ``sqrt(2) d``
    about the same centre.
    """
    p = np.asarray(points, np.float64)[..., :2]
    lo, hi = p.min(1), p.max(1)
    centre = (lo + hi) / 2
    side = np.sqrt(2.0) * (hi - lo).max(1)
    return np.concatenate([centre - side[:, None] / 2, centre + side[:, None] / 2], 1).astype(np.float32)


def crop_rois(image_rgb: np.ndarray, roi_boxes: np.ndarray, size: int = 120) -> np.ndarray:
    """Cut ROI boxes out of a photo and resize them: (H, W, 3) uint8, (N, 4) -> (N, size, size, 3) uint8.

    Bilinear, zero outside the photo. Crop edge coordinate ``c`` maps to ``roi_origin + c * roi / size``
    exactly (no rounding of the ROI box, unlike 3DDFA_V2's ``crop_img``).
    """
    rois = np.asarray(roi_boxes, np.float64).reshape(-1, 4)
    out = np.zeros((len(rois), size, size, 3), np.uint8)
    for k, (sx, sy, ex, ey) in enumerate(rois):
        ax, ay = (ex - sx) / size, (ey - sy) / size
        # dst centre u -> src centre: sx + (u + 0.5) ax - 0.5
        m = np.array([[ax, 0, sx + 0.5 * ax - 0.5], [0, ay, sy + 0.5 * ay - 0.5]])
        out[k] = cv2.warpAffine(image_rgb, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


# ---------------------------------------------------------------------------------- frame -> photo
def crop_frame_pose(params: np.ndarray) -> np.ndarray:
    """(N, 62) 3DDFA parameters -> poses (N, 3, 4) for :func:`common.geometry.project_to_image`.

    With ``frame_size = size`` the projection then lands in the crop's pixel-edge coordinates (the
    1-based-centre frame of 3DDFA shifted by half a pixel; see the module docstring).
    """
    pose, _, _ = split_params(np.asarray(params, np.float32))
    pose = pose.copy()
    pose[:, 0, 3] -= 0.5
    pose[:, 1, 3] -= 0.5
    return pose


def crop_to_image(points: np.ndarray, roi_boxes: np.ndarray, size: int = 120) -> np.ndarray:
    """Crop pixels (N, V, 2 or 3) of the ROI crops -> photo pixels; z is scaled by the mean ROI scale."""
    rois = np.asarray(roi_boxes, np.float32).reshape(-1, 4)
    sx, sy, ex, ey = (rois[:, i, None] for i in range(4))
    ax, ay = (ex - sx) / size, (ey - sy) / size
    out = np.array(points, np.float32, copy=True)
    out[..., 0] = sx + out[..., 0] * ax
    out[..., 1] = sy + out[..., 1] * ay
    if out.shape[-1] > 2:
        out[..., 2] *= (ax + ay) / 2
    return out


def params_to_image_vertices(params: np.ndarray, roi_boxes: np.ndarray, vertices_model, size: int = 120):
    """3DDFA_V2's ``recon_vers`` + ``similar_transform`` in this project's pixel convention.

    params: (N, 62); roi_boxes: (N, 4) ``[sx, sy, ex, ey]`` the crops the parameters were regressed on;
    vertices_model: model-space vertices (N, V, 3) already deformed, or any face model with
    ``shape(alpha_id, alpha_exp) -> (N, V, 3)`` in BFM units (:class:`SparseLandmarkModel`,
    :class:`common.facemodel.FaceModel` of the 3DDFA BFM). Returns (N, V, 3) float32: x, y photo pixels
    (edge convention), z depth in photo pixels, larger nearer the camera.
    """
    params = np.asarray(params, np.float32).reshape(-1, N_PARAMS)
    if hasattr(vertices_model, "shape") and callable(vertices_model.shape):
        _, alpha_id, alpha_exp = split_params(params)
        verts = vertices_model.shape(alpha_id, alpha_exp)
    else:
        verts = vertices_model
    verts = np.asarray(verts, np.float32)
    if verts.ndim != 3 or verts.shape[0] != len(params) or verts.shape[2] != 3:
        raise ValueError(f"expected model-space vertices ({len(params)}, V, 3), found {verts.shape}")
    crop = project_to_image(verts, crop_frame_pose(params), float(size))
    return crop_to_image(crop, roi_boxes, size)


def pose_from_params(params: np.ndarray) -> np.ndarray:
    """(N, 62) -> (N, 3) yaw, pitch, roll in degrees (3DDFA_V2's ``matrix2angle``, see common.geometry)."""
    return params_to_euler(np.asarray(params, np.float64).reshape(-1, N_PARAMS))


# ------------------------------------------------------------------------------------------ landmarks
@dataclass(frozen=True, eq=False)
class SparseLandmarkModel:
    """The BFM restricted to the 68 iBUG landmarks, for the same 62 parameters (3DDFA's c++ bases).

    mean: (68, 3), id_basis: (68, 3, 40), exp_basis: (68, 3, 10), float32, BFM units.
    """

    mean: np.ndarray
    id_basis: np.ndarray
    exp_basis: np.ndarray

    @classmethod
    def from_dir(cls, path: str | Path) -> SparseLandmarkModel:
        """Load ``u_base.txt`` (204), ``w_shp_base.txt`` (204x40), ``w_exp_base.txt`` (204x10).

        Rows are x, y, z interleaved per landmark (x0, y0, z0, x1, ...).
        """
        path = Path(path)
        files = [path / f for f in ("u_base.txt", "w_shp_base.txt", "w_exp_base.txt")]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"sparse landmark bases not found: {', '.join(absent)}; they are "
                                    f"3DDFA's c++/weights/*.txt ({TDDFA_V1_URL})")
        u, w_id, w_exp = (np.loadtxt(f, dtype=np.float32, ndmin=2) for f in files)
        u = u.reshape(-1)
        if u.shape != (204,) or w_id.shape != (204, 40) or w_exp.shape != (204, 10):
            raise ValueError(f"{path}: expected bases of 204, 204x40, 204x10 values, found "
                             f"{u.shape}, {w_id.shape}, {w_exp.shape}")
        return cls(mean=u.reshape(68, 3), id_basis=w_id.reshape(68, 3, 40),
                   exp_basis=w_exp.reshape(68, 3, 10))

    def shape(self, alpha_id: np.ndarray, alpha_exp: np.ndarray) -> np.ndarray:
        """alpha_id (N, 40), alpha_exp (N, 10) -> model-space landmarks (N, 68, 3)."""
        return (self.mean
                + np.einsum("vck,nk->nvc", self.id_basis, np.asarray(alpha_id, np.float32))
                + np.einsum("vck,nk->nvc", self.exp_basis, np.asarray(alpha_exp, np.float32)))

    def landmarks(self, params: np.ndarray, roi_boxes: np.ndarray, size: int = 120) -> np.ndarray:
        """(N, 62) parameters, their (N, 4) ROI boxes -> (N, 68, 3) photo-pixel landmarks (x, y, depth)."""
        return params_to_image_vertices(params, roi_boxes, self, size)


# ------------------------------------------------------------------------------------------ regressor
@dataclass(frozen=True)
class TDDFAConfig:
    """3DDFA_V2 regressor settings."""

    weights: Path
    """mb1_120x120.pth or mb05_120x120.pth (3DDFA_V2 ``weights/``)."""
    param_stats: Path
    """param_mean_std_62d_120x120.pkl (3DDFA_V2 ``configs/``)."""
    widen: float | None = None
    """MobileNet width (1.0 or 0.5); None reads it from the checkpoint."""
    size: int = 120
    """Side of the network's input crop."""
    second_pass: bool = False
    """Re-crop from the first fit's 68 landmarks and regress again (3DDFA_V2's ``crop_policy='landmark'``)."""
    landmarks_dir: Path | None = None
    """Folder with 3DDFA's u_base / w_shp_base / w_exp_base .txt; needed for ``second_pass``."""
    batch_size: int = 64
    """Faces per forward pass."""
    device: str = "cpu"
    """Torch device."""


class TDDFAFit(NamedTuple):
    """params (N, 62) float32 de-normalised; roi_boxes (N, 4) float32 the crops they were regressed on."""

    params: np.ndarray
    roi_boxes: np.ndarray


@dataclass(eq=False)
class TDDFARegressor:
    """Photo + face boxes -> 3DDFA_V2 parameters. Build it with :meth:`from_paths` or :meth:`from_config`."""

    config: TDDFAConfig
    net: MobileNetV1 = field(repr=False)
    param_mean: np.ndarray = field(repr=False)
    param_std: np.ndarray = field(repr=False)
    landmark_model: SparseLandmarkModel | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: TDDFAConfig) -> TDDFARegressor:
        net = load_tddfa_checkpoint(config.weights, config.widen).to(config.device)
        mean, std = load_param_stats(config.param_stats)
        lm = SparseLandmarkModel.from_dir(config.landmarks_dir) if config.landmarks_dir is not None else None
        if config.second_pass and lm is None:
            raise ValueError("second_pass needs the 68-landmark bases: set landmarks_dir to "
                             "3DDFA's c++/weights")
        return cls(config=config, net=net, param_mean=mean, param_std=std, landmark_model=lm)

    @classmethod
    def from_paths(cls, weights: str | Path, param_stats: str | Path, landmarks_dir: str | Path | None = None,
                   **overrides) -> TDDFARegressor:
        """Keyword arguments override :class:`TDDFAConfig` fields (widen, second_pass, device, ...)."""
        lm_dir = None if landmarks_dir is None else Path(landmarks_dir)
        return cls.from_config(TDDFAConfig(weights=Path(weights), param_stats=Path(param_stats),
                                           landmarks_dir=lm_dir, **overrides))

    @torch.inference_mode()
    def regress_crops(self, crops_rgb: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) uint8 RGB crops -> (N, 62) float32 de-normalised parameters."""
        crops_rgb = np.asarray(crops_rgb)
        s = self.config.size
        if crops_rgb.ndim != 4 or crops_rgb.shape[1:] != (s, s, 3) or crops_rgb.dtype != np.uint8:
            raise ValueError(f"expected crops (N, {s}, {s}, 3) uint8, "
                             f"found {crops_rgb.dtype} {crops_rgb.shape}")
        out = []
        for i in range(0, len(crops_rgb), self.config.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops_rgb[i:i + self.config.batch_size, :, :, ::-1]))
            x = (x.to(self.config.device).permute(0, 3, 1, 2).float() - 127.5) / 128.0
            out.append(self.net(x).float().cpu().numpy())
        norm = np.concatenate(out) if out else np.zeros((0, N_PARAMS), np.float32)
        return (norm * self.param_std + self.param_mean).astype(np.float32)

    def predict_rois(self, image_rgb: np.ndarray, roi_boxes: np.ndarray) -> np.ndarray:
        """Regress on given ROI boxes: (H, W, 3) uint8 RGB, (N, 4) -> (N, 62) float32."""
        check_rgb_image(image_rgb)
        return self.regress_crops(crop_rois(image_rgb, roi_boxes, self.config.size))

    def predict(self, image_rgb: np.ndarray, boxes: np.ndarray) -> TDDFAFit:
        """Photo (H, W, 3) uint8 RGB and face boxes (N, 4+) ``[x1, y1, x2, y2, ...]`` -> :class:`TDDFAFit`.

        The ROI is 3DDFA_V2's box rule (:func:`roi_from_bbox`); with ``second_pass`` it is then the
        landmark rule (:func:`roi_from_landmarks`) on the first fit's 68 landmarks.
        """
        boxes = np.asarray(boxes, np.float32)
        if boxes.ndim != 2 or boxes.shape[1] < 4:
            raise ValueError(f"expected boxes (N, 4+), found {boxes.shape}")
        rois = roi_from_bbox(boxes)
        params = self.predict_rois(image_rgb, rois)
        if self.config.second_pass and len(boxes):
            return self.predict_from_landmarks(image_rgb, self.landmarks(params, rois))
        return TDDFAFit(params, rois)

    def predict_from_landmarks(self, image_rgb: np.ndarray, points: np.ndarray) -> TDDFAFit:
        """Regress on the landmark-rule ROI of points (N, K, 2+) in photo pixels -> :class:`TDDFAFit`."""
        rois = roi_from_landmarks(points)
        return TDDFAFit(self.predict_rois(image_rgb, rois), rois)

    def landmarks(self, params: np.ndarray, roi_boxes: np.ndarray) -> np.ndarray:
        """(N, 62), (N, 4) -> (N, 68, 3) photo-pixel landmarks; needs ``landmarks_dir``."""
        if self.landmark_model is None:
            raise ValueError("no landmark bases loaded: set landmarks_dir to 3DDFA's c++/weights")
        return self.landmark_model.landmarks(params, roi_boxes, self.config.size)
