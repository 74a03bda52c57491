"""Losses (train/losses.py, Eqs. 5, 7, 10-14) and UV helpers (train/uvops.py) on hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import LossWeights
from train.losses import (
    NonFiniteLoss,
    check_finite,
    d_loss,
    g_adv_loss,
    identity_loss,
    masked_l1,
    r1_penalty,
    reconstruction_loss,
    sampler_loss,
    symmetry_loss,
    total_generator_loss,
    tv_loss,
    visibility_loss,
)
from train.uvops import centre_crop, crop, expect_shape, mirror, resize_masked, side_crops


def flip_index(u: int) -> torch.Tensor:
    """The column-flip mirror index of an exactly symmetric layout: i * U + (U - 1 - j)."""
    i, j = torch.meshgrid(torch.arange(u), torch.arange(u), indexing="ij")
    return (i * u + (u - 1 - j)).reshape(-1)


def involution_index(u: int, seed: int = 0) -> torch.Tensor:
    """A random non-trivial mirror index: texels paired up at random, a few fixed points, a few without a mirror."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(u * u, generator=g)
    idx = torch.arange(u * u)
    n_pairs = (u * u - 6) // 2
    a, b = perm[:n_pairs], perm[n_pairs:2 * n_pairs]
    idx[a], idx[b] = b, a
    idx[perm[-3:]] = -1  # three texels without a mirror; the 2-3 left over are their own mirror
    return idx


# --------------------------------------------------------------------------------------------- masked_l1, tv


def test_masked_l1_by_hand():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 8.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert masked_l1(a, b, mask).item() == pytest.approx((1 + 2 + 1 + 0) / 4)
    assert masked_l1(a, b, torch.ones(1, 1, 2, 2)).item() == pytest.approx(19 / 8)
    per_channel = torch.cat([mask, 1 - mask], 1)  # a (B, C, H, W) mask
    assert masked_l1(a, b, per_channel).item() == pytest.approx((1 + 2 + 0 + 8) / 4)


def test_masked_l1_empty_mask_is_zero_with_grad():
    a = torch.rand(2, 3, 4, 4, requires_grad=True)
    loss = masked_l1(a, torch.rand(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_masked_l1_shape_errors():
    with pytest.raises(ValueError, match=r"b: expected \(B, C, H, W\) with B=1, C=3, H=4, W=4, found \(1, 3, 4, 5\)"):
        masked_l1(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="mask: expected 1 or 3 channels"):
        masked_l1(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.ones(1, 2, 4, 4))


def test_tv_by_hand_on_3x3():
    uv = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])[None, None]
    # horizontal squares: 1 + 1 (row 0); vertical: 0 + 1 + 4 (rows 0-1) and 9 + 9 + 9 (rows 1-2): 34 over 12 terms
    assert tv_loss(uv).item() == pytest.approx(34 / 12)
    # two identical channels: same mean
    assert tv_loss(uv.repeat(2, 2, 1, 1)).item() == pytest.approx(34 / 12)
    # mask without the bottom-right texel: horizontal 1 + 1 + 0 + 0 + 0 (5 pairs), vertical 0 + 1 + 4 + 9 + 9 (5 pairs)
    mask = torch.ones(1, 1, 3, 3)
    mask[..., 2, 2] = 0
    assert tv_loss(uv, mask).item() == pytest.approx(25 / 10)
    assert tv_loss(torch.full((2, 3, 5, 5), 0.3)).item() == 0.0


# ----------------------------------------------------------------------------------------------- Eq. 5


def test_sampler_loss_terms_and_weights():
    uv_spl, uv_gt = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    uv_gt_mask = torch.zeros(1, 1, 4, 4)
    uv_gt_mask[..., :2, :] = 1
    uv_spl[..., 0, 0] = 1.0  # TV: 3 channels x 2 neighbours x 1^2 over 3 x 24 terms
    render, target = torch.full((1, 3, 6, 6), 0.2), torch.full((1, 3, 6, 6), 0.7)
    render_mask = torch.ones(1, 1, 6, 6)
    terms = sampler_loss(uv_spl, uv_gt, uv_gt_mask, render, target, render_mask, lambda_tv=0.25)
    assert set(terms) == {"loss_uv", "loss_face", "loss_tv", "loss"}
    assert terms["loss_uv"].item() == pytest.approx((7 * 0.5 + 0.5) / 8)
    assert terms["loss_face"].item() == pytest.approx(0.5)
    assert terms["loss_tv"].item() == pytest.approx(2 / 24)
    assert terms["loss"].item() == pytest.approx(terms["loss_uv"].item() + 0.5 + 0.25 * 2 / 24)


# ---------------------------------------------------------------------------------------------- Eq. 10, R1


def test_adversarial_losses_match_log_sigmoid():
    real = torch.tensor([2.0, -1.0, 0.0, 30.0])
    fake = torch.tensor([[-3.0, 0.5], [1.0, -40.0]])
    expected_d = -(F.logsigmoid(real).mean() + torch.log1p(-torch.sigmoid(fake.double())).mean().float())
    assert d_loss(real, fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert g_adv_loss(fake).item() == pytest.approx(-F.logsigmoid(fake).mean().item(), rel=1e-6)
    assert d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    # finite at extreme logits where log(1 - sigmoid) would overflow
    assert torch.isfinite(d_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


def test_non_saturating_generator_gradient():
    """Where D rejects a fake confidently (logit -10), the non-saturating loss still has a gradient near 1."""
    logit = torch.tensor([-10.0], requires_grad=True)
    g_adv_loss(logit).backward()
    assert logit.grad.item() == pytest.approx(-1.0, abs=1e-4)


def test_r1_penalty_of_a_linear_discriminator():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 5, requires_grad=True)
    x = torch.randn(6, 3, 4, 5, requires_grad=True)
    logits = (w * x).flatten(1).sum(1)  # D(x) = <w, x>, grad_x D = w for every sample
    penalty = r1_penalty(logits, x)
    assert penalty.item() == pytest.approx(float(w.detach().square().sum()), rel=1e-5)
    penalty.backward()  # create_graph=True: d||w||^2/dw = 2w reaches D's weights
    torch.testing.assert_close(w.grad, 2 * w.detach())
    with pytest.raises(ValueError, match="requires_grad=True"):
        r1_penalty(logits, torch.randn(6, 3, 4, 5))


# --------------------------------------------------------------------------------------------- Eqs. 11-13


def test_reconstruction_loss_weights():
    uv_pred, uv_bl = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.25)
    render, target = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.1)
    terms = reconstruction_loss(uv_pred, uv_bl, torch.ones(2, 1, 4, 4), render, target, torch.ones(2, 1, 8, 8))
    assert set(terms) == {"loss_rec_uv", "loss_rec_face", "loss_rec"}
    assert terms["loss_rec_uv"].item() == pytest.approx(0.25)
    assert terms["loss_rec_face"].item() == pytest.approx(0.1)
    assert terms["loss_rec"].item() == pytest.approx(0.25 + 10 * 0.1)
    terms = reconstruction_loss(uv_pred, uv_bl, torch.ones(2, 1, 4, 4), render, target, torch.ones(2, 1, 8, 8),
                                LossWeights(uv=2.0, face=3.0))
    assert terms["loss_rec"].item() == pytest.approx(2 * 0.25 + 3 * 0.1)


def test_symmetry_loss_zero_on_symmetric_maps_column_flip():
    x = torch.rand(2, 3, 6, 6)
    sym = x + torch.flip(x, dims=[-1])
    assert symmetry_loss(sym, flip_index(6)).item() == 0.0
    assert symmetry_loss(x, flip_index(6)).item() == pytest.approx((x - torch.flip(x, dims=[-1])).abs().mean().item())


def test_symmetry_loss_zero_on_symmetric_maps_permutation():
    u = 7
    idx = involution_index(u)
    f = torch.rand(2, 3, u * u)
    sym = f + f[..., idx.clamp(min=0)]  # value(t) = f(t) + f(mirror(t)) = value(mirror(t)), exactly
    sym[..., idx < 0] = torch.rand(2, 3, int((idx < 0).sum()))  # texels without a mirror: anything, excluded
    sym = sym.view(2, 3, u, u)
    assert symmetry_loss(sym, idx).item() == 0.0
    assert symmetry_loss(f.view(2, 3, u, u), idx).item() > 0.05
    # the same map is not symmetric under a plain column flip
    assert symmetry_loss(sym, flip_index(u)).item() > 0.05


def test_symmetry_loss_mask_and_missing_mirrors():
    x = torch.rand(1, 3, 4, 4)
    idx = flip_index(4)
    mask = torch.zeros(4, 4)
    mask[0] = 1  # only the top row counts
    expected = (x[..., 0, :] - torch.flip(x[..., 0, :], dims=[-1])).abs().mean()
    assert symmetry_loss(x, idx, mask).item() == pytest.approx(expected.item())
    assert symmetry_loss(x, torch.full((16,), -1)).item() == 0.0


def test_identity_loss():
    a, b = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, -3.0]])
    assert identity_loss(a, b).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="feat_b"):
        identity_loss(a, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------- Eq. 14, checks


def test_loss_weights_defaults():
    w = LossWeights()
    assert (w.face, w.uv, w.sym, w.tv, w.id, w.adv, w.side, w.r1_gamma) == (10, 1, 1, 0.1, 0.1, 0.01, 0.5, 0)


def test_total_generator_loss_weights_and_skips_missing_terms():
    one = torch.tensor(1.0)
    terms = {k: one for k in ("loss_rec_uv", "loss_rec_face", "loss_adv_ctr", "loss_adv_sd", "loss_adv_face",
                              "loss_sym", "loss_id", "loss_tv")}
    assert total_generator_loss(terms).item() == pytest.approx(1 + 10 + 0.01 * (1 + 0.5 + 1) + 1 + 0.1 + 0.1)
    del terms["loss_id"]  # no identity network
    terms["loss_rec"] = torch.tensor(123.0)  # derived total: ignored, not counted twice
    assert total_generator_loss(terms).item() == pytest.approx(1 + 10 + 0.01 * 2.5 + 1 + 0.1)
    w = LossWeights(face=0.0, adv=1.0, side=2.0)
    assert total_generator_loss({"loss_rec_face": one, "loss_adv_sd": one}, w).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown terms \\['loss_sim'\\]"):
        total_generator_loss({"loss_sim": one})


def test_reconstruction_loss_weighs_unseen_texels():
    """LossWeights.uv_unseen: the unseen texels' UV differences count k times, divided by the valid texel count;
    k = 1 is Eq. 11 (and needs no unseen map)."""
    uv_pred = torch.zeros(1, 3, 2, 2)
    uv_bl = torch.ones(1, 3, 2, 2) * torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    unseen = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    img, face = torch.zeros(1, 3, 4, 4), torch.ones(1, 1, 4, 4)
    plain = reconstruction_loss(uv_pred, uv_bl, mask, img, img, face)["loss_rec_uv"]
    assert plain.item() == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    k3 = reconstruction_loss(uv_pred, uv_bl, mask, img, img, face, LossWeights(uv_unseen=3.0), unseen=unseen)
    assert k3["loss_rec_uv"].item() == pytest.approx((0.1 + 3 * 0.2 + 0.3) / 3)
    with pytest.raises(ValueError, match="unseen"):
        reconstruction_loss(uv_pred, uv_bl, mask, img, img, face, LossWeights(uv_unseen=3.0))


def test_visibility_loss_is_masked_binary_cross_entropy():
    """loss_vis: mean BCE over the masked texels only; weighed by LossWeights.vis in Eq. 14's sum."""
    logit = torch.tensor([[[[0.0, 10.0], [-10.0, 3.0]]]])
    seen = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])  # the last texel (a confident miss) is not counted
    expected = (math.log(2) + 2 * math.log1p(math.exp(-10))) / 3
    assert visibility_loss(logit, seen, mask).item() == pytest.approx(expected, rel=1e-5)
    one = torch.tensor(1.0)
    assert total_generator_loss({"loss_vis": one}, LossWeights(vis=0.5)).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seen"):
        visibility_loss(logit, seen[:, :, :1], mask)


def test_total_generator_loss_backpropagates():
    x = torch.tensor(2.0, requires_grad=True)
    total_generator_loss({"loss_sym": x * x, "loss_tv": x}).backward()
    assert x.grad.item() == pytest.approx(2 * 2 + 0.1)


def test_check_finite_names_the_term_and_step():
    check_finite({"loss_uv": torch.tensor(1.0), "loss_face": 0.5}, step=3)
    with pytest.raises(NonFiniteLoss, match="'loss_face' is nan at step 12"):
        check_finite({"loss_uv": torch.tensor(1.0), "loss_face": torch.tensor(float("nan")),
                      "loss_tv": torch.tensor(float("inf"))}, step=12)
    with pytest.raises(ValueError, match="'loss_tv' is inf at step 0"):
        check_finite({"loss_tv": torch.tensor(float("inf"), requires_grad=True)}, step=0)


# ------------------------------------------------------------------------------------------------- uvops


def test_expect_shape_message():
    with pytest.raises(ValueError, match=r"uv: expected \(B, 3, U, U\) with B=2, U=4, found \(2, 3, 4, 5\)"):
        expect_shape("uv", torch.zeros(2, 3, 4, 5), ("B", 3, "U", "U"))
    assert expect_shape("uv", torch.zeros(2, 3, 4, 4), ("B", 3, "U", "U")) == {"B": 2, "U": 4}


def test_crop_and_box_errors():
    uv = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(crop(uv, (1, 4, 2, 7)), uv[:, :, 1:4, 2:7])
    with pytest.raises(ValueError, match="box: expected 0 <= row0 < row1 <= 8"):
        crop(uv, (0, 9, 0, 4))


def test_mirror_column_flip_equals_torch_flip_and_is_differentiable():
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(mirror(x, flip_index(5)), torch.flip(x, dims=[-1]), rtol=0, atol=0)
    idx = flip_index(5)
    idx[:3] = -1
    out = mirror(x, idx)
    assert torch.equal(out.flatten(2)[..., :3], torch.zeros(2, 3, 3))
    xd = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mirror(t, involution_index(3, seed=1)), (xd,))
    with pytest.raises(ValueError, match="mirror_index: expected int64"):
        mirror(x, flip_index(5).int())


def test_side_crops_stack_left_and_mirrored_right():
    torch.manual_seed(0)
    b, u = 2, 12
    uv = torch.rand(b, 3, u, u)
    box = (2, 10, 6, 12)  # the face's left half
    region = torch.rand(8, 6) > 0.3
    out = side_crops(uv, box, region, flip_index(u))
    assert out.shape == (2 * b, 3, 8, 6)
    torch.testing.assert_close(out[:b], uv[:, :, 2:10, 6:12] * region)
    torch.testing.assert_close(out[b:], torch.flip(uv, dims=[-1])[:, :, 2:10, 6:12] * region)
    # the mirrored half is the right side read from the symmetry plane outwards
    torch.testing.assert_close(out[b:], torch.flip(uv[:, :, 2:10, 0:6], dims=[-1]) * region)
    with pytest.raises(ValueError, match=r"region: expected \(8, 6\)"):
        side_crops(uv, box, torch.ones(6, 8), flip_index(u))


def test_centre_crop():
    uv = torch.rand(2, 3, 10, 10)
    region = np.ones((4, 6), bool)
    region[3, 2:4] = False  # nostrils
    out = centre_crop(uv, (5, 9, 2, 8), region)
    assert out.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out, uv[:, :, 5:9, 2:8] * torch.from_numpy(region).float())


def test_resize_masked_constant_and_integral():
    const = torch.full((1, 3, 256, 256), 0.37)
    small, m = resize_masked(const, torch.ones(1, 1, 256, 256), 152)
    assert small.shape == (1, 3, 152, 152) and m.shape == (1, 1, 152, 152)
    assert bool(m.all()) and torch.allclose(small, torch.full_like(small, 0.37), atol=1e-6)
    # exact area resampling keeps the mean (the integral) of a fully valid map, up or down
    x = torch.rand(2, 3, 20, 20)
    for size in (12, 7, 33):
        small, _ = resize_masked(x, torch.ones(2, 1, 20, 20), size)
        torch.testing.assert_close(small.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5, rtol=0)


def test_resize_masked_masking_rule():
    # integer factor: a small texel is the average of its 2 x 2 block, valid only if the whole block is
    x = torch.rand(1, 3, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 0, 0] = 0
    small, m = resize_masked(x, mask, 4)
    expected_m = torch.ones(1, 1, 4, 4)
    expected_m[..., 0, 0] = 0
    assert torch.equal(m, expected_m)
    torch.testing.assert_close(small, F.avg_pool2d(x, 2) * expected_m)
    # non-integer factor (256 -> 152 pattern): valid iff the footprint [i U/s, (i+1) U/s) touches no hole
    u, s = 32, 19
    mask = torch.ones(1, 1, u, u)
    mask[..., 10, 13] = 0
    const = torch.full((1, 3, u, u), 0.6)
    small, m = resize_masked(const, mask, s)
    lo = np.arange(s) * u / s
    touches = lambda k: (lo < k + 1) & (lo + u / s > k)  # noqa: E731
    expected = ~np.outer(touches(10), touches(13))
    assert np.array_equal(m[0, 0].numpy().astype(bool), expected)
    assert torch.allclose(small[..., torch.from_numpy(expected)], torch.tensor(0.6), atol=1e-6)
    assert torch.equal(small[..., ~torch.from_numpy(expected)], torch.zeros(3, int((~expected).sum()))[None])


def test_resize_masked_under_autocast_keeps_float32_masks():
    x, mask = torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small, m = resize_masked(x, mask, 19)
    assert small.dtype == m.dtype == torch.float32 and bool(m.all())
