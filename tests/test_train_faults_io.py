"""``uvtrain`` under faults (issue 20): hostile photos in ``uvtrain infer`` (item 7 and the pixel / byte limits of
section 2). Every test failed before its fix."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from common.config import MAX_BYTES, MAX_PIXELS
from common.imageio import write_png
from common.options import field_default
from common.store import StoreReader
from preprocess.sources import FolderSource
from train.cli import app
from train.config import InferConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- item 7 and section 2: hostile photos in infer
def _png_header_only(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims width x height (its IDAT holds almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                          b"")


@pytest.fixture(scope="module")
def hostile_photos(train_store, tmp_path_factory) -> Path:
    """A good face PNG, the same face as a JPEG cut in half, and a 1 KB PNG that declares 20000 x 20000."""
    d = tmp_path_factory.mktemp("hostile")
    face = StoreReader(train_store).sample(0)["image"]
    write_png(d / "face.png", face)
    jpg = cv2.imencode(".jpg", cv2.cvtColor(cv2.resize(face, (256, 256)), cv2.COLOR_RGB2BGR))[1].tobytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "huge.png").write_bytes(_png_header_only(20000, 20000))
    return d


def _failures(out: Path) -> dict[str, str]:
    with open(out / "failures.csv") as f:
        return {r["photo"]: r["reason"] for r in csv.DictReader(f)}


def test_infer_fails_a_truncated_jpeg_and_a_huge_png_without_decoding_them(trained_run, hostile_photos, tmp_path,
                                                                           monkeypatch):
    """The cut JPEG was decoded with its lower half grey (libjpeg only warns) and given a UV map, and the 20000²
    PNG was decoded (2.9 GB RSS for a 1.2 MB file); both were absent from failures.csv, exit 0. Now they fail with
    uvprep's reasons and neither reaches the decoder."""
    import common.imageio

    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(common.imageio.cv2, "imdecode", lambda buf, flag: decoded.append(len(buf)) or real(buf, flag))
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(trained_run), "--images", str(hostile_photos),
                                   "--out", str(tmp_path / "o"), "--framing", "none", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _failures(tmp_path / "o") == {"cut.jpg": "truncated", "huge.png": "too_large"}
    assert decoded == [(hostile_photos / "face.png").stat().st_size]
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["face_uv.png"]


@pytest.mark.parametrize("flag", ["--max-pixels", "--max-bytes"])
def test_infer_takes_uvprep_read_limits(trained_run, hostile_photos, tmp_path, flag):
    """--max-pixels / --max-bytes as `uvprep build` has them: the good face fails too_large under a low limit."""
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(trained_run), "--images",
                                   str(hostile_photos / "face.png"), "--out", str(tmp_path / "o"), "--framing", "none",
                                   flag, "100", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _failures(tmp_path / "o") == {"face.png": "too_large"}


def test_infer_and_uvprep_share_one_default_for_each_limit():
    assert field_default(InferConfig, "max_pixels") == field_default(FolderSource, "max_pixels") == MAX_PIXELS
    assert field_default(InferConfig, "max_bytes") == field_default(FolderSource, "max_bytes") == MAX_BYTES
