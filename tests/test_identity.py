"""The identity networks (common/identity): dlib's serialisation format, the ResNet against dlib itself on real
faces, the differentiable alignment, verification on labelled pairs, the cache and ``load_identity``. CPU.

Tests that compare with dlib need the ``identity`` extra (``pip install -e .[identity]``: ``dlib-bin`` and
``face-recognition-models``), which the README's set-up and CI install; the real photos come from
``../shared/assets``.
"""

from __future__ import annotations

import csv
import struct

import numpy as np
import pytest
import torch

from common.identity import FaceIdentity, load_identity
from common.identity.align import (
    DLIB_5PT_TEMPLATE,
    chip_transform,
    face_chip,
    five_from_68,
    similarity_transform,
)
from common.identity.dlib_format import DlibFormatError, DlibReader, decode_floats, read_dlib_net
from common.identity.dlibnet import DlibResNet, add_prev, cached_dlib_resnet, dlib_model_path
from tests.conftest import asset_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- an independent dlib writer
def _pack_int(v: int) -> bytes:
    """dlib's packed integer, written here from the format description (control byte, little-endian bytes)."""
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little")
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def _pack_float(x: float) -> bytes:
    if np.isnan(x):
        return _pack_int(0) + _pack_int(32002)
    if np.isinf(x):
        return _pack_int(0) + _pack_int(32000 if x > 0 else 32001)
    m, e = np.frexp(np.float32(x))  # x = m * 2**e, 0.5 <= |m| < 1
    return _pack_int(int(m * 2**24)) + _pack_int(int(e) - 24)


def _pack_str(s: str) -> bytes:
    return _pack_int(len(s)) + s.encode()


def test_packed_primitives_round_trip():
    vals = [0, 1, -1, 127, 255, 256, -70000, 2**40 + 5]
    r = DlibReader(b"".join(_pack_int(v) for v in vals) + b"10" + _pack_str("con_4"))
    assert [r.int() for _ in vals] == vals
    assert r.bool() is True and r.bool() is False and r.string() == "con_4"
    with pytest.raises(DlibFormatError, match="unexpected end of file"):
        r.int()


def test_dlib_floats_decode_vectorised():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 500), [0.0, -0.0, 1e-30, -7.5e12, np.inf, -np.inf, np.nan]])
    x = x.astype(np.float32)
    blob = b"junk" + b"".join(_pack_float(float(v)) for v in x) + b"tail"
    got, end = decode_floats(blob, 4, len(x))
    np.testing.assert_array_equal(got, x)  # exact, including inf / nan
    assert blob[end:] == b"tail"
    with pytest.raises(DlibFormatError, match="truncated"):
        decode_floats(blob[: len(blob) // 2], 4, len(x))


def test_tensors_version_1_and_2():
    vals = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1) - 2.5
    head = b"".join(_pack_int(v) for v in (1, 2, 3, 1))
    v1 = _pack_int(1) + head + b"".join(_pack_float(float(v)) for v in vals.ravel())
    v2 = _pack_int(2) + head + struct.pack("<6f", *vals.ravel())
    for blob in (v1, v2):
        np.testing.assert_array_equal(DlibReader(blob).tensor(), vals)
    with pytest.raises(DlibFormatError, match="runs past the end"):
        DlibReader(v2[:-4]).tensor()


def test_parser_rejects_other_files(tmp_path):
    bad = tmp_path / "x.dat"
    bad.write_bytes(_pack_int(1) + _pack_str("loss_multiclass_log_") + b"\0" * 10)
    with pytest.raises(DlibFormatError, match=r"x\.dat.*loss_multiclass_log_.*not supported"):
        read_dlib_net(bad)
    with pytest.raises(DlibFormatError, match="cannot read"):
        read_dlib_net(tmp_path / "missing.dat")


# ---------------------------------------------------------------------------------- the network structure
def test_add_prev_zero_extends_like_dlib():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 4, 4), 2.0)
    s = add_prev(a, b)
    assert s.shape == (1, 4, 4, 4)
    assert torch.all(s[:, :2, :3, :3] == 3) and torch.all(s[:, 2:] == 2) and torch.all(s[:, :, 3] == 2)


def test_resnet_shapes_and_size():
    net = DlibResNet()
    assert sum(p.numel() for p in net.parameters()) == 5_614_592  # every value in the .dat file's layers
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 29
    with torch.no_grad():
        assert net(torch.rand(2, 3, 150, 150)).shape == (2, 128)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(2, 150, 150))


# --------------------------------------------------------------------------------------- alignment (torch)
def test_similarity_transform_recovers_a_known_map():
    g = torch.Generator().manual_seed(1)
    src = torch.rand(3, 7, 2, generator=g, dtype=torch.float64) * 100
    ang, s, t = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.5, 1.0, 3.0]), torch.tensor([[5.0, -2], [0, 0],
                                                                                             [1, 9]])
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
    lin = (s[:, None, None] * rot).double()
    dst = torch.einsum("bij,bnj->bni", lin, src) + t[:, None].double()
    A = similarity_transform(src, dst)
    torch.testing.assert_close(A[:, :, :2], lin)
    torch.testing.assert_close(A[:, :, 2], t.double())


def test_face_chip_is_the_template_on_a_template_face():
    """Landmarks placed exactly where the template puts them in a 150 px image: the chip is the image."""
    img = torch.rand(1, 3, 150, 150)
    pts = ((0.25 + DLIB_5PT_TEMPLATE) / 1.5 * 150 - 0.5)[None].float()  # pixel centres at integers
    A = chip_transform(pts)
    torch.testing.assert_close(A[0, :, :2], torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(face_chip(img, pts), img, atol=1e-4, rtol=0)  # float32 grid coordinates


def test_face_chip_batched_equals_single_and_antialiases():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(3, 3, 800, 800, generator=g)
    base = (0.25 + DLIB_5PT_TEMPLATE.float()) / 1.5 * 150
    pts = torch.stack([base * 1.3 + 40, base * 2.5 + 10, base * 4.2 + 5])  # three pyramid levels
    batch = face_chip(img, pts)
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], face_chip(img[i:i + 1], pts[i:i + 1]))
    # White noise shrunk 4.2x: level 2 of the pyramid averages 4x4 pixels (std / 4), bilinear point sampling
    # keeps most of it.
    assert batch[2].std() < 0.4 * face_chip(img[2:], pts[2:], antialias=False).std()


def test_face_chip_gradients_reach_image_and_points():
    img = torch.rand(2, 3, 200, 200, requires_grad=True)
    pts = ((0.25 + DLIB_5PT_TEMPLATE.float()) / 1.5 * 180 + 5).expand(2, 5, 2).clone().requires_grad_(True)
    net = FaceIdentity("test", DlibResNet(), 150)
    net(img, pts).square().sum().backward()
    assert img.grad.abs().sum() > 0 and torch.isfinite(img.grad).all()
    assert pts.grad.abs().sum() > 0 and torch.isfinite(pts.grad).all()
    assert not any(p.requires_grad for p in net.parameters())


def test_five_from_68_uses_eye_corners_and_nose():
    pts = torch.arange(68 * 2, dtype=torch.float32).reshape(1, 68, 2)
    assert five_from_68(pts)[0, :, 0].tolist() == [90.0, 84.0, 72.0, 78.0, 66.0]


# ---------------------------------------------------------------------------------- against dlib itself
EXTRA = "needs the identity extra: pip install -e .[identity]"


@pytest.fixture(scope="module")
def dlib_dat():
    """The .dat file of the face-recognition-models package, or skip."""
    try:
        return dlib_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"{EXTRA} ({e})")


@pytest.fixture(scope="module")
def dlib_models(dlib_dat):
    dlib = pytest.importorskip("dlib", reason=f"{EXTRA} (dlib-bin)")
    d = dlib_dat.parent
    return {"dlib": dlib, "detector": dlib.get_frontal_face_detector(),
            "sp5": dlib.shape_predictor(str(d / "shape_predictor_5_face_landmarks.dat")),
            "sp68": dlib.shape_predictor(str(d / "shape_predictor_68_face_landmarks.dat")),
            "rec": dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat"))}


@pytest.fixture(scope="module")
def resnet(dlib_dat, tmp_path_factory):
    return cached_dlib_resnet(cache_dir=tmp_path_factory.mktemp("idcache"))


def _read_rgb(path) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _largest_face(models, img):
    dets = models["detector"](img, 1)
    return max(dets, key=lambda r: r.area()) if len(dets) else None


def _points(shape) -> torch.Tensor:
    return torch.tensor([[[p.x, p.y] for p in shape.parts()]], dtype=torch.float32)


def _embed(net, img_u8: np.ndarray, points: torch.Tensor | None = None) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return (net(x) if points is None else net(face_chip(x, points)))[0].numpy().astype(np.float64)


def _cos(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_matches_dlib_on_a_synthetic_chip(dlib_models, resnet):
    """Runs wherever the extra is installed (no photos needed): a smooth random 150 px image."""
    rng = np.random.default_rng(3)
    chip = (np.clip(rng.normal(0.5, 0.2, (15, 15, 3)), 0, 1) * 255).astype(np.uint8)
    chip = np.ascontiguousarray(np.kron(chip, np.ones((10, 10, 1), np.uint8)))
    ref = np.asarray(dlib_models["rec"].compute_face_descriptor(chip))
    ours = _embed(resnet, chip)
    assert _cos(ref, ours) > 0.99999 and np.abs(ref - ours).max() < 1e-4


REAL_FACES = [("faces", "JianzhuGuo.jpg"), ("faces", "emma.jpg"), ("faces", "trump_hillary.jpg"),
              ("aflw2000", "image00050.jpg"), ("aflw2000", "image00430.jpg"), ("aflw2000", "image03324.jpg")]


@pytest.mark.parametrize("folder,name", REAL_FACES)
def test_matches_dlib_on_real_faces(dlib_models, resnet, folder, name):
    img = _read_rgb(asset_path(folder, name))
    face = _largest_face(dlib_models, img)
    assert face is not None
    shape = dlib_models["sp5"](img, face)
    chip = dlib_models["dlib"].get_face_chip(img, shape, size=150, padding=0.25)
    ref = np.asarray(dlib_models["rec"].compute_face_descriptor(chip))
    assert _cos(ref, _embed(resnet, chip)) >= 0.999  # measured 1 - 1e-7 (max |difference| 3e-7)
    # Our differentiable chip from the same 5 points: measured cosine >= 0.9992 on these photos.
    ours = _embed(resnet, img, _points(shape))
    assert _cos(ref, ours) >= 0.998


@pytest.fixture(scope="module")
def pair_embeddings(dlib_models, resnet):
    folder = asset_path("faces_pairs")
    out = {"dlib": {}, "torch": {}, "torch_align5": {}, "torch_align68": {}}
    for path in sorted(folder.glob("*.jpg")):
        img = _read_rgb(path)
        face = _largest_face(dlib_models, img)
        assert face is not None, path
        s5, s68 = dlib_models["sp5"](img, face), dlib_models["sp68"](img, face)
        chip = dlib_models["dlib"].get_face_chip(img, s5, size=150, padding=0.25)
        out["dlib"][path.name] = np.asarray(dlib_models["rec"].compute_face_descriptor(chip))
        out["torch"][path.name] = _embed(resnet, chip)
        out["torch_align5"][path.name] = _embed(resnet, img, _points(s5))
        out["torch_align68"][path.name] = _embed(resnet, img, _points(s68))
    with open(folder / "pairs.csv") as f:
        pairs = [(r["file_x"], r["file_y"], r["Decision"] == "Yes") for r in csv.DictReader(f)]
    return out, pairs


def _verify(emb: dict, pairs) -> tuple[int, float, float]:
    d = np.array([np.linalg.norm(emb[a] - emb[b]) for a, b, _ in pairs])
    same = np.array([s for _, _, s in pairs])
    return int(((d < 0.6) == same).sum()), float(d[same].mean()), float(d[~same].mean())


def test_verification_on_labelled_pairs_reproduces_dlib(pair_embeddings):
    emb, pairs = pair_embeddings
    assert len(pairs) == 300
    ok, same, diff = _verify(emb["dlib"], pairs)
    assert (ok, round(same, 3), round(diff, 3)) == (299, 0.366, 0.886)  # the MANIFEST's reference figures
    ok_t, same_t, diff_t = _verify(emb["torch"], pairs)
    assert ok_t == ok and abs(same_t - same) < 1e-4 and abs(diff_t - diff) < 1e-4
    # Our alignment, from dlib's 5 and 68 landmarks: measured 299/300 both, means 0.362/0.885 and 0.364/0.884.
    for key in ("torch_align5", "torch_align68"):
        ok_a, same_a, diff_a = _verify(emb[key], pairs)
        assert ok_a >= 298 and abs(same_a - same) < 0.02 and abs(diff_a - diff) < 0.02, key


# ---------------------------------------------------------------------------------------- cache, loading
def test_cache_is_written_once_and_repaired(dlib_dat, tmp_path):
    cached_dlib_resnet(cache_dir=tmp_path)
    (entry,) = tmp_path.glob("dlib_resnet_*.pt")
    sd = torch.load(entry, weights_only=True)
    assert set(sd) == set(DlibResNet().state_dict())
    entry.write_bytes(b"damaged")
    net = cached_dlib_resnet(cache_dir=tmp_path)  # re-converted, not crashed
    torch.testing.assert_close(net.state_dict(), sd)
    assert torch.load(entry, weights_only=True).keys() == sd.keys()


def test_load_identity_specs(dlib_dat, tmp_path):
    assert load_identity("none") is None
    net = load_identity("dlib", cache_dir=tmp_path)
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 128)  # no points: the image is taken as the chip
    with pytest.raises(FileNotFoundError, match="nowhere.dat"):
        load_identity(f"dlib:{tmp_path / 'nowhere.dat'}", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="lightcnn:PATH needs"):
        load_identity("lightcnn:")
    with pytest.raises(ValueError, match="expected one of none \\| dlib"):
        load_identity("arcface")


@pytest.mark.gpu
def test_cuda_matches_cpu(dlib_dat, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    net = load_identity("dlib", "cpu", cache_dir=tmp_path)
    gpu = load_identity("dlib", "cuda", cache_dir=tmp_path)
    img = torch.rand(4, 3, 256, 256)
    pts = ((0.25 + DLIB_5PT_TEMPLATE.float()) / 1.5 * 200 + 20).expand(4, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(gpu(img.cuda(), pts.cuda()).cpu(), net(img, pts), atol=2e-3, rtol=1e-3)
