"""Image I/O and contact sheets: RGB uint8 at the edges, cv2 underneath (which is BGR).

Photos from outside (``uvprep build``'s sources, ``uvtrain infer``'s ``--images``) are read with :func:`read_photo`
(or :func:`read_regular_file` + :func:`decode_image`): under the same byte and pixel limits
(:data:`common.config.MAX_BYTES`, :data:`common.config.MAX_PIXELS`), with the same truncation check and colour
conversions, never raising for bad data; a bad file gives a :class:`common.store.Reason`. :func:`read_image` is for
files the project wrote itself.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from common.config import MAX_BYTES, MAX_PIXELS
from common.store.schema import Reason

GREY = 128
"""Background that transparent pixels are composited over (mid-grey: neutral for detection and fitting)."""


def to_uint8(img) -> np.ndarray:
    """Convert an image to uint8.

    img: (H, W) or (H, W, C) numpy array (or torch tensor): float in [0, 1] (clipped, rounded),
    bool (-> 0 / 255) or any integer type in [0, 255] (clipped). Returns the same shape, uint8.
    """
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    raise TypeError(f"to_uint8: expected a float, bool or integer image, found dtype {a.dtype}")


def _as_rgb(img) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3) uint8 (alpha dropped)."""
    a = to_uint8(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, found {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, 2)
    return np.ascontiguousarray(a[..., :3])


def write_png(path, img) -> Path:
    """Write an RGB image (see :func:`to_uint8` for accepted types) as PNG; creates parent folders.

    Returns the path written. Raises OSError when cv2 cannot write the file.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png: expected a path ending in .png, found {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = _as_rgb(img)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"write_png: cv2 could not write {path} (is the folder writable?)")
    return path


def read_image(path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (grey is replicated, alpha dropped, 16-bit scaled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_image: no file at {path}")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"read_image: cv2 could not decode {path} ({path.stat().st_size} bytes); "
                         f"is it a PNG/JPEG/BMP/TIFF image?")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 65535.0)
    elif img.dtype != np.uint8:
        raise ValueError(f"read_image: {path} holds {img.dtype} pixels; expected 8- or 16-bit")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return _as_rgb(img)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, C) image stretched to (size, size): area averaging when shrinking, bilinear when enlarging; the
    image itself when it already has that size."""
    if img.shape[:2] == (size, size):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def _resize_to_height(img: np.ndarray, h: int) -> np.ndarray:
    if img.shape[0] == h:
        return img
    w = max(1, int(round(img.shape[1] * h / img.shape[0])))
    interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_NEAREST
    return cv2.resize(img, (w, h), interpolation=interp)


def image_grid(rows: Sequence[Sequence], pad: int = 4, labels=None, height: int | None = None,
               background: int = 255) -> np.ndarray:
    """Lay images out in rows: a contact sheet (h, w, 3) uint8.

    rows: list of rows, each a list of images (any type :func:`to_uint8` accepts; grey, RGB or
    RGBA). Every tile is resized (aspect kept) to a common height: ``height`` or the tallest
    tile's. ``pad`` pixels of ``background`` separate tiles and surround the sheet; short rows
    are padded on the right. labels: None, one string per row (drawn on the row's first tile) or
    a list of lists of strings, one per tile (drawn at each tile's top-left).
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("image_grid: expected a non-empty list of non-empty rows")
    tiles = [[_as_rgb(t) for t in r] for r in rows]
    h = int(height or max(t.shape[0] for r in tiles for t in r))
    tiles = [[_resize_to_height(t, h) for t in r] for r in tiles]
    if labels is not None:
        if len(labels) != len(tiles):
            raise ValueError(f"image_grid: {len(labels)} labels for {len(tiles)} rows")
        for r, lab in zip(tiles, labels, strict=True):
            per_tile = [lab] if isinstance(lab, str) else list(lab)
            for t, text in zip(r, per_tile, strict=False):
                if text:
                    scale = max(0.3, h / 400)
                    org = (3, int(14 * scale / 0.5))
                    # a black outline drawn as the same 1-px text shifted around (a thicker stroke also widens
                    # OpenCV's glyph advance, which left a black "ghost" tail after each label)
                    for dx, dy in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
                        cv2.putText(t, str(text), (org[0] + dx, org[1] + dy), cv2.FONT_HERSHEY_SIMPLEX, scale,
                                    (0, 0, 0), 1, cv2.LINE_AA)
                    cv2.putText(t, str(text), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                                cv2.LINE_AA)
    widths = [sum(t.shape[1] for t in r) + pad * (len(r) - 1) for r in tiles]
    out_w = max(widths) + 2 * pad
    out_h = len(tiles) * h + (len(tiles) + 1) * pad
    out = np.full((out_h, out_w, 3), background, np.uint8)
    for ri, r in enumerate(tiles):
        y0 = pad + ri * (h + pad)
        x0 = pad
        for t in r:
            out[y0:y0 + h, x0:x0 + t.shape[1]] = t
            x0 += t.shape[1] + pad
    return out


# ------------------------------------------------------------------------------------- photos from outside
def _sniff(data: bytes) -> str | None:
    """Image format from the leading bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _truncated(fmt: str, data: bytes) -> bool:
    """JPEG: no EOI marker after the last SOS (entropy-coded data never holds an unstuffed 0xFF 0xDA), or
    anywhere when there is no SOS; PNG: no IEND chunk. Bytes after EOI / IEND are allowed. Other formats:
    left to the decoder (cv2 5 rejects truncated files outright; it does not return partial images). libjpeg and
    libpng only warn ("Premature end of JPEG file") and fill the missing rows with grey: the check is made here."""
    if fmt == "jpeg":
        sos = data.rfind(b"\xff\xda")
        return data.find(b"\xff\xd9", sos + 2 if sos >= 0 else 2) < 0
    if fmt == "png":
        return data.rfind(b"IEND\xaeB`\x82") < 0
    return False


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour (H, W, C) uint8 over :data:`GREY` with alpha (H, W) uint8 -> (H, W, C) uint8."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(colour.astype(np.float32) * a + GREY * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def _to_rgb8(img: np.ndarray) -> np.ndarray | None:
    """cv2's decoded array (grey, grey+alpha, BGR or BGRA; uint8 or uint16) -> (H, W, 3) uint8 RGB, or None."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if img.dtype != np.uint8:
        return None
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        return None
    c = img.shape[2]
    if c in (2, 4):
        img = _composite(img[..., :c - 1], img[..., c - 1])
    if img.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(img, 3, 2))
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding the pixels (Pillow), or None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:  # Pillow's own guard (> 2 x its MAX_IMAGE_PIXELS): huge for sure
        return (1 << 20, 1 << 20)
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse: leave it to the decoder
        return None


def decode_image(data: bytes, min_size: int = 64,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray | None, Reason | None]:
    """Decode image file bytes into (H, W, 3) uint8 RGB; never raises for bad data.

    Returns ``(rgb, None)`` or ``(None, reason)``: NOT_AN_IMAGE (empty, or no known signature:
    JPEG, PNG, BMP, TIFF, WebP, GIF), TRUNCATED (JPEG without EOI after its last scan, PNG without
    IEND), DECODE_ERROR (the decoder rejects the data), UNSUPPORTED_MODE (float or other exotic
    pixel types, more than 4 channels), TOO_SMALL (``min(H, W) < min_size``), TOO_LARGE (the header says
    ``W x H > max_pixels``: rejected before any pixel is decoded).

    Conversions: grey -> RGB (replicated); 16-bit -> 8-bit (``round(v / 257)``); alpha (RGBA or grey +
    alpha, palette PNGs with transparency) is composited over mid-grey 128 rather than dropped, since
    fully transparent pixels often hold arbitrary colours; palette PNGs are expanded by the decoder.
    JPEGs are decoded with ``IMREAD_COLOR``, which applies the EXIF orientation (``IMREAD_UNCHANGED``
    ignores it) and converts CMYK / YCCK (Adobe) to RGB; other formats use ``IMREAD_UNCHANGED``
    (their EXIF orientation, rare, is not applied).
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    fmt = _sniff(data) if data else None
    if fmt is None:
        return None, Reason.NOT_AN_IMAGE
    if _truncated(fmt, data):
        return None, Reason.TRUNCATED
    wh = image_size_from_header(data)
    if wh is not None and wh[0] * wh[1] > max_pixels:
        return None, Reason.TOO_LARGE
    flag = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except (cv2.error, ValueError, MemoryError):
        img = None
    if img is None or img.size == 0:
        return None, Reason.DECODE_ERROR
    rgb = _to_rgb8(img)
    if rgb is None:
        return None, Reason.UNSUPPORTED_MODE
    if min(rgb.shape[:2]) < min_size:
        return None, Reason.TOO_SMALL
    return rgb, None


def read_regular_file(path: Path, max_bytes: int) -> tuple[bytes | None, Reason | None]:
    """A file's bytes, or (None, reason): BAD_NAME (a replaced non-UTF-8 name), NOT_A_FILE (FIFO, device,
    folder, dangling or looping link: never opened, so it cannot hang), TOO_LARGE (over ``max_bytes``, also
    when it grows while read), READ_ERROR (missing, permission, I/O)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if "\ufffd" in str(path) and e.errno == errno.ENOENT:
            return None, Reason.BAD_NAME
        if e.errno == errno.ELOOP or (e.errno == errno.ENOENT and os.path.islink(path)):
            return None, Reason.NOT_A_FILE
        return None, Reason.READ_ERROR
    if not stat.S_ISREG(st.st_mode):
        return None, Reason.NOT_A_FILE
    if st.st_size > max_bytes:
        return None, Reason.TOO_LARGE
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError:
        return None, Reason.READ_ERROR
    return (None, Reason.TOO_LARGE) if len(data) > max_bytes else (data, None)


def read_photo(path, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               min_size: int = 1) -> tuple[np.ndarray | None, Reason | None]:
    """A photo file as (H, W, 3) uint8 RGB, or (None, reason): :func:`read_regular_file` under ``max_bytes``, then
    :func:`decode_image` under ``max_pixels`` (a truncated file is a failure, not a grey-filled image). Never
    raises for bad data."""
    data, why = read_regular_file(Path(path), max_bytes)
    if data is None:
        return None, why
    return decode_image(data, min_size, max_pixels)
