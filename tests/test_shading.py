"""Lighting estimation (preprocess.shading) and the relit, blended symmetric fill (preprocess.blend): numbers."""

from __future__ import annotations

import numpy as np
import pytest

from common.geometry import params_to_euler, project_to_image, split_params
from common.procedural import build_procedural_model
from common.synthetic import SyntheticConfig, generate, layout_raster
from common.uvtools import region_uv_mask, texel_mirror_index
from preprocess.blend import (
    SOURCE_MIRRORED,
    SOURCE_MODEL,
    SOURCE_OBSERVED,
    blend_mirrored,
    blend_uv,
    mirror_exclusion,
    relit_mirror,
    seam_gradient_ratio,
    symmetric_fill,
)
from preprocess.config import BlendConfig, ShadingConfig, UVGTConfig
from preprocess.shading import estimate_shading, fit_directional_lighting, fit_sh_lighting, sh_basis, uv_normals
from preprocess.unwrap import layout_cache, uv_gt_from_images


def _hemisphere(n=40, min_z=0.15):
    """Unit normals of the camera-facing hemisphere on an n x n grid: (N, 3)."""
    x, y = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n))
    z2 = 1 - x ** 2 - y ** 2
    keep = z2 > min_z ** 2
    return np.stack([x[keep], y[keep], np.sqrt(z2[keep])], 1)


def test_directional_lighting_is_recovered_despite_albedo_outliers():
    rng = np.random.default_rng(0)
    n = _hemisphere()
    light = np.array([0.5, 0.4, 0.77])
    light /= np.linalg.norm(light)
    amb, col = np.array([0.30, 0.25, 0.2]), np.array([0.5, 0.45, 0.4])
    colour = amb + col * np.clip(n @ light, 0, None)[:, None]  # albedo 1 absorbed: only ratios matter
    dark = rng.random(len(n)) < 0.1  # brows / eyes / moles: 10% texels at a third of the brightness
    colour[dark] *= 0.35
    coef, direction = fit_directional_lighting(colour, n)
    assert np.degrees(np.arccos(np.clip(direction @ light, -1, 1))) < 2.0  # measured 0.0 deg
    # only shading ratios enter the relit fill: fitted / true shading is nearly one constant (the outliers pull
    # the overall level down a little), also on the normals facing away from the camera
    away = -_hemisphere()
    for normals in (n, away):
        ratio = (coef[0] + coef[1] * np.clip(normals @ direction, 0, None)[:, None]) / (
            amb + col * np.clip(normals @ light, 0, None)[:, None])
        assert ratio.max() / ratio.min() < 1.1


def _lit_hemisphere(seed: int, light=(0.3, 0.2, 0.93)) -> tuple[np.ndarray, np.ndarray]:
    """Normals of the camera-facing hemisphere lit by a directional light, with noise and 10% dark outliers."""
    rng = np.random.default_rng(seed)
    n = _hemisphere(30)
    light = np.asarray(light) / np.linalg.norm(light)
    colour = 0.3 + 0.5 * np.clip(n @ light, 0, None)[:, None] + rng.normal(0, 0.02, (len(n), 3))
    colour[rng.random(len(n)) < 0.1] *= 0.35
    return colour, n


def test_the_directional_fits_gradient_matches_finite_differences_of_its_cost():
    from preprocess.shading import _directional_starts, _DirectionalBatch, _tangent

    colour, n = _lit_hemisphere(2)
    _, sw, f_scale = _directional_starts(colour, n, ShadingConfig())
    problem = _DirectionalBatch(n.T[None], colour.T[None], sw[None], np.array([f_scale]))
    for u in (np.array([0.3, 0.2, 0.9]), np.array([-0.6, 0.5, 0.4])):
        u = (u / np.linalg.norm(u))[None]
        tangent = _tangent(u)
        _, g = problem.normal_equations(problem.evaluate(np.arange(1), u), np.ones(1, bool), tangent)

        def cost(d, u=u, tangent=tangent):
            p = u + tangent @ d
            return problem.evaluate(np.arange(1), p / np.linalg.norm(p))["cost"][0]

        h = 1e-6
        want = [(cost(h * e) - cost(-h * e)) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(g[0], want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_the_directional_fit_reaches_the_optimum_of_scipys_least_squares():
    """The batched Levenberg-Marquardt minimises the same Huber cost as scipy's least_squares did (the fit's solver
    until issue 21): run to tight tolerances from the same starts, the directions agree."""
    from scipy.optimize import least_squares

    from preprocess.shading import _directional_fit, _directional_starts

    config = ShadingConfig()
    for seed, light in ((0, (0.3, 0.2, 0.93)), (1, (-0.6, 0.3, 0.5)), (2, (0.1, -0.7, 0.4))):
        colour, n = _lit_hemisphere(seed, light)
        starts, sw, f_scale = _directional_starts(colour, n, config)

        def residual(p, n=n, colour=colour, sw=sw):
            lam = np.maximum(n @ (p / np.linalg.norm(p)), 0.0)
            coef, _ = _directional_fit(lam, colour, sw ** 2)
            return (sw[:, None] * (coef[0] + lam[:, None] * coef[1] - colour)).ravel()

        fits = [least_squares(residual, p0, loss="huber", f_scale=f_scale, ftol=1e-14, xtol=1e-14, gtol=1e-14,
                              max_nfev=500) for p0 in starts]
        best = min(fits, key=lambda r: r.cost).x
        want = best / np.linalg.norm(best)
        coef, direction = fit_directional_lighting(colour, n, config)
        assert np.degrees(np.arccos(min(direction @ want, 1.0))) < 1e-3
        np.testing.assert_allclose(coef, _directional_fit(np.maximum(n @ want, 0.0), colour, sw ** 2)[0], atol=1e-5)


def test_a_directional_fit_is_the_same_alone_and_in_a_batch():
    from preprocess.shading import fit_directional_lighting_batch

    lights = [(0.3, 0.2, 0.9), (-0.5, 0.1, 0.6), (0.0, 0.8, 0.3)]
    problems = [_lit_hemisphere(seed, light) for seed, light in enumerate(lights)]
    problems[1] = (problems[1][0][::3], problems[1][1][::3])  # another length
    coef, direction = fit_directional_lighting_batch([c for c, _ in problems], [n for _, n in problems])
    for i, (c, n) in enumerate(problems):
        alone = fit_directional_lighting(c, n)
        np.testing.assert_array_equal(alone[0], coef[i])
        np.testing.assert_array_equal(alone[1], direction[i])


def test_norm3_is_numpys_norm_bit_for_bit():
    from preprocess.shading import _norm3

    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(3, 500, 3)).astype(dtype)
        for v in (x, x.transpose(1, 0, 2)):  # uv_normals passes a transposed view
            np.testing.assert_array_equal(_norm3(v), np.linalg.norm(v, axis=-1, keepdims=True))


def test_sh_fit_recovers_a_second_order_lighting_exactly_and_robustly():
    rng = np.random.default_rng(1)
    n = _hemisphere()
    true = rng.normal(0, 0.1, (9, 3))
    true[0] += 0.6
    colour = sh_basis(n, 2) @ true
    colour[rng.random(len(n)) < 0.05] += 0.5  # speculars
    est = fit_sh_lighting(colour, n, 2, ShadingConfig(sh_ridge=0.0, irls_iters=10))
    assert np.abs(sh_basis(n, 2) @ est - sh_basis(n, 2) @ true).max() < 0.01


@pytest.fixture(scope="module")
def profiles():
    """Synthetic faces at 35-60 deg yaw with a directional light: UV_gt, normals of the exact fit, uv_true."""
    model = build_procedural_model()
    u = 64
    cfg = SyntheticConfig(image_size=128, uv_size=u, occluder_prob=0.0, yaw_min_deg=35, yaw_max_deg=60,
                          diffuse_min=0.6, diffuse_max=0.8, seed=3)
    raster = layout_raster(model, u)
    faces = [generate(i, cfg, model, raster) for i in range(4)]
    params = np.stack([f.params for f in faces])
    pose, a_id, a_exp = split_params(params)
    verts = project_to_image(model.shape(a_id, a_exp), pose, cfg.image_size)
    ucfg = UVGTConfig(uv_size=u)
    cache = layout_cache(model, ucfg)
    gt = uv_gt_from_images(np.stack([f.image for f in faces]), verts, model, ucfg, cache=cache)
    return dict(model=model, faces=faces, gt=gt, valid=raster[1], mirror=texel_mirror_index(model, u, raster[0]),
                normals=uv_normals(model, params, cache.uv_frags), nose=region_uv_mask(model, "nose", u, raster[0]),
                face=region_uv_mask(model, "face", u, raster[0]), yaw=params_to_euler(params)[:, 0])


def test_uv_normals_face_the_camera_where_the_photo_sees_the_face(profiles):
    n, gt = profiles["normals"], profiles["gt"]
    np.testing.assert_allclose(np.linalg.norm(n[:, profiles["valid"]], axis=-1), 1.0, atol=1e-4)
    assert (n[..., 2][gt.mask] > 0.1).mean() > 0.99  # UV_gt drops texels beyond 80 deg from the view direction
    assert np.median(n[..., 2][gt.mask]) > 0.6


def test_uv_normals_are_the_einsum_and_cross_product_normals_bit_for_bit(profiles):
    """uv_normals computes the camera frame and the face normals axis by axis (issue 21); the values are those of the
    straightforward einsum / np.cross formulation, bit for bit."""
    import scipy.sparse as sp

    from preprocess.shading import _norm3

    model, params = build_procedural_model(), np.stack([f.params for f in profiles["faces"]])
    cache = layout_cache(model, UVGTConfig(uv_size=64))
    pose, a_id, a_exp = split_params(params)
    shape = model.shape(a_id[:, :model.n_id].astype(np.float32), a_exp[:, :model.n_exp].astype(np.float32))
    frame = np.einsum("bij,bvj->bvi", pose[:, :, :3].astype(np.float32), shape)
    tris = np.asarray(model.triangles, np.int64)
    b, nv, nf = len(frame), model.n_vertices, len(tris)
    v0, v1, v2 = (frame[:, tris[:, k]] for k in range(3))
    face_n = np.cross(v1 - v0, v2 - v0)
    incidence = sp.csr_matrix((np.ones(3 * nf), (tris.T.ravel(), np.tile(np.arange(nf), 3))), shape=(nv, nf))
    vn = (incidence @ face_n.transpose(1, 0, 2).reshape(nf, 3 * b).astype(np.float64)).astype(np.float32)
    vn = vn.reshape(nv, b, 3).transpose(1, 0, 2)
    vn /= np.maximum(_norm3(vn), 1e-12)
    tri = cache.uv_frags.tri_id[0].numpy().ravel()
    covered = np.flatnonzero(tri >= 0)
    bary = cache.uv_frags.bary[0].numpy().reshape(-1, 3)[covered]
    interp = sp.csr_matrix((bary.ravel().astype(np.float32), tris[tri[covered]].ravel(),
                            np.arange(0, 3 * covered.size + 1, 3)), shape=(covered.size, nv))
    vals = (interp @ vn.transpose(1, 0, 2).reshape(nv, 3 * b)).reshape(-1, b, 3).transpose(1, 0, 2)
    norm = _norm3(vals)
    want = np.zeros((b, tri.size, 3), np.float32)
    want[:, covered] = np.divide(vals, norm, out=np.zeros_like(vals), where=norm > 1e-6)
    np.testing.assert_array_equal(profiles["normals"], want.reshape(profiles["normals"].shape))


def test_relit_mirror_removes_the_brightness_bias_of_the_plain_mirror(profiles):
    """The plain mirror copies the lit side onto the side facing away from the light (measured bias +40 / 255);
    relit, the mirrored texels are within +-5 / 255 of the truth on average (measured +0.3)."""
    gt, mirror, valid = profiles["gt"], profiles["mirror"], profiles["valid"]
    bias_plain, bias_relit = [], []
    for i, f in enumerate(profiles["faces"]):
        obs = gt.mask[i] & valid
        _, _, src = symmetric_fill(gt.uv[i], obs, mirror, valid)
        sel = (src == SOURCE_MIRRORED) & profiles["face"]
        relit, _ = relit_mirror(gt.uv[i], obs, profiles["normals"][i], mirror)
        plain = gt.uv[i].reshape(-1, 3)[np.maximum(mirror, 0)].reshape(gt.uv[i].shape)
        bias_plain.append((plain - f.uv_true)[sel].mean() * 255)
        bias_relit.append((relit - f.uv_true)[sel].mean() * 255)
    assert np.mean(bias_plain) > 15
    assert abs(np.mean(bias_relit)) < 5


def test_a_blocks_relit_shadings_give_each_photo_the_uv_bl_of_its_own_fit(profiles):
    """The blend stage fits a block's lights together (relit_shadings) and passes each photo's shading to blend_uv:
    the same UV_bl, bit for bit, as blend_uv estimating it alone (a failing block is redone that way)."""
    from preprocess.blend import relit_shadings

    gt, valid, cfg = profiles["gt"], profiles["valid"], BlendConfig()
    uv_bfm = np.full(gt.uv.shape[1:], 0.5, np.float32)
    shadings = relit_shadings(gt.uv, gt.mask, profiles["normals"], valid, cfg)
    assert shadings.shape == gt.uv.shape and not np.all(shadings == 1.0)
    for i in range(len(gt.uv)):
        kw = dict(face_mask=valid, mirror_index=profiles["mirror"], config=cfg, normals=profiles["normals"][i],
                  nose_mask=profiles["nose"])
        alone = blend_uv(gt.uv[i], gt.mask[i], uv_bfm, **kw)
        in_block = blend_uv(gt.uv[i], gt.mask[i], uv_bfm, shading=shadings[i], **kw)
        np.testing.assert_array_equal(in_block[0], alone[0])
        np.testing.assert_array_equal(in_block[1], alone[1])
    assert relit_shadings(gt.uv, gt.mask, profiles["normals"], valid, BlendConfig.paper_mirror()) is None


def test_seam_between_observed_and_mirrored_texels_is_as_smooth_as_the_photo(profiles):
    """Gradient across observed | mirrored over the gradient inside the observed texture. A seamless fill of this
    texture scores ~1 (its own texture continues); 1.5 leaves room for the doubled skin detail at the seam. The
    plain mirror's lit | unlit step shows as a ratio well above it."""
    gt = profiles["gt"]
    plain, relit = [], []
    for i in range(len(profiles["faces"])):
        bfm = np.full(gt.uv[i].shape, 0.5, np.float32)
        kw = dict(face_mask=profiles["valid"], mirror_index=profiles["mirror"], normals=profiles["normals"][i],
                  nose_mask=profiles["nose"])
        bl, src = blend_uv(gt.uv[i], gt.mask[i], bfm, config=BlendConfig.paper_mirror(), **kw)
        plain.append(seam_gradient_ratio(bl, src))
        bl, src = blend_uv(gt.uv[i], gt.mask[i], bfm, **kw)
        relit.append(seam_gradient_ratio(bl, src))
    assert np.median(relit) < 1.5
    assert np.median(relit) < np.median(plain)


def test_unreliable_mirror_texels_are_left_to_the_model():
    u = 32
    uv = np.full((u, u, 3), 0.5, np.float32)
    observed = np.zeros((u, u), bool)
    observed[:, u // 2:] = True  # right half seen, column flip mirror
    nose = np.zeros((u, u), bool)
    nose[10:20, 12:20] = True
    normals = np.zeros((u, u, 3), np.float32)
    normals[..., 2] = 1.0
    normals[:, -3:] = [0.95, 0.0, 0.312]  # the outer source columns are seen at 72 deg
    cfg = BlendConfig(nose_strip=0.1)  # within 3.2 texels of the symmetry line
    ex = mirror_exclusion(None, u, normals, nose, cfg)
    bl, src = blend_uv(uv, observed, uv, config=cfg, normals=normals, nose_mask=nose)
    assert (src[:, :3] == SOURCE_MODEL).all()  # mirrors of grazing texels
    assert (src[10:20, 13:16] == SOURCE_MODEL).all()  # nose strip: |col - mirror col| < 6.4
    assert (src[10:20, 12] == SOURCE_MIRRORED).all() and (src[:10, 13:16] == SOURCE_MIRRORED).all()
    assert (src[:, u // 2:] == SOURCE_OBSERVED).all()
    assert ex[:, :3].all() and not ex[:, 3:12].any()
    _, _, plain = symmetric_fill(uv, observed)  # the paper's fill has no cuts
    assert (plain[:, :u // 2] == SOURCE_MIRRORED).all()


@pytest.mark.parametrize("solver", ["direct", "mgcg"])
def test_blend_mirrored_takes_values_from_the_observed_boundary_and_gradients_from_the_mirror(solver):
    u = 64
    yy, xx = np.mgrid[0:u, 0:u] / u
    observed = np.zeros((u, u), bool)
    observed[8:56, 32:56] = True
    mirrored = np.zeros((u, u), bool)
    mirrored[8:56, 8:32] = True
    mirrored[30:34, 2:8] = True  # a spur reaching away: Neumann towards the rest, no pull to 0
    island = np.zeros((u, u), bool)
    island[60:63, 2:5] = True  # touches no observed texel: keeps its values
    texture = (0.4 + 0.2 * np.sin(9 * xx) * np.cos(7 * yy))[..., None].repeat(3, -1).astype(np.float32)
    filled = np.where(observed[..., None], texture, 0.0).astype(np.float32)
    filled[mirrored | island] = texture[mirrored | island] + 0.15  # the lit side copied onto the unlit one
    out = blend_mirrored(filled, observed, mirrored | island, BlendConfig(solver=solver))
    # The 0.15 step is gone everywhere, up to one texel's texture gradient (the guidance across the seam is 0:
    # f_p = f_q there), measured 0.007 of at most 0.028 per texel.
    step = np.abs(np.diff(texture[..., 0], axis=1)).max()
    assert np.abs(out[mirrored] - texture[mirrored]).max() < 0.5 * step
    assert abs((out[mirrored] - texture[mirrored]).mean()) < 0.005
    np.testing.assert_allclose(out[island], filled[island])
    np.testing.assert_array_equal(out[observed], filled[observed])


def test_relit_fill_needs_normals_and_the_paper_fill_does_not():
    uv = np.full((16, 16, 3), 0.5, np.float32)
    mask = np.zeros((16, 16), bool)
    mask[:, 8:] = True
    with pytest.raises(ValueError, match="need normals"):
        blend_uv(uv, mask, uv)
    bl, _ = blend_uv(uv, mask, uv, config=BlendConfig.paper_mirror())
    np.testing.assert_allclose(bl, 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="fill_mode"):
        BlendConfig(fill_mode="albedo")
    with pytest.raises(ValueError, match="model"):
        ShadingConfig(model="sh3")


def test_estimate_shading_is_constant_when_too_little_is_observed():
    uv = np.full((16, 16, 3), 0.5, np.float32)
    normals = np.zeros((16, 16, 3), np.float32)
    normals[..., 2] = 1
    mask = np.zeros((16, 16), bool)
    mask[0, :5] = True
    np.testing.assert_array_equal(estimate_shading(uv, mask, normals), 1.0)
