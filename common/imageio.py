"""Image I/O and contact sheets: RGB uint8 at the edges, cv2 underneath (which is BGR)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np


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
