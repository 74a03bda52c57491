"""Eq. 8 ridge texture fit and the masked-PCA texture basis."""

import numpy as np
import pytest

from preprocess.config import MaskedPCAConfig
from preprocess.texture import UVTextureBasis, learn_masked_pca, ridge_texture_fit


def _random_basis(u=24, k=6, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:u, 0:u] / u
    # smooth, symmetric-ish components so the masked problems stay well posed
    freqs = rng.permutation([(a, b) for a in range(4) for b in range(4) if a + b > 0])[:k]
    comps = [np.stack([np.cos(np.pi * (a * xx + b * yy) + c) for c in (0.0, 0.5, 1.0)], -1) for a, b in freqs]
    basis = 0.1 * np.stack(comps, -1).astype(np.float32)
    mean = np.full((u, u, 3), 0.5, np.float32)
    return UVTextureBasis(mean=mean, basis=basis, valid=np.ones((u, u), bool), name="test")


def test_ridge_recovers_coefficients_from_half_observed_maps():
    basis = _random_basis()
    rng = np.random.default_rng(1)
    c = rng.normal(size=(3, basis.n_components)).astype(np.float32)
    uv = basis.synthesize(c)
    mask = np.zeros((3, basis.size, basis.size), bool)
    mask[:, :, : basis.size // 2] = True  # only the left half is seen
    got = ridge_texture_fit(uv, mask, basis, lam=0.0)
    np.testing.assert_allclose(got, c, atol=1e-3)


def test_ridge_solution_is_the_regularised_normal_equation():
    basis = _random_basis(seed=2)
    rng = np.random.default_rng(3)
    uv = rng.uniform(0, 1, (1, basis.size, basis.size, 3)).astype(np.float32)
    mask = rng.uniform(size=(1, basis.size, basis.size)) < 0.4
    lam = 5.0
    c = ridge_texture_fit(uv, mask, basis, lam=lam)[0].astype(np.float64)
    a = basis.basis[mask[0]].reshape(-1, basis.n_components).astype(np.float64)
    r = (uv[0] - basis.mean)[mask[0]].reshape(-1)
    grad = a.T @ (a @ c - r) + lam * c  # gradient of the Eq. 8 objective must vanish
    assert np.abs(grad).max() < 1e-3 * np.abs(a.T @ r).max()
    # heavier regularisation shrinks towards the mean texture; nothing observed -> zeros
    c_big = ridge_texture_fit(uv, mask, basis, lam=1e6)[0]
    assert np.linalg.norm(c_big) < 0.05 * np.linalg.norm(c)
    assert not ridge_texture_fit(uv, np.zeros_like(mask), basis).any()


def test_ridge_rejects_bad_shapes():
    basis = _random_basis()
    with pytest.raises(ValueError, match="uv_gt: expected"):
        ridge_texture_fit(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8), bool), basis)


def test_masked_pca_recovers_a_low_rank_texture_space(tmp_path):
    truth = _random_basis(u=32, k=4, seed=4)
    rng = np.random.default_rng(5)
    c = rng.normal(size=(60, 4)).astype(np.float32)
    maps = np.clip(truth.synthesize(c), 0, 1)
    masks = np.ones((60, 32, 32), bool)
    cut = rng.integers(8, 24, 60)
    for i, j in enumerate(cut):  # each map misses a different vertical band (a profile-like occlusion)
        masks[i, :, j:] = i % 2 == 0
        masks[i, :, :j] |= i % 2 == 0
        masks[i, :, j - 6:j + 6] = False
    cfg = MaskedPCAConfig(n_components=4, iterations=20, symmetric=False, fit_size=None)
    learned = learn_masked_pca(maps, masks, np.ones((32, 32), bool), cfg, name="pca-test")
    # held-out: fit on the observed texels, measure the error on the hidden ones
    test_c = rng.normal(size=(5, 4)).astype(np.float32)
    test = np.clip(truth.synthesize(test_c), 0, 1)
    seen = np.zeros((5, 32, 32), bool)
    seen[:, :, :20] = True
    fit = learned.synthesize(ridge_texture_fit(test, seen, learned, lam=1e-3))
    err = np.abs(fit - test)[~seen].mean()
    naive = np.abs(learned.mean[None] - test)[~seen].mean()
    assert err < 0.01 and err < 0.1 * naive
    learned.save(tmp_path / "basis.npz")
    back = UVTextureBasis.load(tmp_path / "basis.npz")
    assert back.name == "pca-test" and back.n_components == 4
    np.testing.assert_allclose(back.basis, learned.basis, atol=1e-3)


def test_masked_pca_basis_keeps_its_colour_up_to_the_layout_rim():
    """Learned at a lower resolution and upsampled, the basis must not blend the zeros outside the coarse
    layout into the rim texels of the fine one (it did: a dashed dark band along the UV layout's edge)."""
    u, fs = 64, 16
    yy, xx = np.mgrid[:u, :u]
    valid = (yy - 31.5) ** 2 / 28 ** 2 + (xx - 31.5) ** 2 / 22 ** 2 <= 1  # an ellipse: a staircase rim at 16x16
    rng = np.random.default_rng(0)
    colour = np.array([0.8, 0.6, 0.5], np.float32)
    maps = np.broadcast_to(colour, (12, u, u, 3)) + rng.normal(0, 0.01, (12, u, u, 3)).astype(np.float32)
    masks = np.broadcast_to(valid, (12, u, u)).copy()
    import cv2

    x = np.stack([cv2.resize(m, (fs, fs), interpolation=cv2.INTER_AREA) for m in maps])
    m = np.stack([cv2.resize(k.astype(np.float32), (fs, fs), interpolation=cv2.INTER_AREA) >= 0.5 for k in masks])
    v = cv2.resize(valid.astype(np.float32), (fs, fs), interpolation=cv2.INTER_AREA) > 0.5
    basis = learn_masked_pca(x, m, v, MaskedPCAConfig(n_components=2, fit_size=None), out_valid=valid)
    np.testing.assert_allclose(basis.mean[valid], np.broadcast_to(colour, basis.mean[valid].shape), atol=0.02)


def test_bfm2009_texture_basis_file_in_the_bfm_uv_layout(assets, tmp_path):
    """`uvprep texture-basis --bfm2009` on a fake 01_MorphableModel.mat laid out on the real 3DDFA files: the basis
    lands in the UV layout of the bfm-public model and recovers a texture drawn from it by Eq. 8."""
    import scipy.io as sio
    from test_loaders import _write_bfm2009  # the loader tests' fake file in the real variable layout

    from common.loaders import load_bfm_mean_mesh
    from preprocess.texture import basis_from_model_file

    v1, v2 = assets("3ddfa_v1"), assets("3ddfa_v2")
    ref = np.load(v1 / "train.configs" / "u_shp.npy").reshape(-1, 3)
    tri = sio.loadmat(str(v1 / "visualize" / "tri.mat"))["tri"].T.astype(np.int64) - 1  # full 53,215-vertex mesh
    _write_bfm2009(tmp_path / "mm.mat", ref, tri, np.zeros(3), k=4, n_extra=20)
    basis = basis_from_model_file("bfm2009", tmp_path / "mm.mat", 64, v1, v2)
    mean_mesh = load_bfm_mean_mesh(v1, v2)
    from common.uvtools import model_uv_fragments

    layout = model_uv_fragments(mean_mesh, 64).tri_id[0].numpy() >= 0
    assert basis.n_components == 4 and basis.size == 64
    assert (basis.valid == layout).mean() > 0.99  # the same UV layout as bfm-public
    assert 0 <= basis.mean[basis.valid].min() and basis.mean[basis.valid].max() <= 1
    c = np.array([[0.5, -1.0, 0.3, 0.8]], np.float32)
    uv = basis.synthesize(c)
    mask = np.broadcast_to(basis.valid, (1, 64, 64)) & (np.arange(64)[None, None, :] < 32)
    np.testing.assert_allclose(ridge_texture_fit(uv, mask, basis, lam=0.0), c, atol=1e-3)
    basis.save(tmp_path / "b.npz")
    assert UVTextureBasis.load(tmp_path / "b.npz").n_components == 4


@pytest.mark.parametrize("channels", [1, 3, 130])
def test_extend_smoothly_fast_sums_give_the_same_rings(channels):
    """``fast`` (OpenCV box sums, what the blend's texture padding uses) = scipy's uniform_filter to float32
    rounding, also past OpenCV's channel limit."""
    from preprocess.texture import extend_smoothly

    rng = np.random.default_rng(0)
    img = rng.random((24, 24, channels)).astype(np.float32)
    known = np.zeros((24, 24), bool)
    known[6:14, 5:17] = True
    valid = np.ones_like(known)
    valid[:, -2:] = False
    slow, fast = (extend_smoothly(img, known, valid, max_rings=6, fast=f) for f in (False, True))
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    assert (fast[valid & ~known] != 0).any() and (fast[~valid] == 0).all()
