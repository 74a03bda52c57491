"""Pure-PyTorch triangle rasteriser, attribute interpolation, texture rendering and UV unwrapping.

Conventions (see :mod:`common.facemodel` and :mod:`common.geometry`):

* Vertices are given in *image pixel coordinates* ``verts_px``: (B, V, 3) with x right, y down,
  pixel ``j`` covering ``[j, j + 1)`` (centre ``j + 0.5``), and depth ``z`` growing towards the
  camera (the z-buffer keeps the **largest** z). This is what
  :func:`common.geometry.project_to_image` returns. Projection is (scaled) orthographic, so
  barycentrics are screen-space affine and interpolating z with them is exact.
* A pixel is covered by a triangle when its centre lies inside the triangle. Edges use the
  top-left rule on vertices snapped to 1/256 pixel and exact integer edge functions, so a pixel
  centre on an edge shared by two triangles belongs to exactly one of them (no cracks, no double
  counting). Zero-area triangles (after snapping) cover nothing.
* Front-facing: the model's triangles are counter-clockwise seen from outside, i.e. in the y-up
  camera frame ``(x, -y, z)`` their normal ``(v1 - v0) x (v2 - v0)`` has positive z. In y-down
  image coordinates this is a **negative** signed area
  ``(x1 - x0) (y2 - y0) - (y1 - y0) (x2 - x0) < 0`` (:func:`signed_area_px`).
* UV space: texel ``(row i, col j)`` of a ``U x U`` UV image is at ``u = (j + 0.5) / U``,
  ``v = 1 - (i + 0.5) / U``; rasterising in UV space uses pixel coordinates ``x = u U``,
  ``y = (1 - v) U`` (:func:`uv_to_pixel`), so texel centres are pixel centres.
* Sampling images / textures uses ``grid_sample`` (bilinear, ``align_corners=False``,
  ``padding_mode="border"``): image point ``(x, y)`` -> ``(2 x / W - 1, 2 y / H - 1)``; UV point
  ``(u, v)`` -> ``(2 u - 1, 1 - 2 v)``.

Fragments are not differentiable (as in every hard rasteriser); :func:`interpolate`,
:func:`render_texture` and :func:`unwrap_to_uv` are differentiable w.r.t. the attributes,
the texture and the image respectively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Fragments",
    "rasterize",
    "interpolate",
    "render_texture",
    "vertex_visibility",
    "unwrap_to_uv",
    "uv_fragments",
    "uv_to_pixel",
    "signed_area_px",
    "default_depth_tol",
]

_SUB_BITS = 8
_SUB = 1 << _SUB_BITS  # sub-pixel steps per pixel for the exact coverage test
_HALF = _SUB // 2  # a pixel centre's offset in sub-pixel units
_GUARD = float(1 << 20)  # triangles with a vertex farther than this (pixels) are dropped (int64 overflow)
_MAX_CANDIDATES = 1 << 21  # (triangle, pixel) pairs per chunk: bounds temporary memory (~100 MB)
_ID_BITS = 32
_ID_MASK = (1 << _ID_BITS) - 1


@dataclass(frozen=True)
class Fragments:
    """Per-pixel result of :func:`rasterize` (one surface per pixel, the nearest).

    * ``tri_id``: (B, H, W) int64, index into ``triangles`` of the visible triangle, -1 for background.
    * ``bary``: (B, H, W, 3) float32, barycentrics of the pixel centre w.r.t. the triangle's
      vertices ``triangles[tri_id]`` (sum to 1; 0 for background). May be very slightly
      negative (~1e-3) for centres on an edge because coverage uses snapped vertices.
    * ``depth``: (B, H, W) float32, interpolated z (larger = nearer), -inf for background.
    * ``triangles``: (F, 3) int64, the triangles that were rasterised (used by :func:`interpolate`).
    """

    tri_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    triangles: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool, True where a triangle covers the pixel."""
        return self.tri_id >= 0

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.tri_id.shape[1]), int(self.tri_id.shape[2])


# ---------------------------------------------------------------------------------------- checks
def _check_image_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected (H, W) integers, found {image_size!r}") from None
    if h <= 0 or w <= 0 or h * w >= 1 << 28:
        raise ValueError(f"image_size: expected 0 < H, W and H * W < 2**28, found ({h}, {w})")
    return h, w


def _check_mesh(verts_px: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Validate (B, V, 3) vertices and (F, 3) triangles; returns triangles as int64 on the verts' device."""
    if not isinstance(verts_px, torch.Tensor) or verts_px.ndim != 3 or verts_px.shape[2] != 3:
        shape = tuple(verts_px.shape) if isinstance(verts_px, torch.Tensor) else type(verts_px).__name__
        raise ValueError(f"verts_px: expected a (B, V, 3) float tensor, found {shape}")
    if not verts_px.is_floating_point():
        raise ValueError(f"verts_px: expected a floating point tensor, found {verts_px.dtype}")
    if not isinstance(triangles, torch.Tensor) or triangles.ndim != 2 or triangles.shape[1] != 3:
        shape = tuple(triangles.shape) if isinstance(triangles, torch.Tensor) else type(triangles).__name__
        raise ValueError(f"triangles: expected an (F, 3) integer tensor, found {shape}")
    if triangles.is_floating_point() or triangles.dtype == torch.bool:
        raise ValueError(f"triangles: expected an integer tensor, found {triangles.dtype}")
    triangles = triangles.to(device=verts_px.device, dtype=torch.int64)
    n_v = verts_px.shape[1]
    if triangles.numel() and (int(triangles.min()) < 0 or int(triangles.max()) >= n_v):
        raise ValueError(f"triangles: indices must lie in [0, {n_v}) (the number of vertices), found "
                         f"[{int(triangles.min())}, {int(triangles.max())}]")
    bad = ~torch.isfinite(verts_px).all(-1)
    if bad.any():
        b, v = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"verts_px: {int(bad.sum())} vertices are NaN or infinite (first: batch {b}, "
                         f"vertex {v}); check the pose / shape parameters that produced them")
    return triangles


def _check_fragments(fragments: Fragments, batch: int | None = None) -> None:
    if not isinstance(fragments, Fragments):
        raise TypeError(f"fragments: expected a Fragments from rasterize(), found {type(fragments).__name__}")
    if batch is not None and fragments.tri_id.shape[0] != batch:
        raise ValueError(f"fragments: batch size {fragments.tri_id.shape[0]} does not match the mesh's {batch}")


# ------------------------------------------------------------------------------------- helpers
def signed_area_px(verts_px: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of each triangle in image coordinates: (B, V, >=2), (F, 3) -> (B, F).

    ``(x1 - x0) (y2 - y0) - (y1 - y0) (x2 - x0)``; **negative means front-facing** (counter-clockwise
    in the y-up camera frame, the model's outward winding).
    """
    v0, v1, v2 = (verts_px[:, triangles[:, k], :2] for k in range(3))
    e1, e2 = v1 - v0, v2 - v0
    return e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]


def uv_to_pixel(uv: torch.Tensor, size: int) -> torch.Tensor:
    """UV coordinates (..., 2) in [0, 1] (v up) -> UV-image pixel coordinates (..., 2): ``x = u U, y = (1 - v) U``."""
    return torch.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], -1)


def default_depth_tol(verts_px: torch.Tensor) -> torch.Tensor:
    """Default occlusion tolerance per batch item, (B, V, 3) -> (B,): 1% of the vertices' depth extent.

    Plus a rounding floor of ``1e-5 * (1 + max |z|)``. Under scaled orthographic projection z is
    in pixel units, so for a face ~200 px wide this is ~1 px: enough to absorb the curvature
    between neighbouring triangles, small against the nose/cheek occlusion gaps.
    """
    z = verts_px[..., 2].detach()
    extent = z.amax(1) - z.amin(1)
    return 0.01 * extent + 1e-5 * (1.0 + z.abs().amax(1))


def _ordered_int32(z: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 holding an int32 whose order matches the float order (for packing keys)."""
    i = z.contiguous().view(torch.int32)
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i).to(torch.int64)


def _size_bucket(n: torch.Tensor) -> torch.Tensor:
    """Enumeration extent for a bbox side of n pixels: n itself up to 4, then the next power of two."""
    pow2 = torch.exp2(torch.ceil(torch.log2(n.clamp(min=1).to(torch.float64)))).to(torch.int64)
    return torch.where(n <= 4, n, pow2)


# ----------------------------------------------------------------------------------- rasterise
def fragments_or_rasterize(verts_px: torch.Tensor, triangles: torch.Tensor, image_size: tuple[int, int],
                           fragments: Fragments | None = None) -> Fragments:
    """``fragments`` when a caller rasterised these meshes already (one rasterisation shared by several build
    stages), checked to be B meshes in (H, W) images; else :func:`rasterize` of them with back faces culled.

    verts_px: (B, V, 3) as :func:`rasterize`; image_size: (H, W).
    """
    shape = (verts_px.shape[0], *image_size)
    if fragments is None:
        return rasterize(verts_px, triangles, image_size, cull_backfaces=True)
    if tuple(fragments.tri_id.shape) != shape:
        raise ValueError(f"fragments: expected {shape} (these meshes rasterised in these images), found "
                         f"{tuple(fragments.tri_id.shape)}")
    return fragments


def rasterize(verts_px: torch.Tensor, triangles: torch.Tensor, image_size, cull_backfaces: bool = True,
              backend: str = "torch") -> Fragments:
    """Rasterise a batch of meshes (z-buffer, one fragment per pixel).

    verts_px: (B, V, 3) float, image pixel coordinates (x right, y down, centre of pixel j at
    j + 0.5) and depth z (larger = nearer). triangles: (F, 3) integer, shared by the batch.
    image_size: (H, W). cull_backfaces: drop triangles whose signed image area is >= 0
    (back-facing, see :func:`signed_area_px`); with False both windings are drawn.
    backend: "torch" (this module), "pytorch3d" (needs pytorch3d), or "auto" (pytorch3d when
    importable and the vertices are on CUDA, else torch).

    Returns :class:`Fragments` with (B, H, W) ``tri_id`` / ``depth`` and (B, H, W, 3) ``bary``.
    Ties in depth go to the larger triangle index. Triangles with a vertex farther than 2**20 px
    from the origin are dropped. Raises ValueError on NaN / infinite vertices.
    """
    h, w = _check_image_size(image_size)
    triangles = _check_mesh(verts_px, triangles)
    if backend == "auto":
        backend = "pytorch3d" if verts_px.is_cuda and _pytorch3d_available() else "torch"
    if backend == "pytorch3d":
        return _rasterize_pytorch3d(verts_px.detach(), triangles, h, w, cull_backfaces)
    if backend != "torch":
        raise ValueError(f"backend: expected 'torch', 'pytorch3d' or 'auto', found {backend!r}")
    with torch.no_grad():
        return _rasterize_torch(verts_px.detach(), triangles, h, w, cull_backfaces)


def _min3(t: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.minimum(t[:, 0], t[:, 1]), t[:, 2])


def _max3(t: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.maximum(t[:, 0], t[:, 1]), t[:, 2])


def _rasterize_torch(verts: torch.Tensor, tris: torch.Tensor, h: int, w: int, cull: bool) -> Fragments:
    b, n_f = verts.shape[0], tris.shape[0]
    dev = verts.device
    v64 = verts.to(torch.float64)
    # snap per vertex (6x fewer than per triangle corner); a vertex beyond the guard snaps to 0 and drops its
    # triangles below (int64 overflow otherwise)
    v_in = (v64[..., :2].abs() <= _GUARD).all(-1)  # (B, V)
    snapped = torch.round(torch.where(v_in[..., None], v64[..., :2], 0.0) * _SUB).to(torch.int64)  # (B, V, 2)
    flat = tris.reshape(-1)
    x, y = (snapped[..., k].contiguous().index_select(1, flat).view(b * n_f, 3) for k in range(2))  # (N, 3)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])

    # pixel j's centre is at j * SUB + HALF: j in [ceil((min - HALF) / SUB), floor((max - HALF) / SUB)]
    jmin = (-torch.div(_HALF - _min3(x), _SUB, rounding_mode="floor")).clamp(min=0)
    jmax = torch.div(_max3(x) - _HALF, _SUB, rounding_mode="floor").clamp(max=w - 1)
    imin = (-torch.div(_HALF - _min3(y), _SUB, rounding_mode="floor")).clamp(min=0)
    imax = torch.div(_max3(y) - _HALF, _SUB, rounding_mode="floor").clamp(max=h - 1)
    keep = (area < 0 if cull else area != 0) & (jmin <= jmax) & (imin <= imax)  # most cover no pixel centre
    if not bool(v_in.all()):
        keep &= v_in.index_select(1, flat).view(b * n_f, 3).all(1)
    gid = keep.nonzero().squeeze(1)  # compact first: culled and off-screen triangles cost nothing below
    x, y, area, jmin, jmax, imin, imax = (t.index_select(0, gid) for t in (x, y, area, jmin, jmax, imin, imax))
    corner = tris.index_select(0, gid % max(n_f, 1))  # (K, 3) vertex ids
    z = v64[..., 2].reshape(-1).index_select(0, (torch.div(gid, n_f, rounding_mode="floor")[:, None] * verts.shape[1]
                                                 + corner).reshape(-1)).view(-1, 3)

    buf = torch.full((b * h * w,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=dev)
    ints, floats = _triangle_setup(gid, x, y, area, z, jmin, imin, jmax - jmin + 1, imax - imin + 1, n_f, h, w)
    if ints.shape[1]:
        _scatter_candidates(buf, ints, floats, w)
    return _fragments_from_winners(buf, v64, tris, b, h, w)


# columns of the per-triangle integer table built by _triangle_setup
_W0, _AX, _BY, _BW, _BH, _PIX0, _GID = 0, 3, 6, 9, 10, 11, 12


def _triangle_setup(gid, x, y, area, z, jmin, imin, bw, bh, n_f, h, w) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge functions, depth planes and bbox of the kept triangles, sorted by bbox-size group.

    Inputs are per kept triangle (K,): global triangle id gid (batch * F + triangle), snapped corners x, y (K, 3)
    int64, area (K,), z (K, 3) float64, bbox origin / size (K,). Returns ints (13, K) int64, one row per quantity
    (rows, not columns: stacked and sliced contiguously): edge values at the bbox's first pixel centre (top-left bias
    folded in), their x / y steps per pixel, bbox width / height, first pixel's flat index, global triangle id; and
    floats (3, K) float32: depth at the first pixel centre, d/dx, d/dy.
    """
    sgn = torch.sign(area)
    area_abs = (area * sgn).to(torch.float64)
    ox = jmin * _SUB + _HALF  # first pixel centre of the bbox, sub-pixel units
    oy = imin * _SUB + _HALF
    w0s, ax, by = [], [], []
    for a, c in ((1, 2), (2, 0), (0, 1)):  # edge opposite vertex k: (a -> c)
        ea = (y[:, a] - y[:, c]) * sgn  # d w / d x   (sub-pixel units)
        eb = (x[:, c] - x[:, a]) * sgn  # d w / d y
        owned = (ea > 0) | ((ea == 0) & (eb > 0))  # top-left rule: left edges, and top horizontal edges
        w0s.append(ea * (ox - x[:, a]) + eb * (oy - y[:, a]) + owned.to(torch.int64))
        ax.append(ea * _SUB)
        by.append(eb * _SUB)
    # depth plane per triangle (float64 setup, float32 per candidate): z = z0 + dzdx * dx + dzdy * dy
    zo = sum(w0s[k].to(torch.float64) * z[:, k] for k in range(3)) / area_abs
    dzdx = sum(ax[k].to(torch.float64) * z[:, k] for k in range(3)) / area_abs
    dzdy = sum(by[k].to(torch.float64) * z[:, k] for k in range(3)) / area_abs
    pix0 = torch.div(gid, n_f, rounding_mode="floor") * (h * w) + imin * w + jmin
    order = torch.argsort(_size_bucket(bw) * (1 << 20) + _size_bucket(bh))
    ints = torch.stack([*w0s, *ax, *by, bw, bh, pix0, gid], 0).index_select(1, order)
    floats = torch.stack([zo, dzdx, dzdy], 0).float().index_select(1, order)
    return ints, floats


def _scatter_candidates(buf: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, w: int) -> None:
    """Enumerate each triangle's bbox pixels by size group and chunk, z-test with scatter_reduce(amax)."""
    ew, eh = _size_bucket(ints[_BW]), _size_bucket(ints[_BH])
    groups, counts = torch.unique_consecutive(ew * (1 << 20) + eh, return_counts=True)
    start = 0
    for g, cnt in zip(groups.tolist(), counts.tolist(), strict=True):
        gw, gh = g >> 20, g & ((1 << 20) - 1)
        step = max(1, _MAX_CANDIDATES // (gw * gh))
        for s in range(start, start + cnt, step):
            e = min(s + step, start + cnt)
            _scatter_group(buf, ints[:, s:e], floats[:, s:e], gw, gh, w)
        start += cnt


def _scatter_group(buf: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, gw: int, gh: int, w: int) -> None:
    """One chunk of triangles (ints (13, n), floats (3, n)) whose bboxes fit gw x gh: coverage test on the grid,
    then z-buffer update."""
    dev = buf.device
    dx = torch.arange(gw, device=dev, dtype=torch.int64).view(1, 1, gw)
    dy = torch.arange(gh, device=dev, dtype=torch.int64).view(1, gh, 1)
    col = ints.unsqueeze(-1).unsqueeze(-1)  # (13, n, 1, 1)
    inside = (dx < col[_BW]) & (dy < col[_BH])
    for k in range(3):
        inside &= (col[_W0 + k] + col[_AX + k] * dx + col[_BY + k] * dy) > 0
    t, iy, ix = inside.nonzero(as_tuple=True)
    if t.numel() == 0:
        return
    sel_f = floats[:, t]  # (3, m): only what the z-test needs of each candidate
    z = sel_f[0] + sel_f[1] * ix.float() + sel_f[2] * iy.float()
    key = (_ordered_int32(z) << _ID_BITS) + ints[_GID][t]
    buf.scatter_reduce_(0, ints[_PIX0][t] + iy * w + ix, key, reduce="amax", include_self=True)


def _fragments_from_winners(buf: torch.Tensor, v64: torch.Tensor, tris: torch.Tensor, b: int, h: int,
                            w: int) -> Fragments:
    """Decode packed z-buffer keys (B*H*W,) and recompute barycentrics / depth from float vertices.

    v64: (B, V, 3) float64 vertices. Background entries hold int64 min.
    """
    n_f = tris.shape[0]
    covered = buf != torch.iinfo(torch.int64).min
    pix = covered.nonzero().squeeze(1)
    gid = buf[pix] & _ID_MASK
    vid = torch.div(gid, max(n_f, 1), rounding_mode="floor")[:, None] * v64.shape[1] + tris[gid % max(n_f, 1)]
    corners = v64.reshape(-1, 3)[vid]  # (N, 3, 3)
    px = (pix % w).to(torch.float64) + 0.5
    py = (torch.div(pix, w, rounding_mode="floor") % h).to(torch.float64) + 0.5
    bary = _barycentric(corners[..., :2], torch.stack([px, py], -1))
    depth = (bary * corners[..., 2]).sum(-1)

    tri_id = torch.full((b * h * w,), -1, dtype=torch.int64, device=buf.device)
    tri_id[pix] = gid % max(n_f, 1)
    bary_img = torch.zeros((b * h * w, 3), dtype=torch.float32, device=buf.device)
    bary_img[pix] = bary.float()
    depth_img = torch.full((b * h * w,), -math.inf, dtype=torch.float32, device=buf.device)
    depth_img[pix] = depth.float()
    return Fragments(tri_id.view(b, h, w), bary_img.view(b, h, w, 3), depth_img.view(b, h, w), tris)


def _barycentric(corners_xy: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Barycentrics of points p (..., 2) w.r.t. triangles (..., 3, 2) -> (..., 3). Zero-area -> NaN-free 1/3s."""
    a, b_, c = corners_xy[..., 0, :], corners_xy[..., 1, :], corners_xy[..., 2, :]

    def edge(p0, p1, q):
        d, e = p1 - p0, q - p0
        return d[..., 0] * e[..., 1] - d[..., 1] * e[..., 0]

    area = edge(a, b_, c)
    lam = torch.stack([edge(b_, c, p), edge(c, a, p), edge(a, b_, p)], -1)
    ok = area.abs() > 0
    return torch.where(ok[..., None], lam / torch.where(ok, area, 1.0)[..., None], 1.0 / 3.0)


# ------------------------------------------------------------------------------------ pytorch3d
def _pytorch3d_available() -> bool:
    try:
        import pytorch3d  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterize_pytorch3d(verts: torch.Tensor, tris: torch.Tensor, h: int, w: int, cull: bool) -> Fragments:
    """Adapter: pytorch3d's rasterize_meshes picks the visible triangle, we recompute bary/depth ourselves."""
    try:
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
        from pytorch3d.structures import Meshes
    except ImportError as err:
        raise ImportError("backend='pytorch3d' needs pytorch3d (https://github.com/facebookresearch/pytorch3d, "
                          "`pip install -e .[pytorch3d]`); use backend='torch' or 'auto' instead") from err
    b, n_f = verts.shape[0], tris.shape[0]
    # pytorch3d NDC: +x left, +y up, scaled by the shorter side; smaller z is nearer and must be > 0.
    s = float(min(h, w))
    z = verts[..., 2]
    z_ndc = (z.amax(1, keepdim=True) - z) + 1.0
    ndc = torch.stack([(w - 2.0 * verts[..., 0]) / s, (h - 2.0 * verts[..., 1]) / s, z_ndc], -1).float()
    if cull:  # cull ourselves with this module's convention, per batch item
        front = signed_area_px(verts, tris) < 0
        keep_ids = [front[i].nonzero().squeeze(1) for i in range(b)]
    else:
        keep_ids = [torch.arange(n_f, device=verts.device) for _ in range(b)]
    faces = [tris[k] for k in keep_ids]
    meshes = Meshes(verts=list(ndc), faces=faces)
    max_faces = max(1, max(len(k) for k in keep_ids))  # no coarse-bin overflow (dense face meshes)
    pix_to_face, _, _, _ = rasterize_meshes(meshes, image_size=(h, w), blur_radius=0.0, faces_per_pixel=1,
                                            max_faces_per_bin=max_faces, perspective_correct=False,
                                            clip_barycentric_coords=False, cull_backfaces=False)
    packed = pix_to_face[..., 0]  # (B, H, W) index into the packed faces, -1 background
    ids = torch.cat(keep_ids)
    batch = torch.arange(b, device=verts.device).view(b, 1, 1)
    local = ids[packed.clamp(min=0)]
    gid = torch.where(packed >= 0, batch * n_f + local, -1)
    buf = torch.where(gid >= 0, gid, torch.iinfo(torch.int64).min).reshape(-1)
    return _fragments_from_winners(buf, verts.to(torch.float64), tris, b, h, w)


# ------------------------------------------------------------------------------- interpolation
def interpolate(fragments: Fragments, attrs: torch.Tensor, triangles: torch.Tensor | None = None) -> torch.Tensor:
    """Interpolate per-vertex attributes at every pixel: attrs (B, V, C) or (V, C) -> (B, H, W, C).

    Uses the fragments' barycentrics over ``triangles`` (default: the ones rasterised). Background
    pixels are 0. Differentiable w.r.t. ``attrs``; a (1, V, C) batch is broadcast.
    """
    _check_fragments(fragments)
    tris = fragments.triangles if triangles is None else triangles.to(fragments.tri_id.device, torch.int64)
    b = fragments.tri_id.shape[0]
    if attrs.ndim == 2:
        attrs = attrs.unsqueeze(0)
    if attrs.ndim != 3 or attrs.shape[0] not in (1, b):
        raise ValueError(f"attrs: expected (V, C) or ({b}, V, C), found {tuple(attrs.shape)}")
    if tris.numel() and int(tris.max()) >= attrs.shape[1]:
        raise ValueError(f"attrs: has {attrs.shape[1]} vertices but triangles index up to {int(tris.max())}")
    attrs = attrs.to(tris.device).expand(b, -1, -1)
    valid = fragments.tri_id >= 0
    vid = tris[fragments.tri_id.clamp(min=0)]  # (B, H, W, 3)
    bidx = torch.arange(b, device=vid.device).view(b, 1, 1, 1)
    vals = attrs[bidx, vid]  # (B, H, W, 3, C)
    bary = fragments.bary.to(attrs.dtype)
    out = (bary.unsqueeze(-1) * vals).sum(-2)
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def render_texture(fragments: Fragments, triangles: torch.Tensor, uv: torch.Tensor,
                   texture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a UV texture onto rasterised meshes (the paper's render step for its rendering losses).

    fragments: from :func:`rasterize` (B, H, W). triangles: (F, 3). uv: (V, 2) or (B, V, 2) in
    [0, 1], v up. texture: (B, C, U, U) (or (1, C, U, U), broadcast) float.
    Returns image (B, C, H, W) (0 on background) and mask (B, 1, H, W) float in {0, 1}, of the
    texture's dtype. Bilinear ``grid_sample`` with ``align_corners=False`` and border padding;
    differentiable w.r.t. ``texture`` (and ``uv``).
    """
    _check_fragments(fragments)
    b = fragments.tri_id.shape[0]
    if texture.ndim != 4 or texture.shape[0] not in (1, b) or not texture.is_floating_point():
        raise ValueError(f"texture: expected a ({b}, C, U, U) float tensor, found {tuple(texture.shape)} "
                         f"{texture.dtype}")
    if uv.shape[-1] != 2:
        raise ValueError(f"uv: expected (V, 2) or (B, V, 2), found {tuple(uv.shape)}")
    tex_uv = interpolate(fragments, uv.to(texture.device, texture.dtype), triangles)  # (B, H, W, 2)
    grid = torch.stack([2.0 * tex_uv[..., 0] - 1.0, 1.0 - 2.0 * tex_uv[..., 1]], -1)
    img = F.grid_sample(texture.expand(b, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    mask = fragments.mask.unsqueeze(1).to(texture.dtype)
    return img * mask, mask


# ----------------------------------------------------------------------------------- visibility
def _surface_depth(fragments: Fragments, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of the visible surface at image points pts (B, N, 2) -> (depth (B, N) float64, in_image (B, N)).

    The z-buffer at a point is read as the *lowest* depth among the (up to) four pixel centres
    around it (the 2x2 centres whose square contains the point); background or outside-the-image
    centres read -inf (nothing occludes there). For a surface that is planar over that square this
    is <= its depth at the point, whatever its slope, so a point on the visible surface always
    passes the occlusion test; a point behind an occluder is caught unless it lies within ~1 px of
    the occluder's silhouette or of the mesh's outline. ``in_image``: the point lies in [0, W) x [0, H).
    """
    h, w = fragments.image_size
    b = pts.shape[0]
    x, y = pts[..., 0].to(torch.float64), pts[..., 1].to(torch.float64)
    in_img = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    j0 = torch.floor(x - 0.5).to(torch.int64)
    i0 = torch.floor(y - 0.5).to(torch.int64)
    depth = fragments.depth.reshape(b, h * w)
    best = torch.full(x.shape, math.inf, dtype=torch.float64, device=pts.device)
    for di in (0, 1):
        for dj in (0, 1):
            i, j = i0 + di, j0 + dj
            ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
            d = depth.gather(1, (i.clamp(0, h - 1) * w + j.clamp(0, w - 1))).to(torch.float64)
            best = torch.minimum(best, torch.where(ok, d, -math.inf))
    return best, in_img


def vertex_visibility(verts_px: torch.Tensor, triangles: torch.Tensor, fragments: Fragments,
                      depth_tol: float | torch.Tensor | None = None) -> torch.Tensor:
    """Which vertices the camera sees: (B, V, 3), (F, 3), Fragments (B, H, W) -> (B, V) bool.

    A vertex is visible when it projects inside the image, its z is >= the visible surface's depth
    at its position minus ``depth_tol`` (the z-buffer read as the lowest of the four pixel centres
    around the point, which is exact for locally planar surfaces of any slope; background and the
    mesh's outline do not occlude), and it belongs to at least one front-facing triangle. ``depth_tol``: a float, a
    (B,) tensor, or None for :func:`default_depth_tol`.
    """
    triangles = _check_mesh(verts_px, triangles)
    _check_fragments(fragments, verts_px.shape[0])
    with torch.no_grad():
        v = verts_px.detach()
        b, n_v = v.shape[:2]
        tol = _as_tol(depth_tol, v)
        surf, in_img = _surface_depth(fragments, v[..., :2])
        unoccluded = v[..., 2].to(torch.float64) >= surf - tol[:, None]
        front = (signed_area_px(v, triangles) < 0).to(v.dtype)  # (B, F)
        n_front = torch.zeros(b, n_v, dtype=v.dtype, device=v.device)
        for k in range(3):
            n_front.index_add_(1, triangles[:, k], front)
        return in_img & unoccluded & (n_front > 0)


def _as_tol(depth_tol, v: torch.Tensor) -> torch.Tensor:
    if depth_tol is None:
        return default_depth_tol(v).to(torch.float64)
    tol = torch.as_tensor(depth_tol, dtype=torch.float64, device=v.device)
    if tol.ndim == 0:
        tol = tol.expand(v.shape[0])
    if tol.shape != (v.shape[0],):
        raise ValueError(f"depth_tol: expected a float or a ({v.shape[0]},) tensor, found {tuple(tol.shape)}")
    return tol


# -------------------------------------------------------------------------------------- unwrap
def uv_fragments(uv: torch.Tensor, triangles: torch.Tensor, uv_size: int) -> Fragments:
    """Rasterise the UV layout itself: uv (V, 2) in [0, 1] (v up), triangles (F, 3) -> Fragments (1, U, U).

    No culling (the layout may be mirrored); texel (i, j) gets the triangle containing its
    centre and the barycentrics of that centre. Depends only on the layout: compute it once.
    """
    if uv.ndim != 2 or uv.shape[1] != 2 or not uv.is_floating_point():
        raise ValueError(f"uv: expected a (V, 2) float tensor, found {tuple(uv.shape)} {uv.dtype}")
    pix = uv_to_pixel(uv.detach().to(torch.float64), int(uv_size))
    verts = torch.cat([pix, torch.zeros_like(pix[:, :1])], 1).unsqueeze(0)
    return rasterize(verts, triangles, (uv_size, uv_size), cull_backfaces=False)


def unwrap_to_uv(image: torch.Tensor, verts_px: torch.Tensor, triangles: torch.Tensor, uv: torch.Tensor,
                 uv_size: int, depth_tol: float | torch.Tensor | None = None, fragments: Fragments | None = None,
                 uv_frags: Fragments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> UV: read each texel's colour from the photo where the camera sees it.

    image: (B, C, H, W) float. verts_px: (B, V, 3) the fitted mesh in the image's pixel
    coordinates. triangles: (F, 3). uv: (V, 2) in [0, 1], v up. uv_size: U.
    Each texel covered by the layout is mapped through its UV triangle's barycentrics to its image
    position and depth; it is visible when its triangle is front-facing in the image, the point is
    inside the image, and its depth >= the visible surface's depth there (the lowest z-buffer value
    of the four pixel centres around the point, see :func:`vertex_visibility`) minus ``depth_tol``
    (float, (B,) tensor, or None for :func:`default_depth_tol`: 1% of the mesh's depth extent).
    The colour is sampled bilinearly (``grid_sample``, ``align_corners=False``, border padding).

    fragments: optional image-space :func:`rasterize` result (B, H, W) to reuse; uv_frags:
    optional :func:`uv_fragments` result to reuse. Returns uv_image (B, C, U, U) (0 where not
    visible) and uv_mask (B, 1, U, U) bool. Differentiable w.r.t. ``image``.
    """
    triangles = _check_mesh(verts_px, triangles)
    b = verts_px.shape[0]
    if image.ndim != 4 or image.shape[0] != b or not image.is_floating_point():
        raise ValueError(f"image: expected a ({b}, C, H, W) float tensor, found {tuple(image.shape)} {image.dtype}")
    if uv.ndim != 2 or uv.shape != (verts_px.shape[1], 2):
        raise ValueError(f"uv: expected ({verts_px.shape[1]}, 2) (one per vertex), found {tuple(uv.shape)}")
    h, w = image.shape[2:]
    u_sz = int(uv_size)
    uv = uv.to(verts_px.device)
    if fragments is None:
        fragments = rasterize(verts_px, triangles, (h, w), cull_backfaces=True)
    elif fragments.image_size != (h, w):
        raise ValueError(f"fragments: rasterised at {fragments.image_size}, the image is {(h, w)}")
    _check_fragments(fragments, b)
    if uv_frags is None:
        uv_frags = uv_fragments(uv, triangles, u_sz)
    elif uv_frags.image_size != (u_sz, u_sz):
        raise ValueError(f"uv_frags: rasterised at {uv_frags.image_size}, expected ({u_sz}, {u_sz})")

    texel = (uv_frags.tri_id[0] >= 0).reshape(-1).nonzero().squeeze(1)  # (N,)
    t = uv_frags.tri_id[0].reshape(-1)[texel]
    lam = uv_frags.bary[0].reshape(-1, 3)[texel].to(verts_px.dtype)  # (N, 3)
    corners = verts_px[:, triangles[t]]  # (B, N, 3, 3)
    pos = (lam[None, :, :, None] * corners).sum(2)  # (B, N, 3), differentiable w.r.t. verts
    with torch.no_grad():
        v = verts_px.detach()
        used, texel_tri = torch.unique(t, return_inverse=True)  # only the triangles some texel lies in
        front = (signed_area_px(v, triangles[used]) < 0)[:, texel_tri]  # (B, N)
        surf, in_img = _surface_depth(fragments, pos[..., :2].detach())
        vis = front & in_img & (pos[..., 2].detach().to(torch.float64) >= surf - _as_tol(depth_tol, v)[:, None])
    grid = torch.stack([2.0 * pos[..., 0] / w - 1.0, 2.0 * pos[..., 1] / h - 1.0], -1).to(image.dtype)
    vals = F.grid_sample(image, grid.unsqueeze(2), mode="bilinear", padding_mode="border",
                         align_corners=False)[..., 0]  # (B, C, N)
    vals = vals * vis.unsqueeze(1).to(image.dtype)
    out = image.new_zeros(b, image.shape[1], u_sz * u_sz)
    out[:, :, texel] = vals
    mask = torch.zeros(b, u_sz * u_sz, dtype=torch.bool, device=image.device)
    mask[:, texel] = vis
    return out.view(b, -1, u_sz, u_sz), mask.view(b, 1, u_sz, u_sz)
