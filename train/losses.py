"""Losses of the method, one function per paper equation (Eqs. 5, 7, 10-14).

All losses are computed in float32 (inputs are upcast, so they are safe under autocast) and return
scalar tensors that keep the graph. "||.||_1" is read as a *mean* absolute difference over the valid
texels/pixels and channels, so the weights do not depend on image size or on how much is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import LossWeights
from train.uvops import expect_shape, mirror

__all__ = [
    "NonFiniteLoss",
    "masked_l1",
    "tv_loss",
    "sampler_loss",
    "d_loss",
    "g_adv_loss",
    "r1_penalty",
    "reconstruction_loss",
    "symmetry_loss",
    "identity_loss",
    "visibility_loss",
    "total_generator_loss",
    "check_finite",
    "GENERATOR_TERMS",
]


class NonFiniteLoss(ValueError):
    """A loss term is NaN or infinite."""



def masked_l1(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean |a - b| over the masked elements and all channels; 0 (keeping the graph) when the mask is empty.

    a, b: (B, C, H, W); mask: (B, 1, H, W) or (B, C, H, W), float weights (normally {0, 1}).
    ``sum(|a - b| * mask) / sum(mask broadcast to a's shape)``.
    """
    d = expect_shape("a", a, ("B", "C", "H", "W"))
    expect_shape("b", b, ("B", "C", "H", "W"), d)
    expect_shape("mask", mask, ("B", None, "H", "W"), d)
    if mask.shape[1] not in (1, d["C"]):
        raise ValueError(f"mask: expected 1 or {d['C']} channels, found {tuple(mask.shape)}")
    m = mask.float()
    num = ((a.float() - b.float()).abs() * m).sum()
    den = m.sum() * (d["C"] // m.shape[1])
    return num / den.clamp(min=1.0)


def tv_loss(uv: Tensor, mask: Tensor | None = None) -> Tensor:  # Eq. 7
    """Total variation, Eq. 7, normalised by its number of terms.

    "TV(UV) = sum_{x,y,c}^{W-1,H,C} |UV(x+1,y,c) - UV(x,y,c)|^2 + sum_{x,y,c}^{W,H-1,C} |UV(x,y+1,c) - UV(x,y,c)|^2"

    Returned as the mean over all C (H (W-1) + (H-1) W) squared neighbour differences (the sum divided
    by its number of terms), so the weight lambda does not depend on the resolution. With a mask
    (B, 1, H, W), only pairs with both texels inside count, and the mean is over those pairs.
    uv: (B, C, H, W) -> scalar.
    """
    d = expect_shape("uv", uv, ("B", "C", "H", "W"))
    x = uv.float()
    dx2 = (x[..., :, 1:] - x[..., :, :-1]).square()
    dy2 = (x[..., 1:, :] - x[..., :-1, :]).square()
    if mask is None:
        return (dx2.sum() + dy2.sum()) / (dx2.numel() + dy2.numel())
    expect_shape("mask", mask, ("B", 1, "H", "W"), d)
    m = mask.float()
    mx, my = m[..., :, 1:] * m[..., :, :-1], m[..., 1:, :] * m[..., :-1, :]
    num = (dx2 * mx).sum() + (dy2 * my).sum()
    return num / ((mx.sum() + my.sum()) * d["C"]).clamp(min=1.0)


def sampler_loss(uv_spl: Tensor, uv_gt: Tensor, uv_gt_mask: Tensor, render: Tensor, target: Tensor,
                 render_mask: Tensor, lambda_tv: float) -> dict[str, Tensor]:  # Eq. 5
    """UV sampler loss, Eq. 5: "L_spl = ||UV_spl - UV_gt||_1 + ||I^R - I^m||_1 + lambda TV(UV_spl)".

    uv_spl, uv_gt: (B, 3, U, U); uv_gt_mask: (B, 1, U, U), the texels where UV_gt is compared (its
    valid texels; a mask that also covers occluded texels, with UV_gt = 0 there, asks the sampler to
    leave them empty as the paper's incomplete UV_gt does). render: I^R = R(UV_spl, S, P_0), Eq. 6, and
    target: I^m, both (B, 3, H, W); render_mask: (B, 1, H, W), the render's coverage intersected with the
    target's face mask. TV (Eq. 7, :func:`tv_loss`) is over the whole map.

    Returns {"loss_uv", "loss_face", "loss_tv", "loss"}, loss = loss_uv + loss_face + lambda_tv * loss_tv.
    """
    terms = {
        "loss_uv": masked_l1(uv_spl, uv_gt, uv_gt_mask),
        "loss_face": masked_l1(render, target, render_mask),
        "loss_tv": tv_loss(uv_spl),
    }
    terms["loss"] = terms["loss_uv"] + terms["loss_face"] + lambda_tv * terms["loss_tv"]
    return terms


def d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:  # Eq. 10, discriminator side
    """Discriminator side of Eq. 10: "L_adv = E_x[log D(x)] + E_x^[log(1 - D(x^))]", maximised by D.

    With D = sigmoid(logits), D minimises ``-E log sigmoid(D(x)) - E log(1 - sigmoid(D(x^)))
    = E softplus(-D(x)) + E softplus(D(x^))`` (the softplus form is exact and overflow-free).
    Logits of any shape (per-patch logits are averaged). Returns a scalar.
    """
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_adv_loss(fake_logits: Tensor) -> Tensor:  # Eq. 10, generator side
    """Generator side of Eq. 10, non-saturating: ``E softplus(-D(x^)) = -E log sigmoid(D(x^))``.

    Minimising Eq. 10's ``E log(1 - D(x^))`` directly saturates: when D confidently rejects the fakes
    (early in training), ``d/dlogit log(1 - sigmoid(l)) = -sigmoid(l)`` vanishes as ``l -> -inf`` and
    the generator gets no gradient. Maximising ``log D(x^)`` instead has the same fixed point and
    gradient ``1 - sigmoid(l) -> 1`` there (Goodfellow et al. 2014). Returns a scalar.
    """
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """R1 gradient penalty ``E_x ||grad_x D(x)||^2`` on real data (Mescheder et al. 2018); gamma / 2 by the caller.

    real_logits: D(real_inputs), any shape with batch first (per-patch logits are summed per sample);
    real_inputs: (B, ...) with requires_grad=True, before D saw them. Keeps the graph (create_graph=True)
    so the penalty can be back-propagated into D. Returns a scalar.
    """
    if not real_inputs.requires_grad:
        raise ValueError("r1_penalty: real_inputs must have requires_grad=True before the discriminator sees them "
                         "(call real.requires_grad_(True) first)")
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def reconstruction_loss(uv_pred: Tensor, uv_bl: Tensor, uv_mask: Tensor, render: Tensor, target: Tensor,
                        face_mask: Tensor, weights: LossWeights = LossWeights(), unseen: Tensor | None = None
                        ) -> dict[str, Tensor]:  # Eq. 11
    """Reconstruction loss, Eq. 11: "L_rec = ||UV_pred - UV_bl||_1 + ||I^R - I^m||_1".

    uv_pred, uv_bl: (B, 3, U, U); uv_mask: (B, 1, U, U), the texels where UV_bl is defined; render: I^R,
    rendered from UV_pred with the input's shape and pose, target: I^m, both (B, 3, H, W); face_mask:
    (B, 1, H, W), where the two are compared. unseen: (B, 1, U, U) {0, 1}, the texels UV_gt did not observe;
    with ``weights.uv_unseen`` != 1 (not in the paper) their UV differences count that many times, still divided by
    the number of texels in ``uv_mask`` (so the seen texels keep Eq. 11's weight).

    Returns {"loss_rec_uv", "loss_rec_face", "loss_rec"}, loss_rec = weights.uv * loss_rec_uv + weights.face *
    loss_rec_face.
    """
    if weights.uv_unseen != 1.0:
        if unseen is None:
            raise ValueError("reconstruction_loss: weights.uv_unseen needs the unseen texels (unseen=...)")
        w = uv_mask.float() * (1.0 + (weights.uv_unseen - 1.0) * unseen.float())
        loss_uv = masked_l1(uv_pred, uv_bl, w) * (w.sum() / uv_mask.float().sum().clamp(min=1.0))
    else:
        loss_uv = masked_l1(uv_pred, uv_bl, uv_mask)
    terms = {"loss_rec_uv": loss_uv, "loss_rec_face": masked_l1(render, target, face_mask)}
    terms["loss_rec"] = weights.uv * terms["loss_rec_uv"] + weights.face * terms["loss_rec_face"]
    return terms


def symmetry_loss(uv_pred: Tensor, mirror_index: Tensor, mask: Tensor | None = None) -> Tensor:  # Eq. 12
    """Symmetry loss, Eq. 12: "L_sym = ||UV_pred - FlipLR(UV_pred)||_1".

    FlipLR is the face model's texel mirror (:func:`train.uvops.mirror` with ``mirror_index`` (U * U,)
    int64), not an image flip: layouts such as BFM's are not mirror-exact. Texels without a mirror
    (index -1) are excluded; ``mask`` (B, 1, U, U) or (U, U) restricts the loss further.
    uv_pred: (B, 3, U, U) -> scalar (mean over the counted texels and channels).
    """
    d = expect_shape("uv_pred", uv_pred, ("B", 3, "U", "U"))
    valid = (mirror_index.to(uv_pred.device) >= 0).float().view(1, 1, d["U"], d["U"])
    if mask is not None:
        if mask.ndim == 2:
            mask = mask[None, None]
        expect_shape("mask", mask, (None, 1, "U", "U"), d)
        valid = valid * mask.float()
    return masked_l1(uv_pred, mirror(uv_pred, mirror_index), valid.expand(d["B"], 1, -1, -1))


def identity_loss(feat_a: Tensor, feat_b: Tensor) -> Tensor:  # Eq. 13
    """Identity loss, Eq. 13: "L_id = ||F(I^R') - F(I^m)||_1", F the identity network (LightCNN in the paper).

    feat_a, feat_b: (B, D) identity features of the render (in a new pose) and of the masked input.
    Returns the mean absolute difference (scalar).
    """
    d = expect_shape("feat_a", feat_a, ("B", "D"))
    expect_shape("feat_b", feat_b, ("B", "D"), d)
    return (feat_a.float() - feat_b.float()).abs().mean()


def grid_loss(grid: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Auxiliary sampler loss, **not in the paper**: ||S_att - S_fit||_1 on the observed texels.

    grid: the sampler's attention sampling grid S_att (B, U, U, 2); target: the fitted mesh's texel -> pixel map at
    the stored pose in the same normalised coordinates (:meth:`train.render.PosedMesh.texel_grid`; finite where
    ``mask``); mask: (B, 1, U, U) the texels UV_gt observed. Eq. 5 alone only sees colour differences, whose
    gradient w.r.t. a sampling point reaches about one pixel: a grid that starts more than a few pixels off (any
    face far from the mean pose) slides into a scramble of face-coloured pixels that lowers the L1 to the mean
    colour and stays there (seen on the synthetic world). The fit already knows where every observed texel is, so
    this term gives the sampler a global, pose-aware signal; ``LossWeights.grid = 0`` gives the paper's Eq. 5 alone.
    """
    expect_shape("grid", grid, ("B", "U", "U", 2))
    expect_shape("target", target, ("B", "U", "U", 2))
    return masked_l1(grid.permute(0, 3, 1, 2), torch.nan_to_num(target).permute(0, 3, 1, 2), mask)


def visibility_loss(gate_logit: Tensor, seen: Tensor, mask: Tensor) -> Tensor:
    """Generator term, **not in the paper**: binary cross-entropy of the visibility gate against the texels the
    photo saw (GeneratorConfig.visibility_gate).

    gate_logit: (B, 1, U, U) logits of v; seen: (B, 1, U, U) {0, 1}, the store's ``uv_gt_mask``; mask: (B, 1, U, U)
    or (1, 1, U, U) {0, 1}, the texels it is averaged over (the UV map's valid texels). Returns a scalar.
    """
    d = expect_shape("gate_logit", gate_logit, ("B", 1, "U", "U"))
    expect_shape("seen", seen, ("B", 1, "U", "U"), d)
    m = mask.float().expand_as(gate_logit)
    bce = F.binary_cross_entropy_with_logits(gate_logit.float(), seen.float(), reduction="none")
    return (bce * m).sum() / m.sum().clamp(min=1.0)


GENERATOR_TERMS = ("loss_rec_uv", "loss_rec_face", "loss_adv_ctr", "loss_adv_sd", "loss_adv_face",
                   "loss_sym", "loss_id", "loss_tv", "loss_vis")
"""Keys :func:`total_generator_loss` weighs; ``loss_rec`` and ``loss`` (derived totals) are ignored."""


def total_generator_loss(terms: dict[str, Tensor], weights: LossWeights = LossWeights()) -> Tensor:  # Eq. 14
    """Generator objective, Eq. 14: "L = L_rec + lambda_1 L_adv + lambda_2 L_sym + lambda_3 L_id + lambda_4 TV".

    L_rec = uv * loss_rec_uv + face * loss_rec_face (Eq. 11); L_adv = ctr * loss_adv_ctr + side * loss_adv_sd +
    loss_adv_face (Eq. 10, generator side; ``ctr`` and ``side`` weigh D_ctr and D_sd against D_face, 1 and 1 in
    the paper). terms: any subset of :data:`GENERATOR_TERMS` (missing terms, e.g. loss_id without an identity
    network or the terms of a discriminator whose weight is 0, are skipped); the derived totals ``loss_rec`` / ``loss``
    are ignored; any other key is an error (a misspelt term would otherwise silently drop out).
    Returns a scalar.
    """
    w = weights
    coef = {"loss_rec_uv": w.uv, "loss_rec_face": w.face, "loss_adv_ctr": w.adv * w.ctr,
            "loss_adv_sd": w.adv * w.side, "loss_adv_face": w.adv, "loss_sym": w.sym, "loss_id": w.id, "loss_tv": w.tv,
            "loss_vis": w.vis}
    unknown = set(terms) - set(coef) - {"loss_rec", "loss"}
    if unknown:
        raise ValueError(f"total_generator_loss: unknown terms {sorted(unknown)}; expected any of {list(coef)}")
    present = [coef[k] * terms[k] for k in GENERATOR_TERMS if k in terms]
    if not present:
        raise ValueError(f"total_generator_loss: no terms given; expected any of {list(coef)}")
    return torch.stack([t.float().reshape(()) for t in present]).sum()


def check_finite(terms: dict[str, Tensor | float], step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the first NaN/inf term (in dict order) and the step.

    One device synchronisation for all terms.
    """
    if not terms:
        return
    names = list(terms)
    device = next((v.device for v in terms.values() if isinstance(v, Tensor)), None)
    values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v in terms.values()])
    values = values.cpu()
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        v = float(values[i])
        raise NonFiniteLoss(f"loss term '{names[i]}' is {'nan' if math.isnan(v) else v} at step {step}; "
                            f"lower the learning rate, check the inputs of that term, or resume from the last "
                            f"checkpoint")
