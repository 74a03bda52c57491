"""The linear 3D face model shared by every loader, the renderer and the pipeline.

Conventions (used everywhere in the project):

* Model space is right-handed: x to the face's left (the viewer's right in a frontal view),
  y up, z out of the face towards a frontal camera. Units are whatever the model uses
  (BFM: micrometre-like units, ~1e5 across the face; the procedural model: ~2 across).
* Triangles are wound counter-clockwise seen from outside, so the geometric normal
  ``(v1 - v0) x (v2 - v0)`` points out of the head.
* Per-vertex UVs are in ``[0, 1]^2`` with ``v`` up. A UV *image* of size ``U`` stores texel
  ``(row i, col j)`` at ``u = (j + 0.5) / U``, ``v = 1 - (i + 0.5) / U``, so the face is upright
  in the image (forehead in the top rows). Face models are laid out so that mirroring the
  face (x -> -x) maps ``u -> 1 - u`` as closely as the layout allows (exactly for the
  procedural model); :func:`uv_symmetry_error` measures how close.
* Texture values are linear RGB in ``[0, 1]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

REGION_NAMES = ("face", "centre", "left", "right", "nose", "nostrils", "mouth", "eyes")
"""Named UV regions every face model provides (per-vertex boolean masks).

``face``: skin area used for UV_gt; ``centre``: the frontal part cut for UV_ctr;
``left``/``right``: the face's own left/right half (x > 0 is the face's left);
``nose``: the nose masked in side crops; ``nostrils``: masked in centre crops;
``mouth``: mouth interior (never textured from photos); ``eyes``: eyeballs/eye openings.
"""


@dataclass(frozen=True, eq=False)
class FaceModel:
    """A linear morphable face model with a UV layout.

    Shapes (``V`` vertices, ``F`` triangles):

    * ``mean_shape``: (V, 3) float32, model units.
    * ``id_basis``: (V, 3, K_id) float32; shape = mean + id_basis @ alpha_id + exp_basis @ alpha_exp.
    * ``exp_basis``: (V, 3, K_exp) float32.
    * ``triangles``: (F, 3) int64, counter-clockwise seen from outside.
    * ``uv``: (V, 2) float32 in [0, 1], v up.
    * ``symmetry``: (V,) int64, ``symmetry[i]`` is the vertex mirroring vertex ``i`` (x -> -x).
    * ``regions``: name -> (V,) bool, at least the names in :data:`REGION_NAMES`.
    * ``tex_mean``: optional (V, 3) float32 in [0, 1]; ``tex_basis``: optional (V, 3, K_tex).
    * ``keypoints``: optional (68,) int64 vertex ids of the 68 iBUG landmarks.
    """

    name: str
    mean_shape: np.ndarray
    id_basis: np.ndarray
    exp_basis: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    symmetry: np.ndarray
    regions: Mapping[str, np.ndarray]
    tex_mean: np.ndarray | None = None
    tex_basis: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    meta: Mapping[str, object] = field(default_factory=dict)
    """Free-form provenance (source files, units, correspondence notes)."""

    def __post_init__(self) -> None:
        v = self.mean_shape.shape[0]
        _check(self.mean_shape, (v, 3), "mean_shape")
        _check(self.id_basis, (v, 3, None), "id_basis")
        _check(self.exp_basis, (v, 3, None), "exp_basis")
        _check(self.triangles, (None, 3), "triangles")
        _check(self.uv, (v, 2), "uv")
        _check(self.symmetry, (v,), "symmetry")
        if self.triangles.min() < 0 or self.triangles.max() >= v:
            raise ValueError(f"{self.name}: triangle indices must lie in [0, {v}), found "
                             f"[{self.triangles.min()}, {self.triangles.max()}]")
        if self.symmetry.min() < 0 or self.symmetry.max() >= v:
            raise ValueError(f"{self.name}: symmetry indices must lie in [0, {v})")
        missing = [r for r in REGION_NAMES if r not in self.regions]
        if missing:
            raise ValueError(f"{self.name}: regions {missing} missing; every face model needs {REGION_NAMES}")
        for name, mask in self.regions.items():
            _check(mask, (v,), f"regions[{name!r}]")
        if (self.tex_mean is None) != (self.tex_basis is None):
            raise ValueError(f"{self.name}: give both tex_mean and tex_basis, or neither")
        if self.tex_mean is not None:
            _check(self.tex_mean, (v, 3), "tex_mean")
            _check(self.tex_basis, (v, 3, None), "tex_basis")
        if self.keypoints is not None:
            _check(self.keypoints, (68,), "keypoints")

    # ------------------------------------------------------------------ sizes
    @property
    def n_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    @property
    def n_triangles(self) -> int:
        return int(self.triangles.shape[0])

    @property
    def n_id(self) -> int:
        return int(self.id_basis.shape[2])

    @property
    def n_exp(self) -> int:
        return int(self.exp_basis.shape[2])

    @property
    def n_tex(self) -> int:
        return 0 if self.tex_basis is None else int(self.tex_basis.shape[2])

    # ------------------------------------------------------------- evaluation
    def shape(self, alpha_id, alpha_exp):
        """Vertices of the deformed face (Eq. 1 of the 3DMM: S = S_mean + B_id a_id + B_exp a_exp).

        alpha_id: (B, K_id), alpha_exp: (B, K_exp) -- numpy or torch; returns (B, V, 3) of the same kind.
        Fewer coefficients than the basis holds are allowed (the rest are zero).
        """
        if isinstance(alpha_id, torch.Tensor):
            dev, dt = alpha_id.device, alpha_id.dtype
            mean = torch.as_tensor(self.mean_shape, device=dev, dtype=dt)
            bid = torch.as_tensor(self.id_basis[:, :, : alpha_id.shape[1]], device=dev, dtype=dt)
            bex = torch.as_tensor(self.exp_basis[:, :, : alpha_exp.shape[1]], device=dev, dtype=dt)
            return mean + torch.einsum("vck,bk->bvc", bid, alpha_id) + torch.einsum("vck,bk->bvc", bex, alpha_exp)
        alpha_id = np.asarray(alpha_id, np.float32)
        alpha_exp = np.asarray(alpha_exp, np.float32)
        return (self.mean_shape
                + np.einsum("vck,bk->bvc", self.id_basis[:, :, : alpha_id.shape[1]], alpha_id)
                + np.einsum("vck,bk->bvc", self.exp_basis[:, :, : alpha_exp.shape[1]], alpha_exp))

    def texture(self, coeff):
        """Per-vertex albedo T = T_mean + B_tex c, coeff: (B, K_tex) -> (B, V, 3) (numpy or torch)."""
        if self.tex_basis is None:
            raise ValueError(f"face model {self.name!r} has no texture basis; supply one or learn a PCA basis")
        if isinstance(coeff, torch.Tensor):
            mean = torch.as_tensor(self.tex_mean, device=coeff.device, dtype=coeff.dtype)
            basis = torch.as_tensor(self.tex_basis[:, :, : coeff.shape[1]], device=coeff.device, dtype=coeff.dtype)
            return mean + torch.einsum("vck,bk->bvc", basis, coeff)
        coeff = np.asarray(coeff, np.float32)
        return self.tex_mean + np.einsum("vck,bk->bvc", self.tex_basis[:, :, : coeff.shape[1]], coeff)

    # --------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """Short content hash (geometry, topology, UVs, bases), recorded in stores and runs."""
        h = hashlib.sha256()
        for arr in (self.mean_shape, self.id_basis, self.exp_basis, self.triangles, self.uv,
                    self.symmetry, self.tex_mean, self.tex_basis):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def _check(arr, shape, what: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, found {type(arr).__name__}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=False)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{what}: expected shape {want}, found {arr.shape}")


def mirror_symmetry_map(points: np.ndarray, axis: int = 0, max_dist: float | None = None, *,
                        centre: float | None = None) -> np.ndarray:
    """Vertex symmetry map by mirroring: for each vertex, the nearest vertex to its mirror image.

    points: (V, 3) mean shape, centred so that the symmetry plane is ``points[:, axis] == 0``
    (the plane is re-estimated as the median of that coordinate, so a small offset is fine).
    ``centre``, when given, is the plane's coordinate along ``axis`` and replaces the median
    (needed when the mesh has more vertices on one side, e.g. the BFM noneck subset, whose
    median x is ~1.5e3 units off the plane; see ``common.loaders.estimate_symmetry_plane``).
    Returns (V,) int64, the plain nearest-neighbour answer: on irregular meshes a few pairs are
    one-sided (``sym[sym[i]] != i``; 1.9% on the BFM noneck mesh), which :func:`uv_symmetry_error`
    reports as ``involution``. ``max_dist`` (model units), when given, raises if any vertex has no
    partner that close.
    """
    p = np.asarray(points, np.float64).copy()
    p[:, axis] -= np.median(p[:, axis]) if centre is None else centre
    mirrored = p.copy()
    mirrored[:, axis] *= -1
    dist, idx = cKDTree(p).query(mirrored)
    if max_dist is not None and dist.max() > max_dist:
        raise ValueError(f"symmetry map: vertex {int(dist.argmax())} has no mirror partner within {max_dist} "
                         f"(nearest {dist.max():.4g}); is the mesh centred and symmetric about axis {axis}?")
    return idx.astype(np.int64)


def estimate_symmetry_plane(points: np.ndarray, axis: int = 0, search: float = 0.05,
                            n_query: int = 12000) -> float:
    """Coordinate ``c`` of the mirror plane ``points[:, axis] == c`` of a roughly symmetric mesh.

    points: (V, 3). Minimises the mean distance from (a subsample of) the mirrored vertices to
    their nearest vertex over ``c`` within ``search`` x the mesh extent of the median. Unlike the
    median it does not move when one side has more vertices (BFM noneck: median x -1789, plane
    -331 units). Pass the result as ``mirror_symmetry_map(..., centre=c)``.
    """
    from scipy.optimize import minimize_scalar

    p = np.asarray(points, np.float64)
    tree = cKDTree(p)
    q = p[:: max(1, len(p) // n_query)].copy()
    med = float(np.median(p[:, axis]))
    half = search * float(np.ptp(p, 0).max())

    def cost(c: float) -> float:
        m = q.copy()
        m[:, axis] = 2.0 * c - m[:, axis]
        return float(tree.query(m)[0].mean())

    res = minimize_scalar(cost, bounds=(med - half, med + half), method="bounded",
                          options={"xatol": 1e-4 * half})
    return float(res.x)


def uv_symmetry_error(model: FaceModel) -> dict[str, float]:
    """How well the UV layout respects the vertex symmetry: ``uv[sym[i]] ~ (1 - u_i, v_i)``.

    Returns mean and max absolute error in UV units over the face region, and the fraction of
    vertices whose map is an involution (``sym[sym[i]] == i``).
    """
    uv, sym = model.uv.astype(np.float64), model.symmetry
    flipped = np.stack([1.0 - uv[:, 0], uv[:, 1]], 1)
    err = np.abs(uv[sym] - flipped).max(1)
    face = model.regions["face"]
    return {
        "mean": float(err[face].mean()),
        "max": float(err[face].max()),
        "involution": float((sym[sym] == np.arange(len(sym))).mean()),
    }


def orient_triangles_outward(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip triangles whose normal points into the head (towards the centroid).

    vertices: (V, 3); triangles: (F, 3). For a face mask (an open surface bulging towards +z)
    "outward" is judged against a centre placed well behind the face, which is robust for the
    whole mask including its rim. Returns (F, 3) int64 with consistent outward winding.
    """
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    a, b, c = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    n = np.cross(b - a, c - a)
    centre = v.mean(0)
    extent = v.max(0) - v.min(0)
    centre[2] -= extent.max()  # a point well behind the face
    out = ((a + b + c) / 3.0 - centre)
    flip = (n * out).sum(1) < 0
    t = t.copy()
    t[flip] = t[flip][:, [0, 2, 1]]
    return t
