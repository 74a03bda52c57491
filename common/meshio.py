"""Textured meshes on disk: Wavefront OBJ + MTL + a texture image, as Blender, MeshLab and trimesh read them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

__all__ = ["write_textured_obj"]


def write_textured_obj(path: str | Path, vertices: np.ndarray, uv: np.ndarray, triangles: np.ndarray,
                       texture: str, normals: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write ``path`` (.obj) and its ``.mtl`` next to it, the material's diffuse map being ``texture``.

    vertices: (V, 3) float; uv: (V, 2) in [0, 1], v up (OBJ's convention: the texture image's top row is v = 1);
    triangles: (F, 3) int, 0-based, counter-clockwise seen from outside; texture: the image's file name,
    relative to the OBJ's folder; normals: optional (V, 3). Vertex i uses texture coordinate i (and normal i).
    Returns (obj path, mtl path).
    """
    path = Path(path)
    v = np.asarray(vertices, np.float64)
    t = np.asarray(uv, np.float64)
    f = np.asarray(triangles, np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or t.shape != (len(v), 2):
        raise ValueError(f"expected vertices (V, 3) and uv (V, 2), found {v.shape} and {t.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= len(v))):
        raise ValueError(f"expected triangles (F, 3) indexing {len(v)} vertices, found {f.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices hold NaN or infinite values")
    mtl = path.with_suffix(".mtl")
    buf = io.StringIO()
    buf.write(f"# uvtex textured face mesh: {len(v)} vertices, {len(f)} triangles\nmtllib {mtl.name}\n")
    np.savetxt(buf, v, fmt="v %.6f %.6f %.6f")
    np.savetxt(buf, t, fmt="vt %.6f %.6f")
    idx = f + 1
    if normals is not None:
        n = np.asarray(normals, np.float64)
        if n.shape != v.shape:
            raise ValueError(f"normals: expected {v.shape}, found {n.shape}")
        np.savetxt(buf, n, fmt="vn %.6f %.6f %.6f")
        buf.write("usemtl face\n")
        np.savetxt(buf, np.repeat(idx, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    else:
        buf.write("usemtl face\n")
        np.savetxt(buf, np.repeat(idx, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    path.write_text(buf.getvalue())
    mtl.write_text(f"newmtl face\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd {texture}\n")
    return path, mtl
