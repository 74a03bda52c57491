"""Face detection: FaceBoxes (as shipped with 3DDFA_V2), a fixed box for pre-aligned photos, a Haar fallback.

All boxes are in image pixels of the *input* photo with the project convention (x right, y down,
pixel ``j`` covers ``[j, j + 1)``), as ``[x1, y1, x2, y2, score]``. FaceBoxes' prior boxes are laid out
in that same edge convention (a cell of stride ``s`` at column ``j`` has its centre at ``(j + 0.5) s``),
so its decoded boxes need no half-pixel shift.

FaceBoxes (Zhang et al., IJCB 2017) as used by 3DDFA_V2:

* input: BGR float32 minus the per-channel mean ``(104, 117, 123)``, no scaling by 255;
* large photos are shrunk first so that ``H <= 720`` and ``W <= 1080`` (3DDFA_V2's ``scale_flag`` rule:
  ``s = min(1, 720 / H)``, then ``s *= 1080 / (s W)`` if ``s W > 1080``), boxes are mapped back;
* prior boxes on three levels (strides 32, 64, 128; sizes {32 (4x4 dense), 64 (2x2 dense), 128}, 256, 512),
  decoded with the SSD variances ``(0.1, 0.2)``;
* scores above ``pre_nms_threshold`` (0.05), the ``top_k`` (5000) best, greedy NMS at IoU 0.3,
  the ``keep_top_k`` (750) best, and finally the boxes scoring above ``score_threshold`` (0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FACEBOXES_URL = "https://github.com/cleardusk/3DDFA_V2/raw/master/FaceBoxes/weights/FaceBoxesProd.pth"
BGR_MEAN = (104.0, 117.0, 123.0)
"""Per-channel mean subtracted from the BGR input (0..255) of FaceBoxes."""
STEPS = (32, 64, 128)
MIN_SIZES = ((32, 64, 128), (256,), (512,))
VARIANCES = (0.1, 0.2)

Select = Literal["all", "largest"]


# --------------------------------------------------------------------------------------------- network
class _ConvBN(nn.Module):
    """conv (no bias) -> BN -> ReLU; ``crelu`` concatenates ``[x, -x]`` before the ReLU (CReLU)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 crelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)
        self.crelu = crelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if self.crelu:
            x = torch.cat([x, -x], 1)
        return F.relu(x)


class _Inception(nn.Module):
    """FaceBoxes' 128 -> 128 inception block: four 32-channel branches."""

    def __init__(self):
        super().__init__()
        self.branch1x1 = _ConvBN(128, 32, 1)
        self.branch1x1_2 = _ConvBN(128, 32, 1)
        self.branch3x3_reduce = _ConvBN(128, 24, 1)
        self.branch3x3 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_reduce_2 = _ConvBN(128, 24, 1)
        self.branch3x3_2 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_3 = _ConvBN(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch1x1_2(pooled),
            self.branch3x3(self.branch3x3_reduce(x)),
            self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x))),
        ], 1)


class FaceBoxesNet(nn.Module):
    """FaceBoxes network; parameter names match ``FaceBoxesProd.pth`` (``load_state_dict(strict=True)``).

    forward: (B, 3, H, W) float32 mean-subtracted BGR -> loc (B, P, 4), face probability (B, P)
    with ``P`` the number of prior boxes of :func:`prior_boxes` for ``(H, W)``.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = _ConvBN(3, 24, 7, stride=4, padding=3, crelu=True)
        self.conv2 = _ConvBN(48, 64, 5, stride=2, padding=2, crelu=True)
        self.inception1 = _Inception()
        self.inception2 = _Inception()
        self.inception3 = _Inception()
        self.conv3_1 = _ConvBN(128, 128, 1)
        self.conv3_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        self.conv4_1 = _ConvBN(256, 128, 1)
        self.conv4_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        n_anchors = [sum(16 if m == 32 else 4 if m == 64 else 1 for m in sizes) for sizes in MIN_SIZES]
        chans = (128, 256, 256)
        heads = list(zip(chans, n_anchors, strict=True))
        self.loc = nn.Sequential(*[nn.Conv2d(c, a * 4, 3, padding=1) for c, a in heads])
        self.conf = nn.Sequential(*[nn.Conv2d(c, a * 2, 3, padding=1) for c, a in heads])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), 3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), 3, stride=2, padding=1)
        x = self.inception3(self.inception2(self.inception1(x)))
        sources = [x]
        x = self.conv3_2(self.conv3_1(x))
        sources.append(x)
        x = self.conv4_2(self.conv4_1(x))
        sources.append(x)
        b = x.shape[0]
        pairs = list(zip(sources, self.loc, self.conf, strict=True))
        loc = torch.cat([l(s).permute(0, 2, 3, 1).reshape(b, -1, 4) for s, l, _ in pairs], 1)
        conf = torch.cat([c(s).permute(0, 2, 3, 1).reshape(b, -1, 2) for s, _, c in pairs], 1)
        return loc, conf.softmax(-1)[..., 1]


# ------------------------------------------------------------------------------------ boxes and priors
def prior_boxes(height: int, width: int) -> torch.Tensor:
    """FaceBoxes prior boxes for an input of (height, width) pixels -> (P, 4) ``[cx, cy, w, h]`` in pixels.

    Order matches the network output: level, then row ``i``, column ``j``, then anchor (sizes in
    :data:`MIN_SIZES`; size 32 is densified 4x4 and size 64 2x2 within the cell, ``cy`` outer, ``cx`` inner).
    """
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        fh, fw = -(-height // step), -(-width // step)
        offsets = []  # (A, 3): dx, dy in cells, size in pixels
        for m in sizes:
            n = 4 if m == 32 else 2 if m == 64 else 1
            d = np.arange(n) / n if n > 1 else np.array([0.5])
            dy, dx = np.meshgrid(d, d, indexing="ij")
            offsets.append(np.stack([dx.ravel(), dy.ravel(), np.full(n * n, m)], 1))
        off = np.concatenate(offsets)
        ii, jj = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = (jj[:, :, None] + off[None, None, :, 0]) * step
        cy = (ii[:, :, None] + off[None, None, :, 1]) * step
        size = np.broadcast_to(off[:, 2], cx.shape)
        out.append(np.stack([cx, cy, size, size], -1).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out).astype(np.float32))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """SSD box decoding: loc (P, 4) offsets, priors (P, 4) ``[cx, cy, w, h]`` -> (P, 4) ``[x1, y1, x2, y2]``.
    """
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (A, 4) and b (B, 4) ``[x1, y1, x2, y2]`` -> (A, B)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression -> indices of the kept boxes (K,), by decreasing score.

    boxes (N, 4) ``[x1, y1, x2, y2]``, scores (N,). The IoU matrix is computed once (N is at most the
    detector's ``top_k``); the greedy pass is a loop over *kept* boxes only.
    """
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    iou = box_iou(boxes, boxes)
    alive = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        alive &= iou[i] <= iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def resize_scale(height: int, width: int, max_height: int, max_width: int) -> float:
    """3DDFA_V2's FaceBoxes shrink rule: the s <= 1 with ``s H <= max_height``, ``s W <= max_width``."""
    s = min(1.0, max_height / height)
    if width * s > max_width:
        s *= max_width / (width * s)
    return s


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is an (H, W, 3) uint8 array."""
    ok = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    if not ok:
        found = (f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
        raise ValueError(f"expected an RGB image (H, W, 3) uint8, found {found}")


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class Detection:
    """Faces found in one photo.

    boxes: (N, 5) float32 ``[x1, y1, x2, y2, score]`` in input-image pixels, sorted by area (largest
    first); N == 0 means no face (``found`` is False). image_size: (H, W) of the photo.
    """

    boxes: np.ndarray
    image_size: tuple[int, int]
    source: str = "faceboxes"

    @property
    def found(self) -> bool:
        return len(self.boxes) > 0

    def __len__(self) -> int:
        return len(self.boxes)

    def largest(self) -> np.ndarray:
        """(5,) the largest box; raises ValueError when no face was found."""
        if not self.found:
            raise ValueError(f"no face was found in the {self.image_size[1]}x{self.image_size[0]} image")
        return self.boxes[0]


def _finalise(boxes: np.ndarray, image_size: tuple[int, int], select: Select, source: str) -> Detection:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes[np.argsort(-area, kind="stable")]
    if select == "largest":
        boxes = boxes[:1]
    elif select != "all":
        raise ValueError(f"select must be 'all' or 'largest', found {select!r}")
    return Detection(boxes=boxes, image_size=image_size, source=source)


# ------------------------------------------------------------------------------------------- FaceBoxes
@dataclass(frozen=True)
class DetectorConfig:
    """FaceBoxes settings (defaults are 3DDFA_V2's)."""

    weights: Path
    """FaceBoxesProd.pth (from 3DDFA_V2's ``FaceBoxes/weights``); no default on purpose."""
    score_threshold: float = 0.5
    """Final face-probability threshold (3DDFA_V2's ``vis_thres``)."""
    pre_nms_threshold: float = 0.05
    """Candidates below this probability are dropped before NMS (``confidence_threshold``)."""
    nms_iou: float = 0.3
    """IoU above which a lower-scoring box is suppressed."""
    top_k: int = 5000
    """Best candidates kept before NMS."""
    keep_top_k: int = 750
    """Best boxes kept after NMS."""
    max_height: int = 720
    """Photos are shrunk so that their height is at most this before detection."""
    max_width: int = 1080
    """... and their width at most this."""
    device: str = "cpu"
    """Torch device for the network."""


@dataclass(eq=False)
class FaceBoxesDetector:
    """FaceBoxes face detector. Build it with :meth:`from_path` or :meth:`from_config`."""

    config: DetectorConfig
    net: FaceBoxesNet = field(repr=False)

    @classmethod
    def from_config(cls, config: DetectorConfig) -> FaceBoxesDetector:
        path = Path(config.weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"FaceBoxes weights not found at {path}; download FaceBoxesProd.pth from {FACEBOXES_URL} "
                f"(3DDFA_V2, MIT licence) and pass its path")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        net = FaceBoxesNet()
        net.load_state_dict(state, strict=True)
        net.eval().to(config.device)
        return cls(config=config, net=net)

    @classmethod
    def from_path(cls, path: str | Path, **overrides) -> FaceBoxesDetector:
        """Load ``FaceBoxesProd.pth``; keyword arguments override :class:`DetectorConfig` fields."""
        return cls.from_config(DetectorConfig(weights=Path(path), **overrides))

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray, select: Select = "all") -> Detection:
        """Detect faces in an RGB photo (H, W, 3) uint8 -> :class:`Detection` (boxes sorted by area).

        ``select="largest"`` keeps only the largest box. No face gives an empty Detection, not an error.
        """
        check_rgb_image(image_rgb)
        cfg = self.config
        h, w = image_rgb.shape[:2]
        s = resize_scale(h, w, cfg.max_height, cfg.max_width)
        img = image_rgb
        if s < 1.0:
            img = cv2.resize(image_rgb, (int(s * w), int(s * h)), interpolation=cv2.INTER_LINEAR)
        hs, ws = img.shape[:2]
        x = torch.from_numpy(img[:, :, ::-1].astype(np.float32) - np.float32(BGR_MEAN))
        x = x.permute(2, 0, 1)[None].to(cfg.device)
        loc, prob = self.net(x)
        boxes = decode_boxes(loc[0].float().cpu(), prior_boxes(hs, ws))
        boxes = boxes * torch.tensor([w / ws, h / hs, w / ws, h / hs])
        prob = prob[0].float().cpu()
        cand = torch.nonzero(prob > cfg.pre_nms_threshold).squeeze(1)
        cand = cand[prob[cand].argsort(descending=True)[: cfg.top_k]]
        keep = cand[nms(boxes[cand], prob[cand], cfg.nms_iou)][: cfg.keep_top_k]
        keep = keep[prob[keep] > cfg.score_threshold]
        dets = torch.cat([boxes[keep], prob[keep, None]], 1).numpy()
        return _finalise(dets, (h, w), select, "faceboxes")


# -------------------------------------------------------------------------------------- aligned photos
@dataclass(frozen=True)
class AlignedCrop:
    """A fixed face box for photos pre-aligned the FFHQ / CelebA-HQ way; no detector needed.

    Both data sets are cut by the same rule (Karras et al.; ``ffhq-dataset/download_ffhq.py``): with
    ``e`` the eye-to-eye vector and ``m`` the eye-midpoint-to-mouth-midpoint vector, the square crop is
    centred at ``eye_mid + 0.1 m`` and has side ``2 max(2 |e|, 1.8 |m|)``, rotated upright. So in a
    square aligned photo of side ``S`` the eyes sit at ``y ~ 0.47 S`` about ``S / 4`` apart and the mouth
    at ``y ~ 0.73 S``, for every face. The default box is FaceBoxes' box measured on FFHQ-aligned versions
    of near-frontal sample faces (3DDFA_V2 examples and AFLW2000-3D; mean x in [0.21, 0.74] S, y in
    [0.20, 0.90] S), made symmetric about the vertical midline. It is relative, so any resolution works;
    ``tests/test_detect_tddfa.py`` checks it against FaceBoxes on an aligned photo.
    """

    box: tuple[float, float, float, float] = (0.23, 0.20, 0.77, 0.90)
    """(x1, y1, x2, y2) as fractions of the image width / height."""

    def detect(self, image_rgb: np.ndarray, select: Select = "all") -> Detection:
        """(H, W, 3) uint8 aligned photo -> a Detection with one box (score 1)."""
        check_rgb_image(image_rgb)
        h, w = image_rgb.shape[:2]
        x1, y1, x2, y2 = self.box
        return _finalise(np.array([[x1 * w, y1 * h, x2 * w, y2 * h, 1.0]]), (h, w), select, "aligned")


# -------------------------------------------------------------------------------------- Haar fallback
@dataclass(frozen=True)
class HaarDetector:
    """OpenCV's frontal-face Haar cascade: a last-resort fallback, much weaker than FaceBoxes.

    OpenCV 5 wheels may ship ``cv2.data`` without the cascade files; :meth:`available` says whether the
    file is there and :meth:`detect` raises a clear error when it is not. Scores are all 1.
    """

    cascade: str = "haarcascade_frontalface_default.xml"
    """File name inside ``cv2.data.haarcascades``, or a full path."""
    min_size: int = 40
    """Smallest face side in pixels."""

    def path(self) -> Path | None:
        p = Path(self.cascade)
        if p.is_file():
            return p
        root = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if root and (Path(root) / self.cascade).is_file():
            return Path(root) / self.cascade
        return None

    def available(self) -> bool:
        return self.path() is not None

    def detect(self, image_rgb: np.ndarray, select: Select = "all") -> Detection:
        check_rgb_image(image_rgb)
        p = self.path()
        if p is None:
            raise FileNotFoundError(
                f"OpenCV Haar cascade {self.cascade!r} is not installed with this cv2 ({cv2.__version__}); "
                f"use FaceBoxesDetector, or pass the full path of a cascade xml (opencv/data/haarcascades)")
        clf = cv2.CascadeClassifier(str(p))
        gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
        rects = clf.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(self.min_size, self.min_size))
        rects = np.asarray(rects, np.float32).reshape(-1, 4)
        dets = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:], np.ones((len(rects), 1))], 1)
        return _finalise(dets, image_rgb.shape[:2], select, "haar")
