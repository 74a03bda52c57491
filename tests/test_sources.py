"""Photo sources: manifests, robust decoding of bad files, FFHQ folder vs zip, AFLW2000, synthetic."""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
import zlib

import cv2
import numpy as np
import pytest
import scipy.io as sio

from common.store import Reason
from preprocess.sources import (
    GREY,
    AFLW2000Source,
    FFHQSource,
    FolderSource,
    Manifest,
    ManifestEntry,
    SyntheticSource,
    decode_image,
    make_source,
    resize_square,
)


def _rgb(h=80, w=96, seed=0) -> np.ndarray:
    """A smooth (compressible, JPEG-friendly) random RGB image (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), 2)


def _enc(ext: str, img: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _png_rgb(img: np.ndarray) -> bytes:
    return _enc(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


# ------------------------------------------------------------------------- hand-made files cv2 cannot write
def _seg(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_segments(jpg: bytes):
    """Marker segments up to the first SOS and the entropy-coded scan data of a baseline JPEG."""
    i, segs = 2, []
    while True:
        m, ln = jpg[i + 1], struct.unpack(">H", jpg[i + 2:i + 4])[0]
        segs.append((m, jpg[i + 4:i + 2 + ln]))
        i += 2 + ln
        if m == 0xDA:
            return segs, jpg[i:jpg.rindex(b"\xff\xd9")]


def _cmyk_jpeg(planes: list[np.ndarray]) -> bytes:
    """A 4-component (Adobe CMYK) baseline JPEG: one non-interleaved scan per plane, each taken from a
    greyscale JPEG of that plane (same quantisation and standard Huffman tables)."""
    h, w = planes[0].shape
    parts = [_jpeg_segments(_enc(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 95])) for p in planes]
    out = b"\xff\xd8" + _seg(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0))  # transform 0: CMYK
    out += b"".join(_seg(m, p) for m, p in parts[0][0] if m in (0xDB, 0xC4))
    out += _seg(0xC0, struct.pack(">BHHB", 8, h, w, 4) + b"".join(bytes([k + 1, 0x11, 0]) for k in range(4)))
    for k, (_, scan) in enumerate(parts):
        out += _seg(0xDA, bytes([1, k + 1, 0x00, 0, 63, 0])) + scan
    return out + b"\xff\xd9"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _palette_png(idx: np.ndarray, palette: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    """8-bit palette PNG (colour type 3) of index image idx (h, w) uint8, palette (n, 3), optional tRNS alpha (n,)."""
    h, w = idx.shape
    raw = b"".join(b"\x00" + idx[r].tobytes() for r in range(h))
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
    out += _png_chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if alpha is not None:
        out += _png_chunk(b"tRNS", alpha.astype(np.uint8).tobytes())
    return out + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def _exif_orientation_jpeg(img_bgr: np.ndarray, orientation: int) -> bytes:
    jpg = _enc(".jpg", img_bgr)
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return jpg[:2] + _seg(0xE1, b"Exif\x00\x00" + tiff + struct.pack(">I", 0)) + jpg[2:]


# ----------------------------------------------------------------------------------------------- decoding
def test_decode_good_png_and_jpeg_are_rgb():
    img = _rgb()
    out, why = decode_image(_png_rgb(img))
    assert why is None and out.dtype == np.uint8 and np.array_equal(out, img)
    out, why = decode_image(_enc(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98]))
    assert why is None and out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() < 3  # RGB order kept (a channel swap gives ~40)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("keep", [0.5, 0.97, -2])
def test_truncated_files(ext, keep):
    data = _enc(ext, _rgb())
    n = len(data) + keep if keep < 0 else int(len(data) * keep)
    assert decode_image(data[:n]) == (None, Reason.TRUNCATED)


def test_trailing_bytes_after_end_marker_are_fine():
    img = _rgb()
    for data in (_png_rgb(img), _enc(".jpg", img)):
        out, why = decode_image(data + b"\x00" * 16 + b"trailer")
        assert why is None and out.shape == img.shape


def test_not_images_and_corrupt_data():
    rng = np.random.default_rng(1)
    assert decode_image(b"") == (None, Reason.NOT_AN_IMAGE)
    assert decode_image(rng.bytes(2000)) == (None, Reason.NOT_AN_IMAGE)
    assert decode_image(b"just some text, saved as photo.jpg\n" * 20) == (None, Reason.NOT_AN_IMAGE)
    jpg = _enc(".jpg", _rgb())
    garbage = jpg[:20] + rng.bytes(len(jpg) - 22) + b"\xff\xd9"  # JPEG signature, EOI, nonsense inside
    assert decode_image(garbage) == (None, Reason.DECODE_ERROR)
    png = bytearray(_png_rgb(_rgb()))
    png[40:60] = b"\x00" * 20  # corrupt IDAT
    assert decode_image(bytes(png)) == (None, Reason.DECODE_ERROR)


def test_grey_16bit_alpha_palette():
    img = _rgb()
    grey = img[..., 1].copy()
    for data in (_enc(".png", grey), _enc(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 100])):
        out, why = decode_image(data)
        assert why is None and out.shape == (*grey.shape, 3)
        assert np.array_equal(out[..., 0], out[..., 2]) and np.abs(out[..., 0].astype(int) - grey).max() <= 2

    v16 = (np.arange(80 * 96 * 3, dtype=np.uint32).reshape(80, 96, 3) * 7 % 65536).astype(np.uint16)
    out, why = decode_image(_enc(".png", v16[..., ::-1]))  # written BGR
    assert why is None and out.dtype == np.uint8
    assert np.array_equal(out, np.round(v16 / 257.0).astype(np.uint8))

    alpha = np.zeros((80, 96), np.uint8)
    alpha[:, 32:64], alpha[:, 64:] = 255, 128
    out, why = decode_image(_enc(".png", np.dstack([cv2.cvtColor(img, cv2.COLOR_RGB2BGR), alpha])))
    assert why is None and out.shape == img.shape
    assert (out[:, :32] == GREY).all()  # transparent -> mid-grey
    assert np.array_equal(out[:, 32:64], img[:, 32:64])  # opaque -> the colour
    half = np.round(img[:, 64:] * (128 / 255) + GREY * (127 / 255))
    assert np.abs(out[:, 64:] - half).max() <= 1

    idx = np.tile(np.arange(4, dtype=np.uint8).repeat(24)[None], (70, 1))
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]])
    out, why = decode_image(_palette_png(idx, pal))
    assert why is None and out.shape == (70, 96, 3) and np.array_equal(out, pal[idx])
    out, why = decode_image(_palette_png(idx, pal, alpha=np.array([255, 0, 255, 255])))
    assert why is None and (out[:, 24:48] == GREY).all() and np.array_equal(out[:, :24], pal[idx[:, :24]])


def test_cmyk_jpeg_converted_to_rgb():
    rgb = np.zeros((64, 80, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, np.linspace(0, 255, 80).astype(np.uint8)[None], 60
    # Adobe CMYK stores inverted ink: (C, M, Y, K) = (R, G, B, 255) means the colour (R, G, B)
    data = _cmyk_jpeg([rgb[..., 0], rgb[..., 1], rgb[..., 2], np.full((64, 80), 255, np.uint8)])
    assert data[0x14:0x19] != b"JFIF"
    out, why = decode_image(data)
    assert why is None and out.shape == (64, 80, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 3


def test_exif_orientation_applied():
    bgr = np.zeros((64, 100, 3), np.uint8)
    bgr[:, :10] = 255  # white band on the left
    out, why = decode_image(_exif_orientation_jpeg(bgr, 6))  # 6: rotate 90 degrees clockwise to display
    assert why is None and out.shape == (100, 64, 3)
    assert out[:10].mean() > 200 and out[-30:].mean() < 30  # the band is now on top


def test_too_small_and_unsupported():
    tiny = _png_rgb(_rgb(10, 10))
    assert decode_image(tiny) == (None, Reason.TOO_SMALL)
    out, why = decode_image(tiny, min_size=8)
    assert why is None and out.shape == (10, 10, 3)
    ok, buf = cv2.imencode(".tiff", np.random.default_rng(0).random((70, 70, 3)).astype(np.float32))
    assert ok, "this cv2 build cannot write float TIFF"
    assert decode_image(buf.tobytes()) == (None, Reason.UNSUPPORTED_MODE)


def test_resize_square():
    img = np.full((100, 140, 3), 77, np.uint8)
    img[:, :20] = 0  # cropped away by the centre crop
    out = resize_square(img, 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8 and (out == 77).all()
    assert resize_square(img[:30, :30], 64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="size"):
        resize_square(img, 0)


# ---------------------------------------------------------------------------------------------- manifests
def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_manifest_sorted_stable_and_diff(tmp_path):
    for name in ("b/2.png", "a.jpg", "b/10.png", "c/d/x.PNG"):
        _write(tmp_path / name, _png_rgb(_rgb(seed=len(name))))
    _write(tmp_path / "notes.txt", b"not an image")
    _write(tmp_path / ".hidden/z.png", _png_rgb(_rgb()))
    _write(tmp_path / "._a.jpg", b"appledouble")
    src = FolderSource(str(tmp_path))
    m1, m2 = src.manifest(), src.manifest()
    assert m1.paths == ["a.jpg", "b/10.png", "b/2.png", "c/d/x.PNG"]
    assert m1 == m2 and m1.sha256() == m2.sha256() and len(m1.sha256()) == 64

    st = os.stat(tmp_path / "b/2.png")
    os.utime(tmp_path / "b/2.png", (st.st_atime, st.st_mtime + 10))
    _write(tmp_path / "b/3.png", _png_rgb(_rgb()))
    (tmp_path / "a.jpg").unlink()
    m3 = src.manifest()
    assert m3.diff(m1) == (["b/3.png"], ["a.jpg"], ["b/2.png"])
    assert m3.sha256() != m1.sha256()
    assert m1.diff(m1) == ([], [], [])
    assert Manifest.from_arrays(*m3.to_arrays()) == m3


def test_manifest_sorts_and_rejects_duplicates():
    m = Manifest((ManifestEntry("b", 1, 0.0), ManifestEntry("a", 2, 1.5)))
    assert m.paths == ["a", "b"] and m[0].size == 2
    with pytest.raises(ValueError, match="duplicate"):
        Manifest((ManifestEntry("a", 1, 0.0), ManifestEntry("a", 1, 0.0)))


def test_ffhq_folder_and_zip_identical(tmp_path):
    root = tmp_path / "thumbnails128x128"
    imgs = {f"{d:05d}/{d * 1000 + k:05d}.png": _rgb(128, 128, seed=d * 10 + k) for d in range(2) for k in range(2)}
    for key, img in imgs.items():
        _write(root / key, _png_rgb(img))
    _write(root / "LICENSE.txt", b"license")
    zpath = tmp_path / "thumbnails128x128.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for key in imgs:
            zf.write(root / key, f"thumbnails128x128/{key}")
        zf.writestr("thumbnails128x128/LICENSE.txt", b"license")
    folder, zipped = FFHQSource(str(root)), make_source("ffhq", images=str(zpath))
    mf, mz = folder.manifest(), zipped.manifest()
    assert mf.paths == mz.paths == sorted(imgs)
    assert [e.size for e in mf] == [e.size for e in mz]
    a, b = folder.load_many(range(len(mf)), mf), zipped.load_many(range(len(mz)), mz)
    for sa, sb in zip(a, b, strict=True):
        assert sa.ok and sb.ok and sa.aligned and sa.key == sb.key
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.image, imgs[sa.key])
    assert np.array_equal(zipped.load(3, mz).image, imgs[mz[3].path])


def test_bad_files_give_reasons_without_raising(tmp_path):
    img = _rgb()
    jpg = _enc(".jpg", img)
    files = {
        "a_truncated.jpg": jpg[: len(jpg) // 2],
        "b_truncated.png": _png_rgb(img)[:-30],
        "c_random.jpg": np.random.default_rng(3).bytes(1000),
        "d_text.jpg": b"hello, I am a text file\n",
        "e_empty.png": b"",
        "f_tiny.png": _png_rgb(_rgb(10, 10)),
        "g_good.png": _png_rgb(img),
        "h_gone.png": _png_rgb(img),
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    src = FolderSource(str(tmp_path))
    man = src.manifest()
    (tmp_path / "h_gone.png").unlink()  # vanished after the manifest was taken
    got = {s.key: s.failure for s in src.load_many(range(len(man)), man)}
    assert got == {"a_truncated.jpg": Reason.TRUNCATED, "b_truncated.png": Reason.TRUNCATED,
                   "c_random.jpg": Reason.NOT_AN_IMAGE, "d_text.jpg": Reason.NOT_AN_IMAGE,
                   "e_empty.png": Reason.NOT_AN_IMAGE, "f_tiny.png": Reason.TOO_SMALL, "g_good.png": None,
                   "h_gone.png": Reason.READ_ERROR}
    assert src.load(man.paths.index("g_good.png"), man).aligned is False


def test_zip_with_corrupt_member(tmp_path):
    zpath = tmp_path / "x.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.png", _png_rgb(_rgb()))
        zf.writestr("b.png", _png_rgb(_rgb(seed=1)))
    raw = bytearray(zpath.read_bytes())
    pos = raw.index(b"IDAT", raw.index(b"b.png"))
    raw[pos + 10:pos + 20] = b"\xff" * 10  # member bytes no longer match their CRC
    zpath.write_bytes(bytes(raw))
    src = FolderSource(str(zpath))
    man = src.manifest()
    a, b = src.load_many([0, 1], man)
    assert a.ok and b.failure == Reason.READ_ERROR


# ------------------------------------------------------------------------------------------------ AFLW2000
def test_aflw2000(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(50, 400, (3, 68))
    for name in ("image00002", "image00004"):
        _write(tmp_path / f"{name}.jpg", _enc(".jpg", _rgb(450, 450)))
    sio.savemat(tmp_path / "image00002.mat", {"Pose_Para": rng.normal(size=(1, 7)), "Shape_Para": rng.normal(
        size=(199, 1)), "Exp_Para": rng.normal(size=(29, 1)), "pt3d_68": pts, "roi": np.array([[1, 2, 3, 4]])})
    src = make_source("AFLW2000", images=str(tmp_path))
    man = src.manifest()
    assert man.paths == ["image00002.jpg", "image00004.jpg"]
    assert man[0].size == (tmp_path / "image00002.jpg").stat().st_size + (tmp_path / "image00002.mat").stat().st_size
    s = src.load(0, man)
    assert s.ok and s.image.shape == (450, 450, 3) and s.landmarks.shape == (68, 2)
    assert np.allclose(s.landmarks, pts[:2].T - 0.5)
    assert s.meta["Shape_Para"].shape == (199, 1) and "roi" in s.meta and "__header__" not in s.meta
    assert src.load(1, man).failure == Reason.BAD_ANNOTATION  # no .mat
    assert isinstance(src, AFLW2000Source)


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic():
    from common.procedural import ProceduralConfig
    from common.synthetic import SyntheticConfig

    cfg = SyntheticConfig(image_size=32, uv_size=32, supersample=1, clutter_shapes=2)
    src = SyntheticSource(count=12, seed=5, config=cfg, model_config=ProceduralConfig(grid=41))
    man = src.manifest()
    assert man[3].path == "synthetic://5/03" and man[3].size == 0 and man[3].mtime == 0.0
    assert man.paths == sorted(man.paths)
    a, one = src.load_many([3, 4], man), src.load(4, man)  # separate calls, separately built model
    assert [x.index for x in a] == [3, 4] and one.key == "synthetic://5/04"
    for name in ("image", "given_params"):
        assert np.array_equal(getattr(one, name), getattr(a[1], name)), name
    assert np.array_equal(one.truth["uv_true"], a[1].truth["uv_true"])
    assert not np.array_equal(a[0].image, a[1].image)
    s = a[0]
    assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert s.given_params.shape == (62,) and s.given_params.dtype == np.float32
    assert s.truth["uv_true"].dtype == np.uint8 and s.truth["uv_visible"].dtype == bool
    other = dataclasses.replace(src, seed=6)
    with pytest.raises(ValueError, match="synthetic://6/"):
        other.load(3, man)


def test_make_source_errors(tmp_path):
    with pytest.raises(ValueError, match="synthetic, ffhq, celeba-hq, folder, aflw2000"):
        make_source("imagenet")
    with pytest.raises(TypeError, match="images"):
        make_source("folder", path=str(tmp_path))
    assert make_source("celeba_hq", images=str(tmp_path)).aligned
    with pytest.raises(FileNotFoundError, match="no folder"):
        make_source("folder", images=str(tmp_path / "missing")).manifest()
