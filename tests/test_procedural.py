"""The procedural face model: size, speed, exact symmetry, regions, landmarks, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from common.facemodel import REGION_NAMES, uv_symmetry_error
from common.geometry import vertex_normals
from common.procedural import ProceduralConfig, build_procedural_model

MIRROR = np.array([-1.0, 1.0, 1.0], np.float32)


@pytest.fixture(scope="module")
def model():
    return build_procedural_model()


def test_builds_fast_with_expected_size():
    times = []
    for _ in range(2):  # best of two: the first call also pays for imports and allocator warm-up
        t0 = time.perf_counter()
        m = build_procedural_model()
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0, f"build took {min(times):.2f} s"
    assert 20_000 <= m.n_vertices <= 40_000
    assert (m.n_id, m.n_exp, m.n_tex) == (40, 10, 16)
    assert m.keypoints.shape == (68,)
    extent = m.mean_shape.max(0) - m.mean_shape.min(0)
    assert 1.8 < extent[0] < 2.2  # ~2.0 across, as recorded in meta
    assert "2.0" in m.meta["units"]


def test_mesh_is_exactly_mirror_symmetric(model):
    sym = model.symmetry
    assert np.array_equal(sym[sym], np.arange(model.n_vertices))
    assert np.abs(model.mean_shape[sym] * MIRROR - model.mean_shape).max() <= 1e-6
    # the UV flip is exact, bit for bit
    assert np.array_equal(model.uv[sym, 0], 1.0 - model.uv[:, 0])
    assert np.array_equal(model.uv[sym, 1], model.uv[:, 1])
    assert uv_symmetry_error(model)["max"] == 0.0
    # the triangulation mirrors onto itself (winding reversed by the mirror)
    tris = {tuple(t) for t in np.sort(model.triangles, 1).tolist()}
    mirrored = {tuple(t) for t in np.sort(sym[model.triangles], 1).tolist()}
    assert tris == mirrored


def test_bases_keep_their_symmetry_and_are_orthogonal(model):
    flags = np.array(model.meta["id_symmetric"])
    assert flags.sum() == 32 and (~flags).sum() == 8
    b = model.id_basis
    mirrored = b[model.symmetry] * MIRROR[None, :, None]
    assert np.abs(mirrored[..., flags] - b[..., flags]).max() < 1e-6
    assert np.abs(mirrored[..., ~flags] + b[..., ~flags]).max() < 1e-6
    flat = b.reshape(-1, b.shape[2]).astype(np.float64)
    cos = (flat.T @ flat) / np.outer(np.linalg.norm(flat, axis=0), np.linalg.norm(flat, axis=0))
    assert np.abs(cos - np.eye(len(cos))).max() < 1e-4
    # N(0, 1) coefficients move vertices by centimetres (~0.1 units), not by the face's size
    rng = np.random.default_rng(0)
    d = model.shape(rng.normal(size=(8, 40)), rng.normal(size=(8, 10))) - model.mean_shape
    rms = np.sqrt((d ** 2).sum(-1).mean())
    assert 0.03 < rms < 0.25, rms


def test_regions_mirror_and_nest(model):
    r, sym = model.regions, model.symmetry
    assert set(REGION_NAMES) <= set(r)
    assert np.array_equal(r["left"][sym], r["right"])
    for name in ("face", "centre", "nose", "nostrils", "mouth", "eyes"):
        assert np.array_equal(r[name][sym], r[name]), name
        assert r[name].sum() > 10, name
    assert not (r["nostrils"] & ~r["nose"]).any()
    assert not (r["face"] & (r["eyes"] | r["mouth"])).any()
    assert (model.mean_shape[r["left"], 0] >= 0).all()
    assert r["face"].mean() > 0.9


def test_keypoints_sit_on_their_features(model):
    kp, p = model.keypoints, model.mean_shape[model.keypoints]
    sym = model.symmetry
    assert np.array_equal(sym[kp[0:8]], kp[16:8:-1])  # jaw mirrors
    assert np.array_equal(sym[kp[36]], kp[45]) and np.array_equal(sym[kp[48]], kp[54])
    assert p[30, 2] == p[:, 2].max()  # the nose tip is the most protruding landmark
    assert p[8, 1] == p[:, 1].min()  # the chin is the lowest
    assert p[36, 0] < p[39, 0] < 0 < p[42, 0] < p[45, 0]  # subject's right eye on -x
    assert model.regions["nose"][kp[30]] and model.regions["centre"][kp[33]]
    assert p[62, 1] > p[66, 1]  # inner upper lip above inner lower lip


def test_winding_points_out(model):
    n = vertex_normals(torch.as_tensor(model.mean_shape)[None], torch.as_tensor(model.triangles))[0].numpy()
    front = np.abs(model.mean_shape[:, 0]) < 0.5
    assert (n[front, 2] > 0).mean() > 0.97
    assert n[model.keypoints[27], 2] > 0.5


def test_texture_is_plausible(model):
    assert model.tex_mean.min() >= 0 and model.tex_mean.max() <= 1
    skin = model.tex_mean[model.regions["face"]].mean(0)
    assert skin[0] > skin[1] > skin[2]  # skin: red > green > blue
    lips = model.tex_mean[model.keypoints[51]]
    assert lips[0] / lips[1] > skin[0] / skin[1]  # lips redder than skin
    t = model.texture(np.random.default_rng(1).normal(size=(16, 16)))
    assert ((t >= 0) & (t <= 1)).mean() > 0.99


def test_deterministic_from_seed(model):
    again = build_procedural_model()
    assert again.fingerprint() == model.fingerprint()
    assert np.array_equal(again.id_basis, model.id_basis)
    other = build_procedural_model(ProceduralConfig(seed=1))
    assert other.fingerprint() != model.fingerprint()
    assert np.array_equal(other.mean_shape, model.mean_shape)  # the seed only drives random components


def test_rejects_even_grid():
    with pytest.raises(ValueError, match="odd"):
        build_procedural_model(ProceduralConfig(grid=100))
