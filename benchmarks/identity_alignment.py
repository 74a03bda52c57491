"""How much the face chip's alignment changes the dlib descriptor, on the labelled pairs in ../shared/assets.

Reference: dlib itself (HOG detector, 5-point shape predictor, ``get_face_chip`` 150 px with padding 0.25,
``compute_face_descriptor``). Candidates, all through our PyTorch network:

- ``dlib chip``          : the reference chip, our network (isolates the network: should equal dlib);
- ``ours, dlib 5 pt``    : :func:`common.identity.align.face_chip` from dlib's 5 landmarks;
- ``ours, dlib 68 pt``   : the same from dlib's 68-point predictor (dlib's 68-point template);
- ``ours, 3DDFA 68 pt``  : the same from the project's own fit (FaceBoxes + 3DDFA_V2, landmark second pass):
                           what ``uvprep``/``uvtrain`` have at hand.

For each: pair verification at dlib's threshold 0.6 (300 pairs), mean same / different-person distance, and the
cosine of each photo's descriptor to the reference.

    python benchmarks/identity_alignment.py [--assets ../shared/assets]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
import torch

from common.identity.align import face_chip
from common.identity.dlibnet import cached_dlib_resnet, dlib_model_path


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    args = ap.parse_args()
    import dlib

    from common.faces.assets import TDDFAAssets
    from common.faces.detect import FaceBoxesDetector
    from common.faces.tddfa import TDDFARegressor

    a = args.assets
    v2 = TDDFAAssets.from_dir(a / "3ddfa_v2", require=("detector", "mb05", "param_stats"))
    d = dlib_model_path().parent
    det = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(d / "shape_predictor_5_face_landmarks.dat"))
    sp68 = dlib.shape_predictor(str(d / "shape_predictor_68_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat"))
    boxes = FaceBoxesDetector.from_path(v2.detector)
    tddfa = TDDFARegressor.from_paths(v2.mb05, v2.param_stats, a / "3ddfa_v1" / "c++" / "weights", second_pass=True)
    net = cached_dlib_resnet()
    names = ["dlib", "dlib chip", "ours, dlib 5 pt", "ours, dlib 68 pt", "ours, 3DDFA 68 pt"]
    emb: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    folder = a / "faces_pairs"
    for path in sorted(folder.glob("*.jpg")):
        img = _rgb(path)
        face = max(det(img, 1), key=lambda r: r.area())
        s5, s68 = sp5(img, face), sp68(img, face)
        chip = dlib.get_face_chip(img, s5, size=150, padding=0.25)
        emb["dlib"][path.name] = np.asarray(rec.compute_face_descriptor(chip))
        fit = tddfa.predict(img, boxes.detect(img, select="largest").boxes)
        p3 = torch.from_numpy(tddfa.landmarks(*fit)[:, :, :2] - 0.5).float()  # to pixel centres at integers
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        pts = {"ours, dlib 5 pt": torch.tensor([[[p.x, p.y] for p in s5.parts()]], dtype=torch.float32),
               "ours, dlib 68 pt": torch.tensor([[[p.x, p.y] for p in s68.parts()]], dtype=torch.float32),
               "ours, 3DDFA 68 pt": p3}
        with torch.no_grad():
            emb["dlib chip"][path.name] = net(torch.from_numpy(chip).permute(2, 0, 1)[None].float() / 255)[0].numpy()
            for k, p in pts.items():
                emb[k][path.name] = net(face_chip(x, p))[0].numpy()
    with open(folder / "pairs.csv") as f:
        pairs = [(r["file_x"], r["file_y"], r["Decision"] == "Yes") for r in csv.DictReader(f)]
    same = np.array([s for _, _, s in pairs])
    print(f"{len(emb['dlib'])} photos, {len(pairs)} pairs ({same.sum()} same-person)\n")
    print(f"{'alignment':<20} {'correct @0.6':>12} {'same mean':>10} {'diff mean':>10} {'cos to dlib min':>16} "
          f"{'mean':>8}")
    for n in names:
        dist = np.array([np.linalg.norm(emb[n][x] - emb[n][y]) for x, y, _ in pairs])
        ok = int(((dist < 0.6) == same).sum())
        cos = np.array([float(emb[n][k] @ emb["dlib"][k] / np.linalg.norm(emb[n][k]) / np.linalg.norm(emb["dlib"][k]))
                        for k in emb["dlib"]])
        print(f"{n:<20} {ok:>8}/{len(pairs)} {dist[same].mean():>10.3f} {dist[~same].mean():>10.3f} "
              f"{cos.min():>16.5f} {cos.mean():>8.5f}")


if __name__ == "__main__":
    main()
