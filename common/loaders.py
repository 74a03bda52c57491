"""Loaders that turn public face-model files into :class:`common.facemodel.FaceModel`.

Every loader takes paths (never hard-coded), keeps the model's own units (recorded in
``meta["units"]``) and finishes the same way (:func:`_assemble`):

* **Symmetry map**: :func:`mirror_symmetry_map` about the plane found by
  :func:`estimate_symmetry_plane`. The mean shape is *not* re-centred (the 62-d 3DDFA
  parameters are tied to its coordinates); the BFM plane sits at x ~ -330 units, while the
  median x of the noneck subset is -1789, so the median would be a poor plane.
* **Winding**: BFM topologies (``tri.mat``, ``tri.pkl``, ``tl``) are wound clockwise seen from
  outside (normals into the head). :func:`orient_triangles_outward` votes per triangle; the
  whole mesh is reversed when most triangles vote to flip. The per-triangle answer itself is
  not used: on BFM it is wrong for the 94 nostril-interior triangles (which face inwards by
  shape) and would leave 69 edges inconsistently wound.
* **UV**: ``BFM_UV.mat`` is already v-up (the forehead's top vertex has v = 1, the chin's
  lowest v = 0) and u grows with x; a layout whose v falls with y would be flipped.
* **Regions**: :func:`common.regions.derive_regions` from the 68 landmarks when known.

File layouts (verified against the upstream readers, see each loader): 3DDFA_V2
``bfm_noneck_v3.pkl``, Basel Face Model 2009 ``01_MorphableModel.mat``, Deep3DFaceRecon
``BFM_model_front.mat``, and the public 3DDFA files (``u_shp.npy``, ``u_exp.npy``,
``keypoints_sim.npy``, ``BFM_UV.mat``, ``indices.npy``, ``tri.pkl``).

:func:`load_tddfa_dense_public` builds a dense model for the 62-d parameters from public files
only (bases lifted from 3DDFA's 64x64 ``Model_PAF.pkl`` and the exact 68-landmark bases);
:func:`save_face_model` / :func:`load_face_model` store any built model in one ``.npz``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io as sio
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.interpolate import CloughTocher2DInterpolator, LinearNDInterpolator, RBFInterpolator
from scipy.spatial import Delaunay, cKDTree

from common.facemodel import (
    FaceModel,
    estimate_symmetry_plane,
    mirror_symmetry_map,
    orient_triangles_outward,
)
from common.faces.assets import TDDFAAssets
from common.regions import RegionParams, derive_regions

PathLike = str | Path
N_BFM2009 = 53490
"""Vertices of the full Basel Face Model 2009."""
N_BFM_TRIM = 53215
"""Vertices of the BFM trimmed by 3DDFA (ears and neck removed): BFM_UV.mat, u_shp.npy, tri.mat."""
N_BFM_NONECK = 38365
"""Vertices of 3DDFA_V2's noneck BFM (``indices.npy`` into the 53,215)."""


# ----------------------------------------------------------------------------- file helpers
def _load_pickle(path: PathLike) -> object:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # py2 pickles (3DDFA) need latin1


def _load_mat(path: PathLike, required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    mat = sio.loadmat(str(path))
    _require(mat, required, path, what)
    return mat


def _require(d: Mapping, keys: tuple[str, ...], path: PathLike, what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        found = sorted(k for k in d if not str(k).startswith("__"))
        raise KeyError(f"{path}: keys {missing} missing; a {what} holds {list(keys)}, this file has {found}")


def _load_array(src: PathLike | np.ndarray, key: str | None = None) -> np.ndarray:
    """An array given directly, or read from .npy / .pkl / .txt / .mat (``key`` for .mat and dict pickles)."""
    if isinstance(src, np.ndarray):
        return src
    path = Path(src)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".pkl":
        obj = _load_pickle(path)
        if isinstance(obj, Mapping):
            _require(obj, (key,), path, f"pickle with {key!r}")
            obj = obj[key]
        return np.asarray(obj)
    if suffix == ".mat":
        mat = sio.loadmat(str(path))
        if key is None:
            keys = [k for k in mat if not k.startswith("__")]
            if len(keys) != 1:
                raise KeyError(f"{path}: holds {keys}; say which variable to read")
            key = keys[0]
        _require(mat, (key,), path, f"MATLAB file with {key!r}")
        return np.asarray(mat[key])
    return np.loadtxt(path)


def _per_vertex(arr: np.ndarray, n_vertices: int | None, what: str) -> np.ndarray:
    """Interleaved (3V,) / (3V, K) / (1, 3V) -> (V, 3) / (V, 3, K) float32."""
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape[0] % 3 or (n_vertices is not None and a.shape[0] != 3 * n_vertices):
        want = "3V" if n_vertices is None else str(3 * n_vertices)
        raise ValueError(f"{what}: expected {want} interleaved x,y,z rows, found shape {np.shape(arr)}")
    return a.reshape(a.shape[0] // 3, 3, *a.shape[1:]).astype(np.float32)


def _triangles(arr: np.ndarray, n_vertices: int, one_based: bool, what: str) -> np.ndarray:
    """(F, 3) or (3, F) -> (F, 3) int64, 0-based, range-checked."""
    t = np.asarray(arr).astype(np.int64)
    if t.ndim == 2 and t.shape[0] == 3 and t.shape[1] != 3:
        t = t.T
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"{what}: expected (F, 3) or (3, F) vertex ids, found {np.shape(arr)}")
    t = t - int(one_based)
    if t.min() < 0 or t.max() >= n_vertices:
        base = "1-based" if one_based else "0-based"
        raise ValueError(f"{what}: {base} ids out of range for {n_vertices} vertices: "
                         f"[{t.min() + one_based}, {t.max() + one_based}]")
    return np.ascontiguousarray(t)


def keypoints_from_interleaved(kp: np.ndarray) -> np.ndarray:
    """3DDFA landmark ids (204,) into the interleaved 3V vector -> (68,) int64 vertex ids.

    Also accepts (68,) vertex ids unchanged. 3DDFA stores ``3k, 3k+1, 3k+2`` per landmark.
    """
    k = np.asarray(kp).astype(np.int64).ravel()
    if k.shape == (68,):
        return k
    if k.shape != (204,) or np.any(k[0::3] % 3) or np.any(k[1::3] != k[0::3] + 1) \
            or np.any(k[2::3] != k[0::3] + 2):
        raise ValueError(f"keypoints: expected 68 vertex ids or 204 interleaved ids (3k, 3k+1, 3k+2), "
                         f"found shape {k.shape}")
    return k[0::3] // 3


def _subset_map(ids: np.ndarray, subset: np.ndarray, what: str) -> np.ndarray:
    """Re-index vertex ids of a full mesh into a sorted-or-not subset of it (raises if absent)."""
    lookup = -np.ones(max(int(subset.max()), int(ids.max())) + 1, np.int64)
    lookup[subset] = np.arange(len(subset))
    out = lookup[ids]
    if (out < 0).any():
        raise ValueError(f"{what}: vertices {ids[out < 0][:5].tolist()} are not in the vertex subset")
    return out


def _restrict_triangles(tri: np.ndarray, subset: np.ndarray, n_full: int) -> np.ndarray:
    """Triangles (F, 3) of a full mesh whose three corners lie in ``subset``, re-indexed into it."""
    lookup = -np.ones(n_full, np.int64)
    lookup[subset] = np.arange(len(subset))
    t = lookup[tri]
    return t[(t >= 0).all(1)]


def load_bfm_uv(uv_mat: PathLike) -> np.ndarray:
    """``BFM_UV.mat`` (3DDFA_V2 configs) -> (53215, 2) float64 per-vertex UV of the trimmed BFM."""
    mat = _load_mat(uv_mat, ("UV",), "BFM UV layout (3DDFA_V2 configs/BFM_UV.mat)")
    uv = np.asarray(mat["UV"], np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"{uv_mat}: UV should be (V, 2), found {uv.shape}")
    return uv


# ----------------------------------------------------------------------------- shared finish
def _orient(vertices: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, dict]:
    """Outward winding for a consistently wound mesh: reverse all triangles when most vote to flip."""
    voted = orient_triangles_outward(vertices, tri)
    flips = float((voted[:, 1] != tri[:, 1]).mean())
    out = tri[:, [0, 2, 1]] if flips > 0.5 else tri
    return np.ascontiguousarray(out), {"winding_reversed": flips > 0.5, "winding_flip_vote": round(flips, 5)}


def _uv_up(uv: np.ndarray, vertices: np.ndarray) -> tuple[np.ndarray, bool]:
    """Flip v when it falls with model y (a v-down layout); returns (uv, flipped)."""
    corr = np.corrcoef(uv[:, 1], vertices[:, 1])[0, 1]
    if corr < 0:
        return np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1), True
    return uv, False


def _assemble(name: str, mean: np.ndarray, id_basis: np.ndarray, exp_basis: np.ndarray,
              tri: np.ndarray, uv: np.ndarray, *, keypoints: np.ndarray | None = None,
              tex_mean: np.ndarray | None = None, tex_basis: np.ndarray | None = None,
              meta: dict | None = None, region_params: RegionParams | None = None) -> FaceModel:
    """Symmetry map, outward winding, v-up UV and regions, then the FaceModel."""
    mean = np.ascontiguousarray(mean, np.float32)
    uv = np.asarray(uv, np.float64)
    if uv.min() < -1e-6 or uv.max() > 1 + 1e-6:
        raise ValueError(f"{name}: UV should lie in [0, 1], found [{uv.min():.3g}, {uv.max():.3g}]")
    uv, flipped = _uv_up(uv, mean)
    tri, wind = _orient(mean, tri)
    plane = estimate_symmetry_plane(mean)
    sym = mirror_symmetry_map(mean, centre=plane)
    kp = None if keypoints is None else keypoints_from_interleaved(keypoints)
    params = region_params or RegionParams(symmetry_plane=plane)
    regions = derive_regions(mean, uv, kp, params, triangles=tri)
    meta = dict(meta or {})
    meta.update(wind, uv_v_flipped=flipped, symmetry_plane_x=plane,
                symmetry_involution=float((sym[sym] == np.arange(len(sym))).mean()))
    return FaceModel(
        name=name, mean_shape=mean,
        id_basis=np.ascontiguousarray(id_basis, np.float32),
        exp_basis=np.ascontiguousarray(exp_basis, np.float32),
        triangles=tri, uv=np.clip(uv, 0.0, 1.0).astype(np.float32), symmetry=sym, regions=regions,
        tex_mean=None if tex_mean is None else np.ascontiguousarray(tex_mean, np.float32),
        tex_basis=None if tex_basis is None else np.ascontiguousarray(tex_basis, np.float32),
        keypoints=kp, meta=meta,
    )


# ----------------------------------------------------------------------------- 3DDFA_V2
def load_tddfa_v2(bfm_pkl: PathLike, uv_mat: PathLike, indices: PathLike | np.ndarray,
                  tri_pkl: PathLike | None = None,
                  keypoints: PathLike | np.ndarray | None = None) -> FaceModel:
    """3DDFA_V2's noneck BFM (``configs/bfm_noneck_v3.pkl``) with the ``BFM_UV.mat`` layout.

    bfm_pkl: pickled dict as read by 3DDFA_V2 ``bfm/bfm.py`` (``BFMModel``):
    ``u`` (3V, 1) mean shape (= u_shp + u_exp), xyz interleaved per vertex; ``w_shp`` (3V, 40)
    and ``w_exp`` (3V, 10) bases, unscaled (the 62-d parameter vector carries the scale, see
    :mod:`common.geometry`); ``tri`` (F, 3) or (3, F) 0-based; ``keypoints`` (204,) ids into
    the 3V vector (``u[keypoints]`` are the 68 landmarks' coordinates). V = 38,365.
    uv_mat: ``BFM_UV.mat`` (53,215 rows), subset by ``indices`` ((V,) into the 53,215).
    tri_pkl: optional ``configs/tri.pkl`` ((3, F) 0-based) replacing the pickle's ``tri``.
    keypoints: optional (204,) interleaved or (68,) vertex ids (array or file) replacing the
    pickle's. Units: BFM (~1.8e5 across the face, the units of the 62-d parameters).
    """
    bfm = _load_pickle(bfm_pkl)
    if not isinstance(bfm, Mapping):
        raise TypeError(f"{bfm_pkl}: expected a pickled dict (3DDFA_V2 bfm_noneck_v3.pkl), found {type(bfm)}")
    _require(bfm, ("u", "w_shp", "w_exp"), bfm_pkl, "3DDFA_V2 BFM pickle")
    mean = _per_vertex(bfm["u"], None, f"{bfm_pkl}: u")
    n = len(mean)
    w_shp = _per_vertex(bfm["w_shp"], n, f"{bfm_pkl}: w_shp")
    w_exp = _per_vertex(bfm["w_exp"], n, f"{bfm_pkl}: w_exp")
    if tri_pkl is not None:
        tri = _triangles(_load_array(tri_pkl), n, False, str(tri_pkl))
    elif "tri" in bfm:
        tri = _triangles(bfm["tri"], n, False, f"{bfm_pkl}: tri")
    else:
        raise KeyError(f"{bfm_pkl}: no 'tri' key; pass tri_pkl (3DDFA_V2 configs/tri.pkl)")
    idx = np.asarray(_load_array(indices), np.int64).ravel()
    uv_full = load_bfm_uv(uv_mat)
    if len(idx) != n or idx.max() >= len(uv_full):
        raise ValueError(f"indices: {len(idx)} ids (max {idx.max()}) for a {n}-vertex model and a "
                         f"{len(uv_full)}-row UV table; expected {n} ids into the UV rows")
    kp = _load_array(keypoints) if keypoints is not None else bfm.get("keypoints")
    meta = {"source": "3ddfa_v2", "files": [str(bfm_pkl), str(uv_mat)], "units": "BFM (~1.8e5 across)",
            "parameters": "3DDFA_V2 62-d (12 pose + 40 w_shp + 10 w_exp), unscaled bases"}
    return _assemble("3ddfa-v2-bfm", mean, w_shp, w_exp, tri, uv_full[idx], keypoints=kp, meta=meta)


def load_param_stats(pkl: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``param_mean_std_62d_120x120.pkl`` -> (mean, std), each (62,) float32; params = out * std + mean."""
    d = _load_pickle(pkl)
    if not isinstance(d, Mapping):
        raise TypeError(f"{pkl}: expected a pickled dict with 'mean' and 'std', found {type(d)}")
    _require(d, ("mean", "std"), pkl, "3DDFA_V2 parameter statistics pickle")
    mean = np.asarray(d["mean"], np.float32).ravel()
    std = np.asarray(d["std"], np.float32).ravel()
    if mean.shape != (62,) or std.shape != (62,):
        raise ValueError(f"{pkl}: expected mean and std of shape (62,), found {mean.shape}, {std.shape}")
    return mean, std


# ----------------------------------------------------------------------------- public 3DDFA layout
@dataclass(frozen=True)
class BFMLayout:
    """The public 3DDFA files that define the trimmed-BFM vertex set and its UV layout."""

    uv_mat: Path
    """3ddfa_v2/configs/BFM_UV.mat: (53215, 2) UV of the trimmed BFM."""
    indices: Path | None = None
    """3ddfa_v2/configs/indices.npy: (38365,) noneck vertex ids into the 53,215."""
    reference_shape: Path | None = None
    """3ddfa_v1/train.configs/u_shp.npy: (159645, 1) trimmed-BFM mean shape (for matching)."""
    keypoints: Path | None = None
    """3ddfa_v1/train.configs/keypoints_sim.npy: (204,) interleaved landmark ids into the 53,215."""

    @classmethod
    def from_dirs(cls, v1_dir: PathLike, v2_dir: PathLike) -> BFMLayout:
        """From the roots of the 3DDFA (v1) and 3DDFA_V2 checkouts."""
        v1, v2 = Path(v1_dir), TDDFAAssets.from_dir(v2_dir)
        return cls(uv_mat=v2.bfm_uv, indices=v2.indices,
                   reference_shape=v1 / "train.configs" / "u_shp.npy",
                   keypoints=v1 / "train.configs" / "keypoints_sim.npy")


def load_bfm_mean_mesh(v1_dir: PathLike, v2_dir: PathLike) -> FaceModel:
    """The BFM noneck mean mesh with real topology and UVs, no bases (K = 0).

    Mean = ``u_shp + u_exp`` (3DDFA v1 ``train.configs``) restricted to the 38,365 noneck
    vertices (``indices.npy``); triangles ``tri.pkl``; UV ``BFM_UV.mat[indices]``; the 68
    landmarks from ``keypoints_sim.npy`` (all inside the noneck subset). Units: BFM (3DDFA).
    """
    v1, v2 = Path(v1_dir), Path(v2_dir)
    lay = BFMLayout.from_dirs(v1, v2)
    u = _per_vertex(np.load(v1 / "train.configs" / "u_shp.npy") + np.load(v1 / "train.configs" / "u_exp.npy"),
                    None, "u_shp + u_exp")
    idx = np.asarray(np.load(lay.indices), np.int64)
    uv_full = load_bfm_uv(lay.uv_mat)
    if len(u) != len(uv_full):
        raise ValueError(f"u_shp has {len(u)} vertices but {lay.uv_mat} {len(uv_full)} rows; both should be 53215")
    tri = _triangles(_load_array(TDDFAAssets.from_dir(v2).triangles), len(idx), False, "tri.pkl")
    kp = _subset_map(keypoints_from_interleaved(np.load(lay.keypoints)), idx, "keypoints_sim")
    mean = u[idx]
    none = np.zeros((len(idx), 3, 0), np.float32)
    meta = {"source": "3ddfa public mean mesh", "files": [str(v1), str(v2)], "units": "BFM (~1.8e5 across)"}
    return _assemble("bfm-mean-mesh", mean, none, none, tri, uv_full[idx], keypoints=kp, meta=meta)


# ----------------------------------------------------------------------------- BFM 2009
def match_trim_index(shape_mu: np.ndarray, reference: np.ndarray, iters: int = 10,
                     tol: float = 1.0) -> tuple[np.ndarray, dict]:
    """Correspondence of the trimmed BFM (reference, (M, 3)) in the full BFM 2009 ((N, 3)).

    Fits ``reference ~ s * shape_mu[idx] + t`` by nearest neighbours and a robust (inlier)
    least-squares scale + translation, iterated from unit scale and the offset that aligns the
    two nose tips (the most forward vertex of both: ears and neck never reach past the nose), so
    a fixed offset of any size is found when the units agree. Returns ``idx`` (M,) int64
    (0-based into the N) and stats: scale, offset, residual median / max (reference units),
    number of distinct matches. Raises when the match is not one-to-one or a residual exceeds
    ``tol`` x the reference's median vertex spacing: the files are then not the same mesh and
    the trim-index file (face3d's ``trimIndex``) must be given instead.
    """
    src = np.asarray(shape_mu, np.float64)
    ref = np.asarray(reference, np.float64)
    tree = cKDTree(src)
    s, t = 1.0, ref[np.argmax(ref[:, 2])] - src[np.argmax(src[:, 2])]
    for _ in range(iters):
        d, idx = tree.query((ref - t) / s)
        keep = d <= np.percentile(d, 90) + 1e-9
        a, b = src[idx[keep]], ref[keep]
        ac, bc = a - a.mean(0), b - b.mean(0)
        s_new = float((ac * bc).sum() / max((ac * ac).sum(), 1e-30))
        t_new = b.mean(0) - s_new * a.mean(0)
        done = abs(s_new - s) < 1e-9 and np.allclose(t_new, t, atol=1e-6 * np.ptp(ref))
        s, t = s_new, t_new
        if done:
            break
    d, idx = tree.query((ref - t) / s)
    res = d * s
    spacing = float(np.median(cKDTree(ref).query(ref, k=2)[0][:, 1]))
    stats = {"scale": s, "offset": t.tolist(), "residual_median": float(np.median(res)),
             "residual_max": float(res.max()), "distinct": int(len(np.unique(idx))), "matched": len(ref),
             "vertex_spacing": spacing}
    if stats["distinct"] != len(ref) or res.max() > tol * spacing:
        raise ValueError(f"BFM 2009 -> trimmed BFM matching failed ({stats}); the mean shapes do not "
                         f"correspond vertex by vertex. Pass trim_index (face3d/Deep3D 'trimIndex', 1-based .mat)")
    return idx.astype(np.int64), stats


def _read_trim_index(trim_index: PathLike | np.ndarray, n_full: int) -> np.ndarray:
    """A .mat ('trimIndex', 1-based as in MATLAB) or .npy / array (0-based) -> (M,) 0-based."""
    if isinstance(trim_index, np.ndarray) or Path(trim_index).suffix.lower() != ".mat":
        idx = np.asarray(_load_array(trim_index), np.int64).ravel()
    else:
        idx = np.asarray(_load_array(trim_index, "trimIndex"), np.int64).ravel() - 1
    if idx.min() < 0 or idx.max() >= n_full:
        raise ValueError(f"trim_index: ids [{idx.min()}, {idx.max()}] out of range for {n_full} vertices "
                         f"(.mat files are read as 1-based, .npy / arrays as 0-based)")
    return idx


def load_bfm2009(morphable_model_mat: PathLike, uv_layout: BFMLayout, *,
                 trim_index: PathLike | np.ndarray | None = None, noneck: bool = True,
                 n_id: int | None = None, n_tex: int | None = None) -> FaceModel:
    """Basel Face Model 2009 (``01_MorphableModel.mat``) on the 3DDFA UV layout, with its texture basis.

    File variables: ``shapeMU`` (3N, 1), ``shapePC`` (3N, 199), ``shapeEV`` (199, 1), ``texMU``
    (3N, 1) in 0..255, ``texPC`` (3N, 199), ``texEV`` (199, 1), ``tl`` (F, 3) 1-based; N = 53,490,
    xyz / rgb interleaved per vertex.

    Correspondence: the UV layout (``BFM_UV.mat``) and 3DDFA's meshes cover the 53,215-vertex
    BFM, i.e. BFM 2009 with ears and neck trimmed: vertex ``i`` of it is BFM 2009 vertex
    ``trimIndex[i] - 1`` (face3d ``model_info.mat`` / Deep3D ``BFM_exp_idx.mat``, 1-based).
    With ``trim_index`` that list is used; otherwise it is derived by matching ``shapeMU``
    against 3DDFA's ``u_shp.npy`` (``uv_layout.reference_shape``, same units: BFM 2009
    micrometres) with nearest neighbours under a fitted scale + offset
    (:func:`match_trim_index`; the result, identity or not, and residuals go into
    ``meta["correspondence"]``). ``noneck`` further restricts to 3DDFA_V2's 38,365 vertices.
    Triangles are BFM 2009's ``tl`` restricted to the kept vertices.

    Bases are scaled by their EVs directly (no square root): BFM 2009's ``shapeEV``/``texEV``
    are standard deviations (BFM's own ``coef2object`` uses ``PC * (coef .* EV)``; Deep3D's
    ``idBase = shapePC * shapeEV``), so coefficients are ~N(0, 1). Texture: mean and basis
    divided by 255, so ``tex_mean`` is in [0, 1]. No expression basis (K_exp = 0). Units: BFM
    2009 (micrometres, ~1.8e5 across the face). ``n_id`` / ``n_tex`` keep only the leading
    components (default all 199).
    """
    keys = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")
    mat = _load_mat(morphable_model_mat, keys, "Basel Face Model 2009 01_MorphableModel.mat")
    mu = _per_vertex(mat["shapeMU"], None, f"{morphable_model_mat}: shapeMU")
    n_full = len(mu)
    k_id = mat["shapePC"].shape[1] if n_id is None else n_id
    k_tex = mat["texPC"].shape[1] if n_tex is None else n_tex
    id_full = _per_vertex(mat["shapePC"][:, :k_id], n_full, "shapePC") * mat["shapeEV"].ravel()[:k_id]
    tex_mu = _per_vertex(mat["texMU"], n_full, "texMU") / 255.0
    tex_full = _per_vertex(mat["texPC"][:, :k_tex], n_full, "texPC") * (mat["texEV"].ravel()[:k_tex] / 255.0)

    uv_trim = load_bfm_uv(uv_layout.uv_mat)
    if trim_index is not None:
        trim = _read_trim_index(trim_index, n_full)
        corr = {"method": "trim_index", "matched": len(trim)}
    else:
        if uv_layout.reference_shape is None:
            raise ValueError("load_bfm2009: give trim_index or uv_layout.reference_shape (u_shp.npy) to "
                             "find which BFM 2009 vertices the UV layout covers")
        ref = _per_vertex(np.load(uv_layout.reference_shape), None, str(uv_layout.reference_shape))
        trim, corr = match_trim_index(mu, ref)
        corr["method"] = "nearest neighbour to u_shp"
    if len(trim) != len(uv_trim):
        raise ValueError(f"trim index has {len(trim)} ids but {uv_layout.uv_mat} {len(uv_trim)} UV rows")
    sel = np.arange(len(trim))
    if noneck:
        if uv_layout.indices is None:
            raise ValueError("load_bfm2009(noneck=True) needs uv_layout.indices (indices.npy)")
        sel = np.asarray(_load_array(uv_layout.indices), np.int64).ravel()
    verts = trim[sel]
    tri = _restrict_triangles(_triangles(mat["tl"], n_full, True, f"{morphable_model_mat}: tl"), verts, n_full)
    kp = None
    if uv_layout.keypoints is not None:
        kp = _subset_map(keypoints_from_interleaved(_load_array(uv_layout.keypoints)), sel, "keypoints")
    meta = {"source": "bfm2009", "files": [str(morphable_model_mat), str(uv_layout.uv_mat)],
            "units": "BFM 2009 (micrometres, ~1.8e5 across)", "correspondence": corr,
            "bfm2009_vertex_ids": verts, "basis_scaling": "PC * EV (EV = standard deviations)"}
    return _assemble("bfm2009-noneck" if noneck else "bfm2009-trim", mu[verts], id_full[verts],
                     np.zeros((len(verts), 3, 0), np.float32), tri, uv_trim[sel], keypoints=kp,
                     tex_mean=tex_mu[verts], tex_basis=tex_full[verts], meta=meta)


# ----------------------------------------------------------------------------- Deep3DFaceRecon
def deep3d_uv_from_layout(uv_mat: PathLike, front_idx_mat: PathLike) -> np.ndarray:
    """UV for Deep3D's 35,709 front vertices: ``BFM_UV.mat`` rows at ``BFM_front_idx.mat['idx'] - 1``.

    Deep3D's ``BFM/BFM_front_idx.mat`` holds ``idx``, 1-based ids into the 53,215-vertex BFM
    (the same rows as ``BFM_UV.mat``). Returns (35709, 2) float64.
    """
    idx = np.asarray(_load_array(front_idx_mat, "idx"), np.int64).ravel() - 1
    return load_bfm_uv(uv_mat)[idx]


def load_deep3d(bfm_model_front_mat: PathLike, uv: np.ndarray | None = None,
                recenter: bool = True) -> FaceModel:
    """Deep3DFaceRecon ``BFM/BFM_model_front.mat`` (as read by its ``models/bfm.py``).

    Variables: ``meanshape`` (1, 3N) decimetres (BFM / 1e5), ``idBase`` (3N, 80) and
    ``exBase`` (3N, 64) already scaled by their standard deviations, ``meantex`` (1, 3N) in
    0..255, ``texBase`` (3N, 80) in 0..255 units, ``tri`` (F, 3) 1-based, ``keypoints`` (68, 1)
    1-based (optional); ``point_buf``, ``frontmask2_idx``, ``skinmask`` are not used. N = 35,709.
    The file has no UVs: a ``uv`` / ``UV`` variable is used when present, else pass ``uv``
    ((N, 2) in [0, 1], e.g. :func:`deep3d_uv_from_layout`). ``recenter`` subtracts the vertex
    mean from the mean shape as Deep3D's ``ParametricFaceModel(recenter=True)`` does, so its
    translations apply unchanged. Texture is divided by 255.
    """
    keys = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri")
    mat = _load_mat(bfm_model_front_mat, keys, "Deep3DFaceRecon BFM_model_front.mat")
    mean = _per_vertex(mat["meanshape"], None, f"{bfm_model_front_mat}: meanshape")
    n = len(mean)
    if recenter:
        mean = mean - mean.mean(0)
    if uv is None:
        for key in ("uv", "UV"):
            if key in mat:
                uv = mat[key]
                break
        else:
            raise ValueError(
                f"{bfm_model_front_mat} has no UV coordinates (no 'uv' variable). Pass uv=(N={n}, 2) array in "
                f"[0, 1], e.g. deep3d_uv_from_layout('3DDFA_V2/configs/BFM_UV.mat', 'BFM/BFM_front_idx.mat')")
    uv = np.asarray(uv, np.float64)
    if uv.shape != (n, 2):
        raise ValueError(f"uv: expected ({n}, 2) for {bfm_model_front_mat}, found {uv.shape}")
    kp = None
    if "keypoints" in mat:
        kp = np.asarray(mat["keypoints"], np.int64).ravel() - 1
        if kp.shape != (68,) or kp.min() < 0 or kp.max() >= n:
            raise ValueError(f"{bfm_model_front_mat}: keypoints should be 68 1-based ids in [1, {n}]")
    meta = {"source": "deep3d", "files": [str(bfm_model_front_mat)], "units": "decimetres (BFM / 1e5)",
            "recentred": recenter}
    return _assemble(
        "deep3d-bfm-front", mean,
        _per_vertex(mat["idBase"], n, "idBase"), _per_vertex(mat["exBase"], n, "exBase"),
        _triangles(mat["tri"], n, True, f"{bfm_model_front_mat}: tri"), uv, keypoints=kp,
        tex_mean=_per_vertex(mat["meantex"], n, "meantex") / 255.0,
        tex_basis=_per_vertex(mat["texBase"], n, "texBase") / 255.0, meta=meta)


# ----------------------------------------------------------------------------- dense BFM from public 3DDFA files
@dataclass(frozen=True)
class DenseLiftParams:
    """How :func:`load_tddfa_dense_public` lifts the sparse / 64x64 bases onto every vertex."""

    reach: float = 1.5
    """Vertices farther than ``reach`` x the median data-point spacing (in UV) from every data point
    are not interpolated but extended over the mesh."""
    landmark_anchors: bool = True
    """Add the exact 68-landmark bases (``w_shp_base.txt``) to the PAF data for the identity basis, so
    the lifted basis is exact at the landmark vertices. ``False`` gives the held-out accuracy."""
    paf_surface_tol: float = 1.0
    """PAF points farther than this (BFM units) from the mean mesh are the off-mesh grid corners: dropped."""


def _uniform_laplacian(tri: np.ndarray, n: int) -> sp.csr_matrix:
    """Row-normalised graph Laplacian ``I - D^-1 A`` of a triangle mesh: (n, n) CSR."""
    e = tri[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64)
    deg = np.asarray(adj.sum(1)).ravel()
    if (deg == 0).any():
        raise ValueError(f"mesh has {int((deg == 0).sum())} vertices in no triangle; restrict to used vertices first")
    return (sp.identity(n, format="csr") - sp.diags(1.0 / deg) @ adj).tocsr()


def biharmonic_extension(laplacian: sp.spmatrix, values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown vertex values with the smoothest (least ``||L x||^2``) continuation of the known ones.

    laplacian: (V, V) sparse mesh Laplacian; values: (V, C) float, only rows with ``known`` are read;
    known: (V,) bool. Solves ``(L^T L)_UU x_U = -(L^T L)_UK x_K`` for all C columns with one sparse LU
    factorisation. The result is C1 across the border of the known set and continues its trend (about
    linearly) into regions without data, with natural conditions at the mesh's open rim. Returns (V, C)
    float64. Each connected region of unknowns must touch a known vertex (else the system is singular).
    """
    known = np.asarray(known, bool)
    out = np.array(values, np.float64)
    unk = ~known
    if not unk.any():
        return out
    if not known.any():
        raise ValueError("biharmonic_extension: no known vertex to extend from")
    q = (laplacian.T @ laplacian).tocsr()
    q_uu = q[unk][:, unk].tocsc()
    rhs = -(q[unk][:, known] @ out[known])
    lu = spla.splu(q_uu, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    out[unk] = lu.solve(rhs)
    return out


def _uv_interpolate(kind: str, data_uv: np.ndarray, data: np.ndarray, vertex_uv: np.ndarray,
                    reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Scattered interpolation in UV: ``kind`` 'ct' (Clough-Tocher C1 cubic) or 'tps' (thin-plate spline).

    data_uv: (P, 2); data: (P, C); vertex_uv: (V, 2). Returns values (V, C) and the (V,) bool mask
    of vertices inside the data's convex hull and within ``reach`` x the median data spacing of a
    data point (elsewhere the values are undefined).
    """
    tree = cKDTree(data_uv)
    spacing = float(np.median(tree.query(data_uv, k=2)[0][:, 1]))
    near = tree.query(vertex_uv)[0] <= reach * spacing
    hull = Delaunay(data_uv)
    # the hull test goes through an interpolator: Delaunay.find_simplex falls back to a brute-force search
    # on the PAF grid's co-circular points (60 s here), the interpolators' own walk does not
    inside = near.copy()
    inside[near] = np.isfinite(LinearNDInterpolator(hull, np.zeros(len(data_uv)))(vertex_uv[near]))
    out = np.full((len(vertex_uv), data.shape[1]), np.nan)
    if kind == "ct":
        out[inside] = CloughTocher2DInterpolator(hull, data)(vertex_uv[inside])
    else:
        out[inside] = RBFInterpolator(data_uv, data, kernel="thin_plate_spline")(vertex_uv[inside])
    return out, inside


def _barycentric_matrix(tri_full: np.ndarray, tri_id: np.ndarray, bary: np.ndarray, n: int) -> sp.csr_matrix:
    """(P, n) sparse matrix that interpolates vertex values at P surface points (triangle + barycentrics)."""
    corners = tri_full[tri_id]
    rows = np.repeat(np.arange(len(tri_id)), 3)
    return sp.csr_matrix((np.asarray(bary, np.float64).ravel(), (rows, corners.ravel())), shape=(len(tri_id), n))


def _read_paf(v1: Path, tri_full: np.ndarray, mean_full: np.ndarray, tol: float):
    """Model_PAF.pkl + derived/paf_uv_bary.npz -> on-surface points: (A (P, N) bary matrix, mu (P, 3),
    w_id (P, 3, 40), w_exp (P, 3, 10), stats)."""
    paf = _load_pickle(v1 / "train.configs" / "Model_PAF.pkl")
    _require(paf, ("mu_filter", "w_filter", "w_exp_filter"), v1 / "train.configs" / "Model_PAF.pkl", "3DDFA PAF model")
    bary = np.load(v1 / "derived" / "paf_uv_bary.npz")
    _require(bary, ("tri_id", "bary", "surf_dist"), v1 / "derived" / "paf_uv_bary.npz", "PAF barycentric table")
    mu = _per_vertex(paf["mu_filter"], None, "Model_PAF mu_filter")
    w_id = _per_vertex(paf["w_filter"], len(mu), "Model_PAF w_filter")
    w_exp = _per_vertex(paf["w_exp_filter"], len(mu), "Model_PAF w_exp_filter")
    on = np.asarray(bary["surf_dist"]) <= tol
    a = _barycentric_matrix(tri_full, np.asarray(bary["tri_id"], np.int64)[on], bary["bary"][on], len(mean_full))
    resid = np.linalg.norm(a @ mean_full.astype(np.float64) - mu[on], axis=1)
    stats = {"paf_points": int(on.sum()), "paf_off_mesh": int((~on).sum()),
             "paf_mean_residual_max": float(resid.max()),
             # upstream bug: Model_PAF's expression block is a verbatim copy of the first 10 shape columns
             "paf_exp_is_shape_copy": bool(np.array_equal(w_exp, w_id[:, :, : w_exp.shape[2]]))}
    return a, mu[on], w_id[on], w_exp[on], stats


def load_tddfa_dense_public(v1_dir: PathLike, v2_dir: PathLike, noneck: bool = True,
                            params: DenseLiftParams | None = None) -> FaceModel:
    """A dense BFM for the 62-d 3DDFA parameters from public files only (no ``bfm_noneck_v3.pkl``).

    Inputs (3DDFA v1 / 3DDFA_V2 checkouts, see ``shared/assets/3ddfa_v1/MANIFEST.md``): mean
    ``u_shp + u_exp`` (53,215 vertices), ``visualize/tri.mat``, ``BFM_UV.mat``, ``indices.npy`` and
    ``tri.pkl`` (noneck), ``keypoints_sim.npy``; the bases come from ``Model_PAF.pkl`` (BFM mean + 40
    shape columns resampled on a 64x64 grid of surface points, located on the mean mesh by
    ``derived/paf_uv_bary.npz``) and ``c++/weights/{u_base,w_shp_base,w_exp_base}.txt`` (the exact
    bases at the 68 landmarks). Same units, coordinates and parameter convention as 3DDFA_V2's
    ``bfm_noneck_v3.pkl`` (unscaled bases, :mod:`common.geometry`); mean, topology, UVs and landmark
    vertices are exact, only the bases are estimated.

    Lifting (per basis column, all columns at once): inside the data, C1 Clough-Tocher interpolation
    in UV space of the data points; beyond (forehead top, temples, neck: farther than
    ``params.reach`` data spacings from any point) :func:`biharmonic_extension` on the mesh.

    * ``id_basis`` (V, 3, 40): data = the 3,867 on-surface PAF points (+ the 68 exact landmark rows
      with ``params.landmark_anchors``).
    * ``exp_basis`` (V, 3, 10): upstream ``Model_PAF.pkl``'s ``w_exp_filter`` is a copy of the first 10
      *shape* columns (checked, ``meta["paf_exp_is_shape_copy"]``), so the expression basis is a
      thin-plate spline in UV through the 68 exact landmark rows only, extended the same way.

    Accuracy against the exact 68-landmark bases (``benchmarks/dense_bfm_accuracy.py``; relative
    Frobenius error per basis column): identity held out (``landmark_anchors=False``) median 4.2 %,
    max 7.4 % (largest at the eye corners and inner lips, where the 64x64 grid is too coarse); with
    anchors 0 by construction. Landmark displacement for 3DDFA_V2-statistics identities: see the
    benchmark. Expression: exact at the landmarks; leave-one-landmark-out error of the same spline
    median 16 %, so treat the dense expression away from the landmarks as a smooth approximation.

    ``noneck=False`` gives the 53,215-vertex trimmed BFM (``tri.mat``). Takes a few seconds; use
    :func:`save_face_model` / :func:`load_face_model` to reuse a built model.
    """
    p = params or DenseLiftParams()
    v1, v2 = Path(v1_dir), Path(v2_dir)
    v2_files = TDDFAAssets.from_dir(v2)
    mean_full = _per_vertex(np.load(v1 / "train.configs" / "u_shp.npy") + np.load(v1 / "train.configs" / "u_exp.npy"),
                            None, "u_shp + u_exp")
    n_full = len(mean_full)
    uv_full = load_bfm_uv(v2_files.bfm_uv)
    if len(uv_full) != n_full:
        raise ValueError(f"u_shp has {n_full} vertices but BFM_UV.mat {len(uv_full)} rows; both should be 53215")
    tri_full = _triangles(_load_array(v1 / "visualize" / "tri.mat", "tri"), n_full, True, "tri.mat")
    kp_full = keypoints_from_interleaved(np.load(v1 / "train.configs" / "keypoints_sim.npy"))
    weights = v1 / "c++" / "weights"
    u_base = _per_vertex(np.loadtxt(weights / "u_base.txt"), 68, "u_base.txt")
    lm_id = _per_vertex(np.loadtxt(weights / "w_shp_base.txt"), 68, "w_shp_base.txt")
    lm_exp = _per_vertex(np.loadtxt(weights / "w_exp_base.txt"), 68, "w_exp_base.txt")
    lm_err = float(np.abs(u_base - mean_full[kp_full]).max())
    if lm_err > 1e-3 * float(np.ptp(mean_full)):
        raise ValueError(f"u_base.txt differs from (u_shp + u_exp)[keypoints] by {lm_err:.3g} units: the sparse "
                         f"and dense files are not the same model")
    _, _, paf_id, paf_exp, stats = _read_paf(v1, tri_full, mean_full, p.paf_surface_tol)
    paf = np.load(v1 / "derived" / "paf_uv_bary.npz")
    on = np.asarray(paf["surf_dist"]) <= p.paf_surface_tol
    paf_uv = _barycentric_matrix(tri_full, np.asarray(paf["tri_id"], np.int64)[on], paf["bary"][on], n_full) @ uv_full

    if noneck:
        sel = np.asarray(_load_array(v2_files.indices), np.int64).ravel()
        tri = _triangles(_load_array(v2_files.triangles), len(sel), False, "tri.pkl")
    else:
        sel, tri = np.arange(n_full), tri_full
    uv, lap = uv_full[sel], _uniform_laplacian(tri, len(sel))
    lm_uv = uv_full[kp_full]

    id_uv, id_data = paf_uv, paf_id.reshape(len(paf_id), -1)
    if p.landmark_anchors:
        id_uv, id_data = np.concatenate([id_uv, lm_uv]), np.concatenate([id_data, lm_id.reshape(68, -1)])
    id_vals, id_known = _uv_interpolate("ct", id_uv, id_data, uv, p.reach)
    id_basis = biharmonic_extension(lap, id_vals, id_known).reshape(len(sel), 3, -1)
    if stats["paf_exp_is_shape_copy"]:
        exp_vals, exp_known = _uv_interpolate("tps", lm_uv, lm_exp.reshape(68, -1), uv, np.inf)
        exp_source = "thin-plate spline in UV through the 68 exact landmark rows (w_exp_base.txt)"
    else:
        exp_vals, exp_known = _uv_interpolate("ct", paf_uv, paf_exp.reshape(len(paf_exp), -1), uv, p.reach)
        exp_source = "Model_PAF w_exp_filter"
    exp_basis = biharmonic_extension(lap, exp_vals, exp_known).reshape(len(sel), 3, -1)

    kp = _subset_map(kp_full, sel, "keypoints_sim")
    meta = {"source": "3ddfa public dense (PAF-lifted bases)", "files": [str(v1), str(v2)],
            "units": "BFM (~1.8e5 across)",
            "parameters": "3DDFA_V2 62-d (12 pose + 40 w_shp + 10 w_exp), unscaled bases",
            "lift": {"reach": p.reach, "landmark_anchors": p.landmark_anchors,
                     "id_interpolated_fraction": float(id_known.mean()),
                     "exp_interpolated_fraction": float(exp_known.mean()), "exp_source": exp_source},
            "id_known": id_known, "exp_known": exp_known,
            **stats}
    return _assemble("bfm-3ddfa-public" + ("" if noneck else "-trim"), mean_full[sel], id_basis, exp_basis, tri,
                     uv, keypoints=kp, meta=meta)


# ----------------------------------------------------------------------------- model files
def save_face_model(model: FaceModel, path: PathLike) -> None:
    """Write a :class:`FaceModel` to one ``.npz`` (arrays as stored, regions as ``region/<name>``, meta as JSON).

    Lets a pipeline build a slow model once (:func:`load_tddfa_dense_public`) and reuse it;
    :func:`load_face_model` reads it back with the same fingerprint.
    """
    arrays = {k: getattr(model, k) for k in ("mean_shape", "id_basis", "exp_basis", "triangles", "uv", "symmetry",
                                             "tex_mean", "tex_basis", "keypoints")
              if getattr(model, k) is not None}
    arrays.update({f"region/{k}": v for k, v in model.regions.items()})
    meta = json.dumps(dict(model.meta), default=lambda o: o.tolist() if isinstance(o, np.ndarray | np.generic)
                      else str(o))
    with open(path, "wb") as f:
        np.savez(f, name=np.array(model.name), meta=np.array(meta), format=np.array(_MODEL_FILE_FORMAT), **arrays)


def load_face_model(path: PathLike) -> FaceModel:
    """Read a model written by :func:`save_face_model` (meta arrays come back as lists)."""
    with np.load(path, allow_pickle=False) as z:
        if "format" not in z or str(z["format"]) != _MODEL_FILE_FORMAT:
            raise ValueError(f"{path}: not a face-model file of format {_MODEL_FILE_FORMAT!r} "
                             f"(write it with common.loaders.save_face_model)")
        d = {k: z[k] for k in z.files}
    regions = {k.split("/", 1)[1]: d.pop(k) for k in list(d) if k.startswith("region/")}
    name, meta = str(d.pop("name")), json.loads(str(d.pop("meta")))
    d.pop("format")
    return FaceModel(name=name, regions=regions, meta=meta, **d)


_MODEL_FILE_FORMAT = "uvtex-facemodel-1"
