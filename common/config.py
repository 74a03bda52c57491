"""Configuration of the stages in ``common/`` that both sides run, as frozen dataclasses: the shape fit
(:class:`FitConfig`, :mod:`common.faces.fit`) and the partial UV crops (:class:`CropConfig`,
:mod:`common.uvlayout`), the store's default chunk and the read limits of photos from outside.

Standard library only, so that ``uvprep --help`` and ``uvtrain --help`` read these defaults without importing
numpy, torch or OpenCV; the modules that implement a config import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from common.faces.refine import RefineConfig

STORE_CHUNK = 64
"""Samples per chunk of a store (``common.store.StoreLayout.chunk``, ``uvprep build --chunk``): one build task
writes one chunk."""

MAX_BYTES = 512 << 20
"""Default read limit per photo file or zip member (bytes, uncompressed): larger ones fail with ``too_large``, unread
(``uvprep build --max-bytes``, ``uvtrain infer --max-bytes``; :func:`common.imageio.read_photo`)."""
MAX_PIXELS = 100_000_000
"""Default limit of width x height read from a photo's header, 100 MP: larger ones fail with ``too_large``,
undecoded (``--max-pixels`` of the same two commands)."""

Fitter = Literal["given", "tddfa"]


@dataclass(frozen=True)
class FitConfig:
    """How a photo is framed and its 62 parameters fitted (:class:`common.faces.fit.ShapeFitter`)."""

    fitter: Fitter = "given"
    """``given`` (parameters supplied by the source) or ``tddfa`` (3DDFA_V2 regressor)."""
    image_size: int = 256
    """Working resolution S: the stored image is S x S."""
    tddfa_weights: Path | None = None
    """mb1_120x120.pth / mb05_120x120.pth (3DDFA_V2 ``weights/``); needed for ``tddfa``."""
    param_stats: Path | None = None
    """param_mean_std_62d_120x120.pkl (3DDFA_V2 ``configs/``); needed for ``tddfa``."""
    detector_weights: Path | None = None
    """FaceBoxesProd.pth; needed for ``tddfa`` on in-the-wild photos."""
    landmarks_dir: Path | None = None
    """3DDFA's ``c++/weights`` (sparse 68-landmark basis); needed for ``second_pass`` and ``refine``."""
    second_pass: bool = False
    """Re-crop from the first fit's landmarks and regress again (3DDFA_V2's landmark crop policy)."""
    refine: RefineConfig | None = None
    """Refine the regressed fit against 2D landmarks from dlib's 68-point predictor (:mod:`common.faces.refine`;
    needs ``landmarks_dir`` and ``refine_landmarks``); None: off."""
    refine_landmarks: Path | None = None
    """dlib's shape_predictor_68_face_landmarks.dat (iBUG 300-W: non-commercial); needed for ``refine``."""
    context: float = 1.25
    """In-the-wild crops: side of the working crop relative to 3DDFA's ROI box around the detection."""
    min_face_px: float = 24.0
    """Detections smaller than this (box side, photo pixels) count as no face."""
    max_outside: float = 0.25
    """A fit whose projected vertices fall outside the working image more than this fraction is diverged."""
    device: str = "cpu"
    """Torch device for the detector and the regressor."""


@dataclass(frozen=True)
class CropConfig:
    """Where the partial UV crops are cut (:func:`common.uvlayout.crop_layout`, Section 3.4)."""

    frontal_yaw_max: float = 10.0
    """|yaw| (degrees) at or below which a face counts as frontal and yields a centre crop."""
    profile_yaw_min: float = 30.0
    """|yaw| (degrees) at or above which a face counts as a profile and yields a side crop."""
    min_coverage: float = 0.6
    """A crop is valid only if at least this fraction of its region (minus the masked part) is observed."""
    margin: int = 2
    """Texels added around each region's bounding box."""
