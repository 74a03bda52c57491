"""UV_gt: the incomplete UV map read from a photo under an eroded face mask (Section 3.3, Fig. 4).

From an image and the fitted mesh in its pixel coordinates:

1. the face region of the model (skin + eyes) is projected into the image (z-buffered), optionally
   intersected with a segmentation mask (a face parser's skin mask, or the synthetic world's
   face mask), and eroded by a radius proportional to the face size, because fitted silhouettes
   are never exact and texels near them pick up background or hair;
2. every texel of the UV layout is mapped to the image and kept only if the surface there is
   visible (front-facing, not occluded, inside the image), the point lies inside the eroded mask,
   optionally the surface is not seen at a grazing angle, and the texel is not in the mouth interior.

Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from common.facemodel import FaceModel
from common.render import Fragments, fragments_or_rasterize, rasterize, unwrap_to_uv
from common.uvtools import model_uv_fragments, region_uv_mask
from preprocess.config import UVGTConfig


@dataclass(frozen=True, eq=False)
class UVGT:
    """uv: (B, U, U, 3) float32 in [0, 1] (0 where not observed); mask: (B, U, U) bool observed texels;
    face_mask: (B, H, W) bool projected face region; eroded: (B, H, W) bool the mask texels must lie in."""

    uv: np.ndarray
    mask: np.ndarray
    face_mask: np.ndarray
    eroded: np.ndarray


@dataclass(frozen=True, eq=False)
class UVLayoutCache:
    """What depends only on (model, U): the UV-space fragments and the excluded-texel mask (U, U) bool."""

    uv_frags: Fragments
    excluded: np.ndarray
    face_weight: torch.Tensor  # (V, 1) float32: 1 on skin + eyes, 0 elsewhere


def layout_cache(model: FaceModel, config: UVGTConfig = UVGTConfig()) -> UVLayoutCache:
    """Precompute the per-(model, U) parts of :func:`uv_gt_from_images`; reuse it across samples."""
    frags = model_uv_fragments(model, config.uv_size)
    excluded = np.zeros((config.uv_size,) * 2, bool)
    for name in config.exclude_regions:
        excluded |= region_uv_mask(model, name, config.uv_size, frags)
    return UVLayoutCache(frags, excluded, face_weight(model))


def face_pixels(frags: Fragments, triangles: torch.Tensor, face_weight: torch.Tensor) -> np.ndarray:
    """Pixels showing a face triangle: (B, H, W) bool.

    frags: the mesh rasterised in the image (back faces culled); triangles: (F, 3) int64; face_weight: (V, 1)
    float, 1 on the textured face (``face | eyes`` minus ``mouth``, :attr:`UVLayoutCache.face_weight`). A triangle
    is a face triangle when the majority of its vertices are; it is looked up by the visible triangle of each
    pixel (one gather per pixel).
    """
    tri_face = face_weight[:, 0][triangles].mean(1) >= 0.5
    return (tri_face[frags.tri_id.clamp(min=0)] & (frags.tri_id >= 0)).numpy()


def projected_face_region(verts_px, model: FaceModel, image_size: int,
                          cache: UVLayoutCache | None = None) -> np.ndarray:
    """The visible face triangles of fitted meshes, without any segmentation: (B, S, S) bool.

    verts_px: (B, V, 3) numpy or torch, the meshes in image pixels (``common.faces.fit.mesh_in_image``). This is
    :attr:`UVGT.face_mask` when no segmentation mask is given (``uvprep upgrade`` rebuilds ``face_region`` so).
    """
    verts = torch.as_tensor(np.asarray(verts_px) if not isinstance(verts_px, torch.Tensor) else verts_px,
                            dtype=torch.float32)
    if verts.ndim != 3 or verts.shape[1:] != (model.n_vertices, 3):
        raise ValueError(f"verts_px: expected (B, {model.n_vertices}, 3), found {tuple(verts.shape)}")
    weight = face_weight(model) if cache is None else cache.face_weight
    tris = torch.from_numpy(np.ascontiguousarray(model.triangles, np.int64))
    return face_pixels(rasterize(verts, tris, (image_size, image_size), cull_backfaces=True), tris, weight)


def rasterize_fitted(verts_px, model: FaceModel, image_size: int) -> Fragments:
    """The fitted meshes rasterised in their working images (back faces culled): (B, S, S) Fragments, what
    :func:`uv_gt_from_images` and :func:`preprocess.occlusion.occluders_from_fit` read (pass it to both to
    rasterise once). verts_px: (B, V, 3) numpy or torch, the meshes in image pixels."""
    verts = torch.as_tensor(np.asarray(verts_px) if not isinstance(verts_px, torch.Tensor) else verts_px,
                            dtype=torch.float32)
    tris = torch.from_numpy(np.ascontiguousarray(model.triangles, np.int64))
    return rasterize(verts, tris, (image_size, image_size), cull_backfaces=True)


def face_weight(model: FaceModel) -> torch.Tensor:
    """(V, 1) float32: 1 on the textured face (``face | eyes`` minus ``mouth``), 0 elsewhere."""
    weight = (model.regions["face"] | model.regions["eyes"]) & ~model.regions["mouth"]
    return torch.from_numpy(weight.astype(np.float32)[:, None])


def erosion_radius(face_mask: np.ndarray, config: UVGTConfig) -> int:
    """Erosion radius in pixels for one (H, W) bool face mask."""
    if config.erosion_px is not None:
        return int(config.erosion_px)
    return int(round(config.erosion_frac * np.sqrt(face_mask.sum())))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of an (H, W) bool mask by a disc of ``radius`` pixels (pixels outside count as empty)."""
    if radius <= 0:
        return mask.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.erode(mask.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def uv_gt_from_images(images: np.ndarray, verts_px, model: FaceModel, config: UVGTConfig = UVGTConfig(),
                      seg_mask: np.ndarray | None = None, cache: UVLayoutCache | None = None,
                      fragments: Fragments | None = None) -> UVGT:
    """UV_gt and its mask for a batch of photos (Fig. 4).

    images: (B, H, W, 3) uint8 RGB (or float in [0, 1]); verts_px: (B, V, 3) numpy or torch, the fitted
    mesh in image pixels (x right, y down, z nearer-is-larger; see ``common.geometry``); seg_mask:
    optional (B, H, W) bool pixels that may be face (e.g. from a face parser); fragments: optional
    :func:`rasterize_fitted` of the same meshes, to reuse (the occlusion stage rasterises them too).
    Returns :class:`UVGT`.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (B, H, W, 3), found {images.shape}")
    b, h, w = images.shape[:3]
    verts = torch.as_tensor(np.asarray(verts_px) if not isinstance(verts_px, torch.Tensor) else verts_px,
                            dtype=torch.float32)
    if verts.shape != (b, model.n_vertices, 3):
        raise ValueError(f"verts_px: expected ({b}, {model.n_vertices}, 3), found {tuple(verts.shape)}")
    if not torch.isfinite(verts).all():
        raise ValueError("verts_px: contains NaN/inf (the shape fit diverged)")
    if seg_mask is not None and seg_mask.shape != (b, h, w):
        raise ValueError(f"seg_mask: expected {(b, h, w)}, found {seg_mask.shape}")
    cache = layout_cache(model, config) if cache is None else cache
    tris = torch.from_numpy(np.ascontiguousarray(model.triangles, np.int64))
    frags = fragments_or_rasterize(verts, tris, (h, w), fragments)
    face = face_pixels(frags, tris, cache.face_weight)  # (B, H, W)
    if seg_mask is not None:
        face &= seg_mask
    eroded = np.stack([erode(face[i], erosion_radius(face[i], config)) for i in range(b)])

    img = torch.from_numpy(images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    stack = torch.cat([img.permute(0, 3, 1, 2), torch.from_numpy(eroded[:, None].astype(np.float32))], 1)
    uv_t = torch.from_numpy(np.ascontiguousarray(model.uv, np.float32))
    uv_img, uv_mask = unwrap_to_uv(stack, verts, tris, uv_t, config.uv_size, depth_tol=config.depth_tol,
                                   fragments=frags, uv_frags=cache.uv_frags)
    # Bilinear reads of the eroded mask: require all contributing pixels inside it.
    keep = uv_mask[:, 0] & (uv_img[:, 3] > 0.999)
    if config.max_view_angle_deg is not None:
        keep &= _facing(verts, tris, cache.uv_frags) >= np.cos(np.radians(config.max_view_angle_deg))
    keep &= ~torch.from_numpy(cache.excluded)[None]
    uv = (uv_img[:, :3] * keep[:, None]).permute(0, 2, 3, 1).numpy()
    return UVGT(uv=np.clip(uv, 0.0, 1.0), mask=keep.numpy(), face_mask=face, eroded=eroded)


def _facing(verts: torch.Tensor, tris: torch.Tensor, uv_frags: Fragments) -> torch.Tensor:
    """cos(angle between the surface normal and the view direction) per texel: (B, U, U).

    Uses the normal of the texel's triangle (flat), looked up through the UV rasterisation: one gather per
    texel instead of interpolating three vertex normals (triangles are far smaller than the cut's tolerance).
    """
    tri = uv_frags.tri_id[0]
    covered = tri >= 0
    used, texel_tri = torch.unique(tri[covered], return_inverse=True)  # only the triangles some texel lies in
    y_up = verts * torch.tensor([1.0, -1.0, 1.0])  # back to a right-handed frame for the outward normals
    v0, v1, v2 = (y_up[:, tris[used, k]] for k in range(3))
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)  # (B, F', 3); the view direction is +z (orthographic)
    cos = n[..., 2] / n.norm(dim=-1).clamp(min=1e-12)
    out = torch.zeros((verts.shape[0], *tri.shape), dtype=cos.dtype)
    out[:, covered] = cos[:, texel_tri]
    return out
