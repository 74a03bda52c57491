"""Renderer tests: known scenes rendered and compared with analytic answers (CPU, tiny sizes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.facemodel import REGION_NAMES, FaceModel
from common.render import (
    Fragments,
    interpolate,
    rasterize,
    render_texture,
    signed_area_px,
    unwrap_to_uv,
    uv_fragments,
    vertex_visibility,
)
from common.uvtools import region_uv_mask, texel_centres, texel_mirror_index, uv_to_texel, uv_vertex_attribute_image

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------ scenes
def _brute_coverage(p: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixels whose centre is strictly inside triangle p (3, 2): (H, W) bool (float64, generic positions)."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5

    def edge(a, b):
        return (b[0] - a[0]) * (yy - a[1]) - (b[1] - a[1]) * (xx - a[0])

    e = np.stack([edge(p[1], p[2]), edge(p[2], p[0]), edge(p[0], p[1])])
    return (e > 0).all(0) | (e < 0).all(0)


def _grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Regular grid: (ny*nx, 2) (col, row) indices with row 0 at the top, and (2 (nx-1)(ny-1), 3) triangles
    counter-clockwise seen from +z in a y-up frame (i.e. front-facing once rows map to image y)."""
    idx = np.arange(nx * ny).reshape(ny, nx)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tris = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    jj, ii = np.meshgrid(np.arange(nx), np.arange(ny))
    return np.stack([jj, ii], -1).reshape(-1, 2).astype(np.float64), tris.astype(np.int64)


def _orient_outward(v: np.ndarray, tris: np.ndarray, centre: np.ndarray) -> np.ndarray:
    a, b, c = v[tris[:, 0]], v[tris[:, 1]], v[tris[:, 2]]
    flip = (np.cross(b - a, c - a) * ((a + b + c) / 3 - centre)).sum(1) < 0
    tris = tris.copy()
    tris[flip] = tris[flip][:, [0, 2, 1]]
    return tris


def _cube() -> tuple[np.ndarray, np.ndarray]:
    """Unit cube centred at 0: 8 vertices, 12 outward triangles; triangles 2k, 2k+1 form face k."""
    v = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return v, _orient_outward(v, tris, np.zeros(3))


def _sphere(n_lat: int = 24, n_lon: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere: poles + (n_lat - 1) rings, outward triangles."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]])
    tris = []
    r = lambda i, j: 1 + i * n_lon + j % n_lon  # noqa: E731
    for j in range(n_lon):
        tris.append((0, r(0, j), r(0, j + 1)))
        tris.append((len(v) - 1, r(n_lat - 2, j), r(n_lat - 2, j + 1)))
        for i in range(n_lat - 2):
            tris += [(r(i, j), r(i + 1, j), r(i + 1, j + 1)), (r(i, j), r(i + 1, j + 1), r(i, j + 1))]
    return v, _orient_outward(v, np.array(tris), np.zeros(3))


def _to_px(v: np.ndarray, rot: np.ndarray, scale: float, centre: float, size: float) -> torch.Tensor:
    """Model (y up) -> image pixels (y down) with scaled orthographic projection: (1, V, 3) float32."""
    x = scale * v @ rot.T
    return torch.tensor(np.stack([centre + x[:, 0], size - (centre + x[:, 1]), x[:, 2]], -1),
                        dtype=torch.float32)[None]


def _rot(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rx @ ry


def _cap(n: int = 33, radius: float = 36.0, size: int = 96, yaw: float = 0.0):
    """Sphere cap (z > 0 part of a sphere, |xy| <= 0.93 R) with a planar UV layout u = 0.5 + 0.45 x / R."""
    ij, tris = _grid(n, n)
    xy = np.stack([ij[:, 0] / (n - 1) * 2 - 1, 1 - ij[:, 1] / (n - 1) * 2], -1)  # y up
    r = np.linalg.norm(xy, axis=1)
    tris = tris[(r[tris] <= 0.93).all(1)]
    v = np.concatenate([xy, np.sqrt(np.clip(1 - r**2, 0, None))[:, None]], 1)
    uv = torch.tensor(0.5 + 0.45 * xy, dtype=torch.float32)
    return _to_px(v, _rot(yaw, 0.0), radius, size / 2, size), torch.from_numpy(tris), uv


def _tri(pts, z=(1.0, 1.0, 1.0)):
    v = torch.tensor([[list(p) + [zz] for p, zz in zip(pts, z, strict=True)]], dtype=torch.float32)
    return v, torch.tensor([[0, 1, 2]])


# ----------------------------------------------------------------------------- single triangle
# (x, y) in image pixels; counter-clockwise as displayed (row 0 on top) = in the y-up frame: front-facing
TRI = ((10.3, 5.2), (20.4, 40.9), (50.7, 12.1))


def test_single_triangle_coverage_matches_area_and_brute_force():
    p = np.array(TRI)
    v, t = _tri(TRI)
    frags = rasterize(v, t, (48, 64))
    count = int(frags.mask.sum())
    e1, e2 = p[1] - p[0], p[2] - p[0]
    area = 0.5 * abs(e1[0] * e2[1] - e1[1] * e2[0])
    perimeter = sum(np.linalg.norm(p[k] - p[k - 1]) for k in range(3))
    assert abs(count - area) <= 0.5 * perimeter
    assert np.array_equal(frags.mask[0].numpy(), _brute_coverage(p, 48, 64))
    assert set(frags.tri_id.unique().tolist()) == {-1, 0}
    assert torch.isinf(frags.depth[~frags.mask]).all() and (frags.depth[~frags.mask] < 0).all()


def test_barycentrics_reproduce_pixel_centres_and_planar_depth():
    p = np.array(TRI)
    z = 0.3 * p[:, 0] - 0.7 * p[:, 1] + 5.0  # a plane z = 0.3 x - 0.7 y + 5
    v, t = _tri(TRI, z)
    frags = rasterize(v, t, (48, 64))
    i, j = frags.mask[0].nonzero(as_tuple=True)
    b = frags.bary[0, i, j].double()
    assert torch.allclose(b.sum(1), torch.ones(len(b), dtype=torch.float64), atol=1e-6)
    xy = b @ torch.tensor(p)
    assert torch.allclose(xy[:, 0], j.double() + 0.5, atol=1e-4)
    assert torch.allclose(xy[:, 1], i.double() + 0.5, atol=1e-4)
    plane = 0.3 * (j.double() + 0.5) - 0.7 * (i.double() + 0.5) + 5.0
    assert torch.allclose(frags.depth[0, i, j].double(), plane, atol=1e-4)


def test_shared_edges_are_neither_dropped_nor_double_counted():
    """A fan and a grid with every vertex on a pixel centre: each pixel covered exactly once (top-left rule)."""
    ij, tris = _grid(4, 4)
    verts = 6.5 + 5.0 * ij  # vertices on pixel centres 6.5 .. 21.5
    centre = len(verts)
    verts = np.concatenate([verts, [[14.0 + 0.5, 14.0 + 0.5]]])  # extra vertex on a centre, fan in the middle quad
    mid = [5, 6, 10, 9]  # corners of the central quad (row 1..2, col 1..2), order around it
    keep = [k for k in range(len(tris)) if not set(tris[k]) <= set(mid)]
    fan = [(mid[k], centre, mid[(k + 1) % 4]) for k in range(4)]
    tris = np.concatenate([tris[keep], fan])
    v = torch.tensor(np.concatenate([verts, np.ones((len(verts), 1))], 1), dtype=torch.float32)
    counts = np.zeros((32, 32), np.int64)
    for f in range(len(tris)):
        one = torch.tensor(tris[f:f + 1])
        counts += rasterize(v[None], one, (32, 32), cull_backfaces=False).mask[0].numpy()
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    # closed at the top/left boundary, open at the bottom/right
    expected = (xx >= 6.5) & (xx < 21.5) & (yy >= 6.5) & (yy < 21.5)
    assert counts.max() == 1
    assert np.array_equal(counts == 1, expected)
    # and the whole mesh in one call covers the same pixels
    assert np.array_equal(rasterize(v[None], torch.tensor(tris), (32, 32), cull_backfaces=False).mask[0].numpy(),
                          expected)


def test_degenerate_offscreen_and_nan():
    v = torch.tensor([[[5.0, 5.0, 0], [10.0, 10.0, 0], [15.0, 15.0, 0],  # collinear
                       [-50.0, -50.0, 0], [-40.0, -30.0, 0], [-20.0, -45.0, 0],  # off-screen
                       [-1e7, 3.0, 0], [30.0, 1e7, 0], [30.0, 3.0, 0]]])  # beyond the guard band
    t = torch.arange(9).view(3, 3)
    frags = rasterize(v, t, (32, 32), cull_backfaces=False)
    assert not frags.mask.any()
    # partly off-screen: clipped correctly
    p = np.array([(-10.3, -4.2), (12.6, 40.1), (40.7, 6.9)])
    v2, t2 = _tri(p)
    assert np.array_equal(rasterize(v2, t2, (24, 24), cull_backfaces=False).mask[0].numpy(),
                          _brute_coverage(p, 24, 24))
    bad = v2.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rasterize(bad, t2, (24, 24))
    with pytest.raises(ValueError, match="indices"):
        rasterize(v2, torch.tensor([[0, 1, 3]]), (24, 24))


# ------------------------------------------------------------------------------------ depth, culling
def _quad(x0, y0, x1, y1, z):
    """Two front-facing triangles covering [x0, x1] x [y0, y1] at depth z."""
    v = [(x0, y0, z), (x0, y1, z), (x1, y1, z), (x1, y0, z)]  # counter-clockwise as displayed
    return v, [(0, 1, 2), (0, 2, 3)]


@pytest.mark.parametrize("near_first", [True, False])
def test_overlapping_quads_nearer_wins_in_both_orders(near_first):
    near_v, near_t = _quad(10.2, 10.2, 40.2, 40.2, 2.0)
    far_v, far_t = _quad(25.2, 25.2, 55.2, 55.2, 1.0)
    if near_first:
        v, t = near_v + far_v, near_t + [(a + 4, b + 4, c + 4) for a, b, c in far_t]
        near_ids = {0, 1}
    else:
        v, t = far_v + near_v, far_t + [(a + 4, b + 4, c + 4) for a, b, c in near_t]
        near_ids = {2, 3}
    verts, tris = torch.tensor([v], dtype=torch.float32), torch.tensor(t)
    assert (signed_area_px(verts, tris) < 0).all()  # all front-facing
    frags = rasterize(verts, tris, (64, 64))
    overlap = frags.tri_id[0, 26:40, 26:40]  # pixel centres 26.5 .. 39.5 are inside both quads
    assert set(overlap.unique().tolist()) == near_ids
    assert (frags.depth[0, 26:40, 26:40] == 2.0).all()
    only_far = frags.tri_id[0, 45:55, 45:55]
    assert set(only_far.unique().tolist()) == {0, 1, 2, 3} - near_ids
    assert int(frags.mask.sum()) == 30 * 30 * 2 - 15 * 15


def test_backface_culling():
    v, t = _tri(TRI)
    back = t[:, [0, 2, 1]]
    assert signed_area_px(v, t).item() < 0 < signed_area_px(v, back).item()
    assert rasterize(v, t, (48, 64)).mask.sum() > 0
    assert rasterize(v, back, (48, 64)).mask.sum() == 0
    kept = rasterize(v, back, (48, 64), cull_backfaces=False)
    assert torch.equal(kept.mask, rasterize(v, t, (48, 64)).mask)
    # barycentrics follow the given vertex order
    assert torch.allclose(kept.bary[kept.mask][:, [0, 2, 1]], rasterize(v, t, (48, 64)).bary[kept.mask], atol=1e-6)


def test_cube_visible_faces_and_projected_areas():
    v, tris = _cube()
    rot = _rot(math.radians(30), math.radians(20))
    scale, size = 40.0, 96
    verts = _to_px(v, rot, scale, size / 2, size)
    frags = rasterize(verts, torch.from_numpy(tris), (size, size))
    face = torch.where(frags.mask, frags.tri_id // 2, -1)[0].numpy()
    # face normals in the camera (y-up) frame: front-facing when n_z > 0; projected area = s^2 n_z
    normals = np.array([np.cross(v[tris[2 * k, 1]] - v[tris[2 * k, 0]], v[tris[2 * k, 2]] - v[tris[2 * k, 0]])
                        for k in range(6)])
    nz = (normals @ rot.T)[:, 2]
    visible = set(np.nonzero(nz > 0)[0].tolist())
    assert len(visible) == 3
    assert set(np.unique(face[face >= 0]).tolist()) == visible
    for k in visible:
        expected = scale**2 * nz[k]
        assert abs((face == k).sum() - expected) <= 0.5 * 4 * scale, (k, (face == k).sum(), expected)
    # total silhouette: projected area of the cube = s^2 (|n_z| summed over the visible faces)
    assert abs(int(frags.mask.sum()) - scale**2 * nz[nz > 0].sum()) <= 0.5 * 6 * scale


# ------------------------------------------------------------------------------------ texturing
def _square_mesh(size=32):
    """A front-facing square covering pixels 4..27, uv from 0.2 to 0.8 (v up, so image top = v 0.8)."""
    v = torch.tensor([[[4.0, 4.0, 0], [28.0, 4.0, 0], [28.0, 28.0, 0], [4.0, 28.0, 0]]])
    t = torch.tensor([[0, 2, 1], [0, 3, 2]])
    uv = torch.tensor([[0.2, 0.8], [0.8, 0.8], [0.8, 0.2], [0.2, 0.2]])
    return v, t, uv, rasterize(v, t, (size, size))


def test_render_texture_constant_and_linear_exact():
    v, t, uv, frags = _square_mesh()
    const = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    img, mask = render_texture(frags, t, uv, const)
    assert img.shape == (1, 3, 32, 32) and mask.shape == (1, 1, 32, 32)
    assert int(mask.sum()) == 24 * 24
    assert torch.allclose(img[0][:, mask[0, 0] > 0], torch.tensor([[0.2], [0.5], [0.9]]).expand(3, 576), atol=1e-6)
    assert (img[0][:, mask[0, 0] == 0] == 0).all()
    # texture linear in (u, v): texel (i, j) holds (u, v) of its centre -> bilinear sampling is exact
    u_tex = 16
    c = torch.from_numpy(texel_centres(u_tex)).float().permute(2, 0, 1)[None]  # (1, 2, U, U)
    img, mask = render_texture(frags, t, uv, c)
    i, j = mask[0, 0].nonzero(as_tuple=True)
    x, y = j.float() + 0.5, i.float() + 0.5
    assert torch.allclose(img[0, 0, i, j], 0.2 + 0.6 * (x - 4) / 24, atol=1e-5)
    assert torch.allclose(img[0, 1, i, j], 0.8 - 0.6 * (y - 4) / 24, atol=1e-5)


def test_texture_gradient_nonzero_exactly_at_sampled_texels():
    v, t, uv, frags = _square_mesh()
    u_tex = 20
    tex = torch.rand(1, 1, u_tex, u_tex, requires_grad=True)
    img, _ = render_texture(frags, t, uv, tex)
    img.sum().backward()
    # expected: the bilinear footprint of each pixel's uv (all uv within [0.2, 0.8], no border clamping)
    i, j = frags.mask[0].nonzero(as_tuple=True)
    uvp = interpolate(frags, uv)[0, i, j].double().numpy()
    fx, fy = uvp[:, 0] * u_tex - 0.5, (1 - uvp[:, 1]) * u_tex - 0.5
    expected = np.zeros((u_tex, u_tex), bool)
    for dx in (0, 1):
        for dy in (0, 1):
            wx = 1 - np.abs(fx - (np.floor(fx) + dx))
            wy = 1 - np.abs(fy - (np.floor(fy) + dy))
            ok = (wx * wy) > 1e-6
            expected[(np.floor(fy) + dy).astype(int)[ok], (np.floor(fx) + dx).astype(int)[ok]] = True
    got = tex.grad[0, 0].abs() > 0
    assert 0 < expected.sum() < u_tex * u_tex
    assert np.array_equal(got.numpy(), expected)


def test_interpolate_is_differentiable_and_zero_on_background():
    v, t, uv, frags = _square_mesh()
    attrs = torch.rand(1, 4, 2, requires_grad=True)
    out = interpolate(frags, attrs)
    assert out.shape == (1, 32, 32, 2) and (out[0][~frags.mask[0]] == 0).all()
    out.sum().backward()
    assert torch.allclose(attrs.grad.sum(1), torch.full((1, 2), 576.0), atol=1e-3)  # barycentrics sum to 1


# ----------------------------------------------------------------------------- unwrap / visibility
def _erode(mask: torch.Tensor, r: int) -> torch.Tensor:
    inv = (~mask).float()[None, None]
    return torch.nn.functional.max_pool2d(inv, 2 * r + 1, 1, r)[0, 0] == 0


@pytest.mark.parametrize("yaw_deg", [0.0, 50.0])
def test_render_unwrap_render_round_trip(yaw_deg):
    verts, tris, uv = _cap(yaw=math.radians(yaw_deg))
    u_tex = 128
    cuv = torch.from_numpy(texel_centres(u_tex)).float()
    tex = torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * (1.5 * cuv[..., 0] + k * 0.3))
                       * torch.cos(2 * math.pi * 1.2 * cuv[..., 1]) for k in range(3)])[None]
    frags = rasterize(verts, tris, (96, 96))
    img, mask = render_texture(frags, tris, uv, tex)
    uv_img, uv_mask = unwrap_to_uv(img, verts, tris, uv, u_tex, fragments=frags)
    assert uv_img.shape == (1, 3, u_tex, u_tex) and uv_mask.dtype == torch.bool
    # texels are visible where the surface faces the camera (normal's camera z > 0), up to the facets
    covered = uv_fragments(uv, tris, u_tex).mask[0]
    x, y = (cuv[..., 0] - 0.5) / 0.45, (cuv[..., 1] - 0.5) / 0.45
    yaw = math.radians(yaw_deg)
    nz = -math.sin(yaw) * x + math.cos(yaw) * (1 - x**2 - y**2).clamp(min=0).sqrt()
    # visible texels that the image resolves (not grazing) carry the original texture
    inner = _erode(uv_mask[0, 0], 2) & (nz > 0.5)
    assert (tex[0][:, inner] - uv_img[0][:, inner]).abs().mean() < 1e-2
    assert uv_mask[0, 0][covered & (nz > 0.2)].all()  # margin: the mesh is a 32x32-grid approximation
    assert not uv_mask[0, 0][covered & (nz < -0.1)].any()
    assert (covered & (nz < -0.1)).sum() > (100 if yaw_deg else -1)
    img2, _ = render_texture(frags, tris, uv, uv_img)
    interior = _erode(mask[0, 0] > 0, 3)
    assert interior.sum() > 1500
    err = (img2[0][:, interior] - img[0][:, interior]).abs()
    assert err.mean() < 1e-2, err.mean()


def test_unwrap_is_differentiable_wrt_image_and_respects_occlusion():
    verts, tris, uv = _cap(radius=30.0, size=64)
    # a second, nearer copy shifted right hides the right part of the first one
    near = verts.clone()
    near[..., 0] += 25.0
    near[..., 2] += 100.0
    both = torch.cat([verts, near], 1)
    tris2 = torch.cat([tris, tris + verts.shape[1]])
    uv2 = torch.cat([uv, uv])
    image = torch.rand(1, 1, 64, 64, requires_grad=True)
    uv_img, uv_mask = unwrap_to_uv(image, both, tris2, uv2, 32)
    uv_img.sum().backward()
    assert image.grad.abs().sum() > 0
    alone_img, alone = unwrap_to_uv(image.detach(), verts, tris, uv, 32, depth_tol=0.5)
    # the hidden part of the far cap disappears: fewer visible texels than when it is alone
    far_only = unwrap_to_uv(image.detach(), both, tris, uv2, 32, depth_tol=0.5,
                            fragments=rasterize(both, tris2, (64, 64)))[1]
    assert alone.sum() > far_only.sum() + 50
    assert not (far_only & ~alone).any()


def test_vertex_visibility_sphere_front_half_and_occlusion():
    v, tris = _sphere()
    size, scale = 96, 30.0
    rot = _rot(math.radians(20), math.radians(-10))
    verts = _to_px(v, rot, scale, size / 2, size)
    t = torch.from_numpy(tris)
    frags = rasterize(verts, t, (size, size))
    vis = vertex_visibility(verts, t, frags)[0].numpy()
    nz = (v @ rot.T)[:, 2]  # outward normal's camera z
    assert vis[nz > 0.15].all()
    assert not vis[nz < -0.15].any()
    # a small sphere behind the big one: its front-facing vertices behind the big one are occluded
    small = v * 0.4 @ rot.T
    small_px = torch.tensor(np.stack([size / 2 + scale * small[:, 0], size / 2 - scale * small[:, 1],
                                      scale * small[:, 2] - 60.0], -1), dtype=torch.float32)[None]
    both = torch.cat([verts, small_px], 1)
    t2 = torch.cat([t, t + len(v)])
    vis2 = vertex_visibility(both, t2, rasterize(both, t2, (size, size)))[0].numpy()
    assert np.array_equal(vis2[: len(v)], vis)
    assert not vis2[len(v):].any()
    alone = vertex_visibility(small_px, t, rasterize(small_px, t, (size, size)))[0].numpy()
    assert alone[nz > 0.15].all()


# -------------------------------------------------------------------------------------- UV tools
def _symmetric_model(nx: int = 9, ny: int = 7) -> FaceModel:
    ij, tris = _grid(nx, ny)
    u = 0.1 + 0.8 * ij[:, 0] / (nx - 1)
    v = 0.9 - 0.8 * ij[:, 1] / (ny - 1)
    col, row = ij[:, 0].astype(int), ij[:, 1].astype(int)
    sym = row * nx + (nx - 1 - col)
    right = col > (nx - 1) // 2
    u[right] = 1.0 - u[sym[right]]  # exact mirror in float
    uv = np.stack([u, v], 1).astype(np.float32)
    n_v = len(uv)
    mean = np.stack([2 * uv[:, 0] - 1, 2 * uv[:, 1] - 1, np.zeros(n_v)], 1).astype(np.float32)
    return FaceModel(name="sym-grid", mean_shape=mean, id_basis=np.zeros((n_v, 3, 1), np.float32),
                     exp_basis=np.zeros((n_v, 3, 1), np.float32), triangles=tris, uv=uv,
                     symmetry=sym.astype(np.int64), regions={r: col <= 4 for r in REGION_NAMES})


def test_texel_mirror_index_is_a_column_flip_for_a_symmetric_layout():
    model = _symmetric_model()
    size = 32
    idx = texel_mirror_index(model, size)
    cov = uv_fragments(torch.from_numpy(model.uv), torch.from_numpy(model.triangles), size).mask[0].numpy()
    ii, jj = np.mgrid[0:size, 0:size]
    flip = (ii * size + (size - 1 - jj)).reshape(-1)
    assert cov.sum() == 26 * 26  # u, v in [0.1, 0.9] -> texel centres 3.5 .. 28.5
    assert np.array_equal(idx[cov.reshape(-1)], flip[cov.reshape(-1)])
    assert (idx[~cov.reshape(-1)] == -1).all()


def test_uv_attribute_image_and_texel_helpers():
    model = _symmetric_model()
    size = 32
    img, cover = uv_vertex_attribute_image(model, model.uv.astype(np.float64), size)
    centres = texel_centres(size)
    assert img.shape == (size, size, 2) and img.dtype == np.float32
    assert np.abs(img[cover] - centres[cover]).max() < 1e-5  # uv interpolates linearly
    assert (img[~cover] == 0).all()
    row, col = uv_to_texel(centres, size)
    assert np.array_equal(row, np.mgrid[0:size, 0:size][0]) and np.array_equal(col, np.mgrid[0:size, 0:size][1])
    # region masks go through the same path (left half: columns with u < 0.5 + a margin)
    left = region_uv_mask(model, "left", size)
    assert left[cover].any() and not left[:, size // 2 + 3:].any()


# ------------------------------------------------------------------------------------- backends
def test_pytorch3d_backend_is_clear_when_missing():
    try:
        import pytorch3d  # noqa: F401
    except ImportError:
        v, t = _tri(TRI)
        with pytest.raises(ImportError, match="pytorch3d"):
            rasterize(v, t, (48, 64), backend="pytorch3d")
        assert torch.equal(rasterize(v, t, (48, 64), backend="auto").tri_id, rasterize(v, t, (48, 64)).tri_id)
    with pytest.raises(ValueError, match="backend"):
        rasterize(*_tri(TRI), (48, 64), backend="opengl")


def test_pytorch3d_backend_agrees():
    pytest.importorskip("pytorch3d", reason="pytorch3d is not installed (optional backend)")
    v, tris = _cube()
    verts = _to_px(v, _rot(math.radians(30), math.radians(20)), 40.0, 48, 96)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = rasterize(verts.to(dev), torch.from_numpy(tris).to(dev), (96, 80))
    b = rasterize(verts.to(dev), torch.from_numpy(tris).to(dev), (96, 80), backend="pytorch3d")
    assert (a.tri_id == b.tri_id).float().mean() > 0.99


@pytest.mark.gpu
@CUDA
def test_cuda_matches_cpu_cube_and_texture():
    v, tris = _cube()
    verts = _to_px(v, _rot(math.radians(30), math.radians(20)), 40.0, 48, 96)
    t = torch.from_numpy(tris)
    cpu = rasterize(verts, t, (96, 96))
    gpu = rasterize(verts.cuda(), t.cuda(), (96, 96))
    assert torch.equal(cpu.tri_id, gpu.tri_id.cpu())
    assert torch.allclose(cpu.bary, gpu.bary.cpu(), atol=1e-5)


@pytest.mark.gpu
@CUDA
def test_cuda_round_trip():
    verts, tris, uv = _cap(yaw=0.5)
    tex = torch.rand(1, 3, 64, 64)
    frags = rasterize(verts.cuda(), tris.cuda(), (96, 96))
    img, mask = render_texture(frags, tris.cuda(), uv.cuda(), tex.cuda())
    uv_img, uv_mask = unwrap_to_uv(img, verts.cuda(), tris.cuda(), uv.cuda(), 64, fragments=frags)
    cpu = unwrap_to_uv(img.cpu(), verts, tris, uv, 64)
    assert torch.equal(uv_mask.cpu(), cpu[1])
    assert torch.allclose(uv_img.cpu(), cpu[0], atol=1e-5)


def test_fragments_shapes_and_batch():
    v, t = _tri(TRI)
    batch = torch.cat([v, v + torch.tensor([3.0, 2.0, 0.0])])
    frags = rasterize(batch, t, (48, 64))
    assert isinstance(frags, Fragments)
    assert frags.tri_id.shape == (2, 48, 64) and frags.tri_id.dtype == torch.int64
    assert frags.bary.shape == (2, 48, 64, 3) and frags.bary.dtype == torch.float32
    assert frags.depth.shape == (2, 48, 64) and frags.depth.dtype == torch.float32
    assert torch.equal(frags.mask[1, 2:, 3:], frags.mask[0, :-2, :-3])
