"""Face-model loaders on small fake files in the real layouts, and on the real public BFM files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.io as sio
from conftest import SHARED_ASSETS, asset_path

from common.facemodel import REGION_NAMES, FaceModel, uv_symmetry_error
from common.faces.assets import TDDFAAssets
from common.loaders import (
    BFMLayout,
    deep3d_uv_from_layout,
    keypoints_from_interleaved,
    load_bfm2009,
    load_bfm_mean_mesh,
    load_deep3d,
    load_param_stats,
    load_tddfa_v2,
)
from common.regions import derive_regions, geometric_landmarks

# Measured on the real 3DDFA noneck mean mesh (u_shp + u_exp, BFM_UV[indices], tri.pkl); see
# test_bfm_mean_mesh_real. Face region, UV units: mean 2.8e-4, max 0.0192; involution 0.981.
BFM_UV_SYM_MEAN, BFM_UV_SYM_MAX, BFM_INVOLUTION = 5e-4, 0.025, 0.97


# ----------------------------------------------------------------------------- synthetic face
def synthetic_face(n: int = 41, scale: float = 1e5):
    """A symmetric face-like height field: vertices (n*n, 3), CLOCKWISE triangles (F, 3), uv (n*n, 2).

    Clockwise as in the BFM files, so the loaders must reverse them. UV is linear in (x, y), v up.
    """
    t = np.linspace(-1.0, 1.0, n)
    x, y = np.meshgrid(t, t)
    z = (0.6 * (1 - 0.5 * x**2 - 0.2 * y**2)
         + 0.35 * np.exp(-(x**2 / 0.01 + (y + 0.05) ** 2 / 0.06))  # nose
         - 0.05 * np.exp(-((np.abs(x) - 0.35) ** 2 / 0.01 + (y - 0.3) ** 2 / 0.004)))  # eye sockets
    v = np.stack([x, y, z], -1).reshape(-1, 3) * scale
    i = np.arange(n * n).reshape(n, n)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, 1:].ravel(), i[1:, :-1].ravel()
    tri_ccw = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])  # CCW seen from +z
    uv = np.stack([(x.ravel() + 1) / 2, (y.ravel() + 1) / 2], 1)
    return v, tri_ccw[:, [0, 2, 1]], uv


def _normals_z(model: FaceModel) -> np.ndarray:
    v, t = model.mean_shape.astype(np.float64), model.triangles
    return np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])[:, 2]


def _check_model(model: FaceModel, mirror_tol: float) -> None:
    """Invariants every loaded model must meet: winding, symmetry, regions."""
    assert model.mean_shape.dtype == np.float32 and model.triangles.dtype == np.int64
    assert model.uv.min() >= 0 and model.uv.max() <= 1
    # outward winding: front-facing triangles (most of a face mask) have normals towards +z
    assert (_normals_z(model) > 0).mean() > 0.9
    sym = model.symmetry
    assert (sym[sym] == np.arange(model.n_vertices)).mean() > 0.95
    plane = model.meta["symmetry_plane_x"]
    mirrored = model.mean_shape.astype(np.float64).copy()
    mirrored[:, 0] = 2 * plane - mirrored[:, 0]
    err = np.linalg.norm(mirrored - model.mean_shape[sym], axis=1)
    assert np.median(err) < mirror_tol, np.median(err)
    for name in REGION_NAMES:
        assert model.regions[name].any(), name
    left, right = model.regions["left"], model.regions["right"]
    assert not (left & right).any()
    # the halves mirror each other: the partner of a left vertex is a right vertex
    assert right[sym[left]].mean() > 0.99 and left[sym[right]].mean() > 0.99
    for name in ("eyes", "mouth"):
        assert not (model.regions["face"] & model.regions[name]).any()
    assert (model.regions["nostrils"] <= model.regions["nose"]).all()


# ----------------------------------------------------------------------------- fake files
def _landmark_ids(v: np.ndarray) -> np.ndarray:
    lm = geometric_landmarks(v)
    return np.argmin(((v[None, :, :2] - lm[:, None, :2]) ** 2).sum(-1), 1)


def _write_tddfa(tmp_path, v, tri, uv_full, indices, k_shp=40, k_exp=10, seed=0):
    rng = np.random.default_rng(seed)
    n = len(v)
    kp68 = _landmark_ids(v)
    kp = np.stack([3 * kp68, 3 * kp68 + 1, 3 * kp68 + 2], 1).ravel()
    bfm = {"u": v.reshape(-1, 1).astype(np.float32),
           "w_shp": rng.normal(size=(3 * n, k_shp)).astype(np.float32),
           "w_exp": rng.normal(size=(3 * n, k_exp)).astype(np.float32),
           "tri": tri.astype(np.int32), "keypoints": kp.astype(np.int64)}
    with open(tmp_path / "bfm_noneck_v3.pkl", "wb") as f:
        pickle.dump(bfm, f)
    sio.savemat(tmp_path / "BFM_UV.mat", {"UV": uv_full})
    np.save(tmp_path / "indices.npy", indices.astype(np.int32))
    with open(tmp_path / "tri.pkl", "wb") as f:
        pickle.dump(np.ascontiguousarray(tri.T.astype(np.int32)), f)
    return bfm, kp68


def test_tddfa_v2_fake(tmp_path):
    v, tri, uv = synthetic_face()
    # the UV table covers a bigger mesh; the model's vertices are every row but the first 7
    extra = np.random.default_rng(1).uniform(size=(7, 2))
    uv_full = np.concatenate([extra, uv])
    indices = np.arange(7, 7 + len(v))
    bfm, kp68 = _write_tddfa(tmp_path, v, tri, uv_full, indices)
    m = load_tddfa_v2(tmp_path / "bfm_noneck_v3.pkl", tmp_path / "BFM_UV.mat", tmp_path / "indices.npy")
    assert (m.n_vertices, m.n_id, m.n_exp, m.n_triangles) == (len(v), 40, 10, len(tri))
    j = 123  # vertex j is u[3j:3j+3], its basis rows 3j..3j+2, its UV row indices[j]
    np.testing.assert_array_equal(m.mean_shape[j], bfm["u"][3 * j:3 * j + 3, 0])
    np.testing.assert_array_equal(m.id_basis[j, 1], bfm["w_shp"][3 * j + 1])
    np.testing.assert_array_equal(m.exp_basis[j, 2], bfm["w_exp"][3 * j + 2])
    np.testing.assert_allclose(m.uv[j], uv_full[indices[j]], atol=1e-7)
    np.testing.assert_array_equal(m.keypoints, kp68)
    assert m.meta["winding_reversed"] and not m.meta["uv_v_flipped"]
    assert m.shape(np.zeros((1, 40)), np.zeros((1, 10))).shape == (1, len(v), 3)
    _check_model(m, mirror_tol=1.0)
    assert uv_symmetry_error(m)["max"] < 1e-6  # the synthetic layout is exactly symmetric

    # tri.pkl (3, F) replaces the pickle's tri; the same mesh comes out
    m2 = load_tddfa_v2(tmp_path / "bfm_noneck_v3.pkl", tmp_path / "BFM_UV.mat", indices,
                       tri_pkl=tmp_path / "tri.pkl", keypoints=kp68)
    np.testing.assert_array_equal(m2.triangles, m.triangles)


def test_tddfa_v2_errors(tmp_path):
    v, tri, uv = synthetic_face(21)
    bfm, _ = _write_tddfa(tmp_path, v, tri, uv, np.arange(len(v)))
    del bfm["w_exp"]
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(bfm, f)
    with pytest.raises(KeyError, match=r"w_exp.*bad\.pkl|bad\.pkl.*w_exp"):
        load_tddfa_v2(tmp_path / "bad.pkl", tmp_path / "BFM_UV.mat", tmp_path / "indices.npy")
    with pytest.raises(ValueError, match="indices"):
        load_tddfa_v2(tmp_path / "bfm_noneck_v3.pkl", tmp_path / "BFM_UV.mat", np.arange(5))
    with pytest.raises(ValueError, match="interleaved"):
        keypoints_from_interleaved(np.arange(204) * 2)


def test_v_down_layout_is_flipped(tmp_path):
    v, tri, uv = synthetic_face(21)
    uv_down = np.stack([uv[:, 0], 1 - uv[:, 1]], 1)
    _write_tddfa(tmp_path, v, tri, uv_down, np.arange(len(v)))
    m = load_tddfa_v2(tmp_path / "bfm_noneck_v3.pkl", tmp_path / "BFM_UV.mat", tmp_path / "indices.npy")
    assert m.meta["uv_v_flipped"]
    np.testing.assert_allclose(m.uv, uv, atol=1e-6)


def test_param_stats(tmp_path):
    d = {"mean": np.arange(62, dtype=np.float32), "std": np.ones(62, np.float32)}
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(d, f)
    mean, std = load_param_stats(tmp_path / "p.pkl")
    np.testing.assert_array_equal(mean, d["mean"])
    assert std.shape == (62,) and std.dtype == np.float32
    with open(tmp_path / "q.pkl", "wb") as f:
        pickle.dump({"mean": d["mean"]}, f)
    with pytest.raises(KeyError, match="std"):
        load_param_stats(tmp_path / "q.pkl")


def test_param_stats_real():
    mean, std = load_param_stats(asset_path(TDDFAAssets.from_dir(SHARED_ASSETS / "3ddfa_v2").param_stats))
    assert mean.shape == std.shape == (62,) and (std > 0).all()


# ----------------------------------------------------------------------------- BFM 2009
def _write_bfm2009(path, ref, tri_ref, offset, k=5, n_extra=40, seed=0):
    """A 01_MorphableModel.mat whose shapeMU holds ``ref - offset`` (shuffled) plus ``n_extra``
    ear/neck vertices below the face. Returns the ground truth trim index and the variables."""
    rng = np.random.default_rng(seed)
    m = len(ref)
    lo = ref.min(0)
    ext = np.ptp(ref, 0)
    extra = np.stack([rng.uniform(lo[0], lo[0] + ext[0], n_extra), lo[1] - ext[1] * rng.uniform(0.2, 0.5, n_extra),
                      rng.uniform(lo[2], lo[2] + 0.5 * ext[2], n_extra)], 1)  # behind the nose, like a neck
    full = np.concatenate([ref - offset, extra])
    perm = rng.permutation(len(full))  # full[perm[i]] is stored at row i
    inv = np.argsort(perm)
    trim = inv[:m]  # trimmed vertex i is stored at row trim[i]
    shape_mu = full[perm]
    n = len(full)
    tri_extra = rng.integers(m, n, size=(10, 3))
    tl = inv[np.concatenate([tri_ref, tri_extra])] + 1
    var = {"shapeMU": shape_mu.reshape(-1, 1), "shapePC": rng.normal(size=(3 * n, k)),
           "shapeEV": np.linspace(3e4, 1e4, k)[:, None], "texMU": rng.uniform(0, 255, (3 * n, 1)),
           "texPC": rng.normal(size=(3 * n, k)), "texEV": np.linspace(20, 5, k)[:, None], "tl": tl.astype(np.int32)}
    sio.savemat(path, var)
    return trim, var


def _write_layout(tmp_path, ref, uv, indices, kp68):
    sio.savemat(tmp_path / "BFM_UV.mat", {"UV": uv})
    np.save(tmp_path / "indices.npy", indices.astype(np.int32))
    np.save(tmp_path / "u_shp.npy", ref.reshape(-1, 1).astype(np.float32))
    np.save(tmp_path / "kp.npy", np.stack([3 * kp68, 3 * kp68 + 1, 3 * kp68 + 2], 1).ravel())
    return BFMLayout(uv_mat=tmp_path / "BFM_UV.mat", indices=tmp_path / "indices.npy",
                     reference_shape=tmp_path / "u_shp.npy", keypoints=tmp_path / "kp.npy")


@pytest.mark.parametrize("offset_frac", [0.0, 0.4, 3.0])
def test_bfm2009_fake(tmp_path, offset_frac):
    ref, tri, uv = synthetic_face(31)
    spacing = 2e5 / 30
    offset = offset_frac * spacing * np.array([1.0, -0.5, 0.3])  # a fixed shift, recovered by the fit
    trim, var = _write_bfm2009(tmp_path / "01_MorphableModel.mat", ref, tri, offset)
    indices = np.arange(len(ref))[np.abs(ref[:, 1]) < 0.9e5]  # a "noneck" subset: top and bottom rows cut
    layout = _write_layout(tmp_path, ref, uv, indices, indices[_landmark_ids(ref[indices])])
    m = load_bfm2009(tmp_path / "01_MorphableModel.mat", layout)
    corr = m.meta["correspondence"]
    assert corr["matched"] == corr["distinct"] == len(ref) and corr["residual_max"] < 1e-3 * spacing
    np.testing.assert_allclose(corr["offset"], offset, atol=1e-3 * spacing)
    np.testing.assert_array_equal(m.meta["bfm2009_vertex_ids"], trim[indices])
    assert m.n_vertices == len(indices) and (m.n_id, m.n_exp, m.n_tex) == (5, 0, 5)
    j = 77  # model vertex j is BFM vertex r = trim[indices[j]]: xyz rows 3r..3r+2, UV row indices[j]
    r = trim[indices[j]]
    np.testing.assert_allclose(m.mean_shape[j], var["shapeMU"][3 * r:3 * r + 3, 0], rtol=1e-6)
    np.testing.assert_allclose(m.id_basis[j, 0], var["shapePC"][3 * r] * var["shapeEV"][:, 0], rtol=1e-5)
    np.testing.assert_allclose(m.tex_mean[j], var["texMU"][3 * r:3 * r + 3, 0] / 255, rtol=1e-6)
    np.testing.assert_allclose(m.tex_basis[j, 2], var["texPC"][3 * r + 2] * var["texEV"][:, 0] / 255, rtol=1e-5)
    np.testing.assert_allclose(m.uv[j], uv[indices[j]], atol=1e-7)
    assert 0 <= m.tex_mean.min() and m.tex_mean.max() <= 1
    # 1-based tl -> 0-based: exactly the face triangles inside the subset survive
    inside = np.isin(tri, indices).all(1)
    assert m.n_triangles == inside.sum()
    _check_model(m, mirror_tol=1.0)

    # an explicit 1-based trim index (.mat, face3d's trimIndex) gives the same model
    sio.savemat(tmp_path / "model_info.mat", {"trimIndex": (trim + 1)[:, None]})
    m2 = load_bfm2009(tmp_path / "01_MorphableModel.mat", layout, trim_index=tmp_path / "model_info.mat",
                      noneck=False, n_id=3)
    assert m2.n_vertices == len(ref) and m2.n_id == 3 and m2.meta["correspondence"]["method"] == "trim_index"
    np.testing.assert_allclose(m2.mean_shape, ref - offset, atol=1e-6 * 1e5)


def test_bfm2009_errors(tmp_path):
    ref, tri, uv = synthetic_face(21)
    _write_bfm2009(tmp_path / "mm.mat", ref, tri, np.zeros(3))
    layout = _write_layout(tmp_path, ref, uv, np.arange(len(ref)), _landmark_ids(ref))
    bad = BFMLayout(uv_mat=layout.uv_mat, indices=layout.indices, reference_shape=None)
    with pytest.raises(ValueError, match="trim_index"):
        load_bfm2009(tmp_path / "mm.mat", bad)
    # a reference that is not the same mesh fails loudly instead of matching silently
    np.save(tmp_path / "u_shp.npy", (ref * 1.3 + 7e3).reshape(-1, 1) + np.random.default_rng(0).normal(
        0, 2e3, (3 * len(ref), 1)))
    with pytest.raises(ValueError, match="matching failed"):
        load_bfm2009(tmp_path / "mm.mat", layout)
    sio.savemat(tmp_path / "nokeys.mat", {"shapeMU": ref.reshape(-1, 1)})
    with pytest.raises(KeyError, match="shapePC"):
        load_bfm2009(tmp_path / "nokeys.mat", layout)


# ----------------------------------------------------------------------------- Deep3D
def _write_deep3d(path, v, tri, uv=None, seed=0):
    rng = np.random.default_rng(seed)
    n = len(v)
    var = {"meanshape": v.reshape(1, -1) / 1e5, "idBase": rng.normal(size=(3 * n, 80)) * 1e-3,
           "exBase": rng.normal(size=(3 * n, 64)) * 1e-3, "meantex": rng.uniform(0, 255, (1, 3 * n)),
           "texBase": rng.normal(size=(3 * n, 80)), "tri": (tri + 1).astype(np.int32),
           "keypoints": (_landmark_ids(v) + 1)[:, None].astype(np.int32),
           "point_buf": np.ones((n, 8), np.int32)}
    if uv is not None:
        var["uv"] = uv
    sio.savemat(path, var)
    return var


def test_deep3d_fake(tmp_path):
    v, tri, uv = synthetic_face(31)
    var = _write_deep3d(tmp_path / "BFM_model_front.mat", v, tri)
    with pytest.raises(ValueError, match="no UV coordinates.*deep3d_uv_from_layout"):
        load_deep3d(tmp_path / "BFM_model_front.mat")
    m = load_deep3d(tmp_path / "BFM_model_front.mat", uv=uv, recenter=False)
    assert (m.n_id, m.n_exp, m.n_tex) == (80, 64, 80)
    j = 200
    np.testing.assert_allclose(m.mean_shape[j], var["meanshape"][0, 3 * j:3 * j + 3], rtol=1e-6)
    np.testing.assert_allclose(m.exp_basis[j, 1], var["exBase"][3 * j + 1], rtol=1e-6)
    np.testing.assert_allclose(m.tex_mean[j], var["meantex"][0, 3 * j:3 * j + 3] / 255, rtol=1e-6)
    np.testing.assert_array_equal(m.keypoints, var["keypoints"][:, 0] - 1)
    assert m.tex_mean.min() >= 0 and m.tex_mean.max() <= 1
    assert np.array_equal(np.sort(m.triangles, 1), np.sort(tri, 1))  # 1-based -> 0-based
    _check_model(m, mirror_tol=1e-5)

    # a file that carries its own uv; recentring as Deep3D does
    _write_deep3d(tmp_path / "with_uv.mat", v, tri, uv=uv)
    m2 = load_deep3d(tmp_path / "with_uv.mat")
    np.testing.assert_allclose(m2.mean_shape.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(m2.uv, m.uv)

    # UV from Deep3D's BFM_front_idx.mat (1-based rows of BFM_UV.mat)
    sio.savemat(tmp_path / "BFM_UV.mat", {"UV": np.concatenate([uv, uv[:3]])[::-1]})
    sio.savemat(tmp_path / "front.mat", {"idx": (len(uv) + 3 - np.arange(len(uv)))[:, None]})
    np.testing.assert_allclose(deep3d_uv_from_layout(tmp_path / "BFM_UV.mat", tmp_path / "front.mat"), uv)

    sio.savemat(tmp_path / "bad.mat", {k: x for k, x in var.items() if k != "idBase"})
    with pytest.raises(KeyError, match="idBase"):
        load_deep3d(tmp_path / "bad.mat", uv=uv)


# ----------------------------------------------------------------------------- regions
def test_regions_geometry_only():
    v, tri, uv = synthetic_face()
    r = derive_regions(v, uv, keypoints=None, triangles=tri[:, [0, 2, 1]])
    assert set(REGION_NAMES) <= set(r)
    tip = np.argmax(v[:, 2])
    assert r["nose"][tip] and r["centre"][tip] and not r["left"][tip] and not r["right"][tip]
    assert r["eyes"].sum() < 0.1 * len(v) and r["mouth"].sum() < 0.05 * len(v)
    with pytest.raises(ValueError, match="uv"):
        derive_regions(v, uv[:10])


# ----------------------------------------------------------------------------- real BFM files
def test_bfm_mean_mesh_real():
    v1, v2 = asset_path("3ddfa_v1"), asset_path("3ddfa_v2")
    asset_path("3ddfa_v1", "train.configs", "u_shp.npy")
    asset_path(TDDFAAssets.from_dir(v2).bfm_uv)
    m = load_bfm_mean_mesh(v1, v2)
    assert (m.n_vertices, m.n_triangles, m.n_id, m.n_exp) == (38365, 76073, 0, 0)
    assert m.meta["winding_reversed"] and not m.meta["uv_v_flipped"]
    # forehead at the top of the UV image, chin at the bottom, face's left (x > 0) on the right
    y = m.mean_shape[:, 1]
    assert m.uv[np.argmax(y), 1] > 0.9 and m.uv[np.argmin(y), 1] < 0.3 and m.uv[m.keypoints[8], 1] < 0.3
    assert m.uv[np.argmax(m.mean_shape[:, 0]), 0] > 0.9
    # the nose tip landmark (iBUG 31) is the most forward vertex's neighbour
    tip = m.mean_shape[m.keypoints[30]]
    assert tip[2] > np.percentile(m.mean_shape[:, 2], 99.9)
    assert abs(m.meta["symmetry_plane_x"] + 330) < 100  # BFM's plane: x ~ -330 units, not 0
    _check_model(m, mirror_tol=1000.0)  # median mirror mismatch ~400 units (vertex spacing ~1e3)
    err = uv_symmetry_error(m)
    assert err["mean"] < BFM_UV_SYM_MEAN and err["max"] < BFM_UV_SYM_MAX and err["involution"] > BFM_INVOLUTION
    sizes = {k: int(x.sum()) for k, x in m.regions.items()}
    assert 800 < sizes["eyes"] < 3000 and 200 < sizes["mouth"] < 1500 and 50 < sizes["nostrils"] < 600
    assert m.regions["eyes"][m.keypoints[[37, 44]]].all() and m.regions["nose"][m.keypoints[30]]


def test_tddfa_v2_real_layout(tmp_path):
    """bfm_noneck_v3.pkl is not public here: write one from the real mean, tri and keypoints with random bases."""
    v1 = asset_path("3ddfa_v1", "train.configs")
    v2 = TDDFAAssets.from_dir(asset_path("3ddfa_v2"), require=("bfm_uv", "indices", "triangles"))
    u = (np.load(v1 / "u_shp.npy") + np.load(v1 / "u_exp.npy")).reshape(-1, 3)
    idx = np.load(v2.indices).astype(np.int64)
    with open(v2.triangles, "rb") as f:
        tri = pickle.load(f)
    kp = keypoints_from_interleaved(np.load(v1 / "keypoints_sim.npy"))
    kp_noneck = np.searchsorted(idx, kp)
    n = len(idx)
    rng = np.random.default_rng(0)
    bfm = {"u": u[idx].reshape(-1, 1), "w_shp": rng.normal(size=(3 * n, 40)).astype(np.float32),
           "w_exp": rng.normal(size=(3 * n, 10)).astype(np.float32), "tri": tri.T,
           "keypoints": np.stack([3 * kp_noneck, 3 * kp_noneck + 1, 3 * kp_noneck + 2], 1).ravel()}
    with open(tmp_path / "bfm_noneck_v3.pkl", "wb") as f:
        pickle.dump(bfm, f)
    m = load_tddfa_v2(tmp_path / "bfm_noneck_v3.pkl", v2.bfm_uv, v2.indices, v2.triangles)
    ref = load_bfm_mean_mesh(v1.parent, v2.root)
    np.testing.assert_array_equal(m.mean_shape, ref.mean_shape)
    np.testing.assert_array_equal(m.triangles, ref.triangles)
    np.testing.assert_array_equal(m.uv, ref.uv)
    np.testing.assert_array_equal(m.keypoints, ref.keypoints)
    np.testing.assert_array_equal(m.symmetry, ref.symmetry)
    # the 68 landmarks of the model are the v1 sparse mean (u_base = (u_shp + u_exp)[keypoints_sim])
    np.testing.assert_allclose(m.mean_shape[m.keypoints], u[kp], rtol=1e-6)


def test_bfm2009_real_layout(tmp_path):
    """A fake 01_MorphableModel.mat holding the real trimmed mean plus fake ear/neck vertices."""
    v1 = asset_path("3ddfa_v1")
    v2 = TDDFAAssets.from_dir(asset_path("3ddfa_v2"), require=("bfm_uv", "indices"))
    ref = np.load(v1 / "train.configs" / "u_shp.npy").reshape(-1, 3).astype(np.float64)
    tri_full = sio.loadmat(v1 / "visualize" / "tri.mat")["tri"].T.astype(np.int64) - 1
    trim, var = _write_bfm2009(tmp_path / "mm.mat", ref, tri_full, np.zeros(3), k=3, n_extra=275)
    layout = BFMLayout.from_dirs(v1, v2.root)
    m = load_bfm2009(tmp_path / "mm.mat", layout)
    corr = m.meta["correspondence"]
    assert corr["matched"] == corr["distinct"] == 53215 and corr["residual_max"] < 1.0
    idx = np.load(v2.indices)
    np.testing.assert_array_equal(m.meta["bfm2009_vertex_ids"], trim[idx])
    assert m.n_vertices == 38365 and m.n_triangles == 76073 and m.n_tex == 3
    _check_model(m, mirror_tol=1000.0)
    err = uv_symmetry_error(m)
    assert err["mean"] < BFM_UV_SYM_MEAN and err["max"] < BFM_UV_SYM_MAX
