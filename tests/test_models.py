"""UV sampler, UV generator and PatchGAN discriminator (train/models.py): shapes, template start, spectral norm,
gradients, determinism, autocast and the documented parameter counts. Tiny sizes, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from train.config import DiscriminatorConfig, GeneratorConfig, SamplerConfig
from train.models import (
    PatchDiscriminator,
    UVGenerator,
    UVSampler,
    auto_n_down,
    count_parameters,
    identity_grid,
    resize_grid,
)

TINY_SAMPLER = SamplerConfig(grid_size=24, channels=8, max_channels=32, feature_dim=32, head_hidden=64)
TINY_GENERATOR = GeneratorConfig(channels=8, max_channels=32, n_res=1)
TINY_DISC = DiscriminatorConfig(channels=8)


def _smooth_image(b: int, h: int, w: int) -> torch.Tensor:
    """(b, 3, h, w) in [0, 1], low frequency, so bilinear samples at nearby points are nearly equal."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    chans = [0.5 + 0.4 * torch.sin(3 * x + k) * torch.cos(2 * y - k) for k in range(3)]
    return torch.stack(chans)[None].repeat(b, 1, 1, 1)


# ----------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize(("h", "w", "out_size", "u"), [(32, 32, None, 24), (64, 64, None, 24), (32, 32, 32, 32),
                                                        (64, 48, 32, 32), (64, 64, 24, 24)])
def test_sampler_shapes(h, w, out_size, u):
    torch.manual_seed(0)
    sampler = UVSampler(TINY_SAMPLER)
    uv, grid = sampler(torch.rand(2, 3, h, w), out_size=out_size)
    assert uv.shape == (2, 3, u, u) and grid.shape == (2, u, u, 2)
    assert uv.dtype == grid.dtype == torch.float32


def test_sampler_rejects_bad_inputs():
    sampler = UVSampler(TINY_SAMPLER)
    with pytest.raises(ValueError, match=r"expected sides >= 32"):
        sampler(torch.rand(1, 3, 16, 32))
    with pytest.raises(ValueError, match=r"image: expected \(B, 3, \*, \*\)"):
        sampler(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"grid: expected \(24, 24, 2\)"):
        sampler.set_template(torch.zeros(32, 32, 2))


def test_identity_grid_samples_the_image_itself():
    img = torch.rand(2, 3, 12, 12)
    out = F.grid_sample(img, identity_grid(12).expand(2, -1, -1, -1), align_corners=False)
    torch.testing.assert_close(out, img)


def test_resize_grid_keeps_linear_grids_inside():
    # bilinear resampling reproduces a linear grid exactly, except the outer half texel where it clamps
    big = resize_grid(identity_grid(24)[None], 48)[0]
    torch.testing.assert_close(big[1:-1, 1:-1], identity_grid(48)[1:-1, 1:-1], atol=1e-6, rtol=0)
    g = torch.rand(2, 24, 24, 2)
    assert resize_grid(g, 24) is g


def test_sampler_starts_from_its_template():
    """At init the sampler returns the template's samples, up to the small (x1e-2) weight perturbation."""
    torch.manual_seed(0)
    sampler = UVSampler(TINY_SAMPLER)
    img = _smooth_image(2, 48, 48)
    # default template: the identity grid -> uv_spl is the bilinear resample of the input
    uv, grid = sampler(img)
    torch.testing.assert_close(grid, identity_grid(24).expand(2, -1, -1, -1), atol=0.03, rtol=0)
    torch.testing.assert_close(uv, F.interpolate(img, size=(24, 24), mode="bilinear", align_corners=False,
                                                 antialias=False), atol=0.03, rtol=0)
    # a non-trivial template: a rotated, shrunk identity grid
    c, s = 0.8 * torch.cos(torch.tensor(0.3)), 0.8 * torch.sin(torch.tensor(0.3))
    template = identity_grid(24) @ torch.tensor([[c, s], [-s, c]])
    weight = sampler.out.weight.detach().clone()
    sampler.set_template(template)
    # redrawn at the same scale, not shrunk a second time
    assert float(sampler.out.weight.detach().abs().max()) == pytest.approx(float(weight.abs().max()), rel=0.05)
    uv, grid = sampler(img)
    torch.testing.assert_close(grid, template.expand(2, -1, -1, -1), atol=0.03, rtol=0)
    torch.testing.assert_close(uv, F.grid_sample(img, template.expand(2, -1, -1, -1), align_corners=False),
                               atol=0.03, rtol=0)
    # out_size resizes the predicted coordinates bilinearly (Section 4.1)
    uv32, grid32 = sampler(img, out_size=32)
    torch.testing.assert_close(grid32, resize_grid(grid, 32))
    torch.testing.assert_close(uv32, F.grid_sample(img, grid32, align_corners=False))


def test_sampler_feature_is_size_agnostic():
    torch.manual_seed(0)
    sampler = UVSampler(TINY_SAMPLER)
    assert sampler.features(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    assert sampler.features(torch.rand(2, 3, 128, 96)).shape == (2, 32)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("make", [lambda: UVSampler(TINY_SAMPLER), lambda: PatchDiscriminator(TINY_DISC)])
def test_spectral_norm_on_every_conv(make):
    torch.manual_seed(0)
    model = make()
    convs = _convs(model)
    assert len(convs) >= 4
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for _ in range(30):  # one power iteration per training-mode forward
            model(x)
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        assert type(conv.parametrizations.weight[0]).__name__ == "_SpectralNorm"
        # behaviour: the effective weight, as a (out, in*k*k) matrix, has spectral norm 1
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 2e-2


def _models():
    torch.manual_seed(0)
    return {
        "sampler": (UVSampler(TINY_SAMPLER), (torch.rand(2, 3, 32, 32),)),
        "generator": (UVGenerator(32, TINY_GENERATOR),
                      (torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.4).float())),
        "discriminator": (PatchDiscriminator(TINY_DISC), (torch.rand(2, 3, 40, 56),)),
    }


@pytest.mark.parametrize("name", ["sampler", "generator", "discriminator"])
def test_gradients_reach_every_parameter_and_adam_moves_them(name):
    model, inputs = _models()[name]
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # a plain sum cancels under GN
    (out * weights).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999)).step()
    for pname, p in model.named_parameters():
        assert not torch.equal(p, before[pname]), pname


@pytest.mark.parametrize("name", ["sampler", "generator", "discriminator"])
def test_init_is_deterministic_given_the_seed(name):
    a, b = _models()[name][0].state_dict(), _models()[name][0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- generator


def test_auto_n_down():
    assert [auto_n_down(u) for u in (32, 48, 64, 128, 152, 256)] == [2, 2, 3, 4, 3, 5]
    assert auto_n_down(19) == 0


@pytest.mark.parametrize("u", [32, 48, 64])
def test_generator_shapes_and_range(u):
    torch.manual_seed(0)
    gen = UVGenerator(u, TINY_GENERATOR)
    uv = torch.rand(2, 3, u, u)
    mask = (torch.rand(2, 1, u, u) > 0.5).float()
    out = gen(uv, mask)
    assert out.shape == (2, 3, u, u) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_generator_depth_and_errors():
    assert UVGenerator(152, TINY_GENERATOR).n_down == 3
    assert UVGenerator(256, GeneratorConfig(channels=4, max_channels=8, n_res=0, n_down=2)).n_down == 2
    gen = UVGenerator(32, TINY_GENERATOR)  # n_down = 2: runs at any side divisible by 4
    assert gen(torch.rand(1, 3, 36, 36), torch.ones(1, 1, 36, 36)).shape == (1, 3, 36, 36)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*n_down = 4"):
        gen(torch.rand(1, 3, 34, 34), torch.ones(1, 1, 34, 34))
    with pytest.raises(ValueError, match=r"mask: expected \(B, 1, U, U\) with B=1, U=32"):
        gen(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        UVGenerator(36, GeneratorConfig(n_down=3))


def test_residual_generator_starts_as_identity_and_learns():
    """GeneratorConfig.residual: UV_pred = UV_spl at initialisation (to the logit clamp), 0.5 outside the mask;
    its gradients still reach every layer."""
    torch.manual_seed(0)
    gen = UVGenerator(32, dataclasses.replace(TINY_GENERATOR, residual=True))
    uv = torch.rand(2, 3, 32, 32) * 0.9 + 0.05
    mask = (torch.rand(2, 1, 32, 32) > 0.3).float()
    out = gen(uv, mask)
    torch.testing.assert_close(out * mask, uv * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(out * (1 - mask), (0.5 * (1 - mask)).expand_as(out), atol=1e-6, rtol=0)
    (out - torch.rand_like(out)).abs().mean().backward()
    assert gen.head.weight.grad.abs().sum() > 0
    uv_other = torch.where(mask.bool(), uv, torch.rand_like(uv))
    torch.testing.assert_close(gen(uv_other, mask), out)


def test_visibility_gate_starts_near_uv_spl_and_blends_a_fresh_fill():
    """GeneratorConfig.visibility_gate: UV_pred = v * corrected UV_spl + (1 - v) * fill, v = sigmoid(4) at start;
    a gate forced shut gives the fill alone; the gate's logits come back with return_gate; no gate without residual."""
    torch.manual_seed(0)
    gen = UVGenerator(32, dataclasses.replace(TINY_GENERATOR, residual=True, visibility_gate=True))
    assert gen.head.out_channels == 7
    uv = torch.rand(2, 3, 32, 32) * 0.9 + 0.05
    mask = torch.ones(2, 1, 32, 32)
    out, gate = gen(uv, mask, return_gate=True)
    v = torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(gate, torch.full_like(gate, 4.0))
    torch.testing.assert_close(out, v * uv + (1 - v) * 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(gen(uv, mask), out)
    with torch.no_grad():
        gen.head.bias[6] = -50.0  # shut: the fill (0.5 from the zero-initialised head) everywhere
        gen.head.bias[3:6] = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(gen(uv, mask), torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0])).view(1, 3, 1, 1)
                               .expand_as(uv), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no visibility gate"):
        UVGenerator(32, TINY_GENERATOR)(uv, mask, return_gate=True)
    with pytest.raises(ValueError, match="needs residual"):
        dataclasses.replace(TINY_GENERATOR, visibility_gate=True)


def test_grid_input_generator_reads_the_sampling_grid():
    """GeneratorConfig.grid_input: two more stem channels; the grid changes UV_pred; a missing or misshapen grid is
    an error."""
    torch.manual_seed(0)
    gen = UVGenerator(16, dataclasses.replace(TINY_GENERATOR, grid_input=True))
    assert gen.stem[0].in_channels == 6
    uv, mask = torch.rand(2, 3, 16, 16), torch.ones(2, 1, 16, 16)
    grid = torch.rand(2, 16, 16, 2) * 2 - 1
    assert not torch.allclose(gen(uv, mask, grid=grid), gen(uv, mask, grid=-grid))
    with pytest.raises(ValueError, match="pass it"):
        gen(uv, mask)
    with pytest.raises(ValueError, match="grid"):
        gen(uv, mask, grid=grid[:, :8])


def test_mirror_input_generator_sees_the_mirrored_map():
    """GeneratorConfig.mirror_input: the stem reads [x, mirror(x)]; with the column-flip index, a network whose
    stem keeps only the mirrored half answers a flipped input as the plain half answers the original."""
    torch.manual_seed(0)
    u = 16
    flip = torch.arange(u * u).view(u, u).flip(-1).reshape(-1)
    cfg = dataclasses.replace(TINY_GENERATOR, mirror_input=True)
    gen = UVGenerator(u, cfg, mirror_index=flip)
    assert gen.stem[0].in_channels == 8
    torch.testing.assert_close(gen.state_dict()["mirror_index"], flip)
    loaded = UVGenerator(u, cfg)  # built without the index, as to load a checkpoint: the state dict brings it
    loaded.load_state_dict(gen.state_dict())
    uv, mask = torch.rand(1, 3, u, u), (torch.rand(1, 1, u, u) > 0.3).float()
    torch.testing.assert_close(loaded(uv, mask), gen(uv, mask))
    with torch.no_grad():
        gen.stem[0].weight[:, :4] = 0  # only the mirrored channels reach the network
    with torch.no_grad():
        a = gen(uv, mask)
        w = gen.stem[0].weight
        w[:, 4:], w[:, :4] = w[:, :4].clone(), w[:, 4:].clone()
        b = gen(uv.flip(-1), mask.flip(-1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mirror_index"):
        UVGenerator(u, cfg, mirror_index=flip[:-1])
    with pytest.raises(ValueError, match="needs the side 16"):
        gen(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32))


def test_generator_ignores_masked_out_texels():
    """The network sees UV_spl only through the mask: values under mask 0 do not change UV_pred."""
    torch.manual_seed(0)
    gen = UVGenerator(32, TINY_GENERATOR)
    uv = torch.rand(1, 3, 32, 32)
    mask = (torch.rand(1, 1, 32, 32) > 0.5).float()
    noisy = uv + (1 - mask) * torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(gen(uv, mask), gen(noisy, mask))


# ----------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize(("h", "w", "out"), [(16, 16, (2, 2)), (16, 24, (2, 3)), (40, 56, (5, 7)), (33, 47, (4, 5))])
def test_discriminator_shapes(h, w, out):
    torch.manual_seed(0)
    disc = PatchDiscriminator(TINY_DISC)
    assert disc(torch.rand(3, 3, h, w)).shape == (3, 1, *out)


def test_discriminator_errors_and_channels():
    disc = PatchDiscriminator(TINY_DISC)
    with pytest.raises(ValueError, match="expected sides >= 16"):
        disc(torch.rand(1, 3, 8, 40))
    with pytest.raises(ValueError, match=r"x: expected \(\*, 3, \*, \*\)"):
        disc(torch.rand(1, 4, 16, 16))
    disc4 = PatchDiscriminator(DiscriminatorConfig(channels=8, in_channels=4, n_layers=2))
    assert disc4(torch.rand(2, 4, 8, 12)).shape == (2, 1, 2, 3)


# ------------------------------------------------------------------------------------------ autocast, counts


def test_models_run_under_bf16_autocast():
    torch.manual_seed(0)
    sampler, gen, disc = UVSampler(TINY_SAMPLER), UVGenerator(32, TINY_GENERATOR), PatchDiscriminator(TINY_DISC)
    img = _smooth_image(2, 32, 32)
    uv_ref, grid_ref = sampler(img, out_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uv, grid = sampler(img, out_size=32)
        pred = gen(uv, torch.ones(2, 1, 32, 32))
        logits = disc(pred)
    assert uv.dtype == grid.dtype == pred.dtype == torch.float32
    assert logits.shape == (2, 1, 4, 4) and torch.isfinite(logits).all()
    # the grid's last layer runs in float32: bf16 features move it by far less than a texel
    torch.testing.assert_close(grid, grid_ref, atol=2e-3, rtol=0)
    (pred.mean() + logits.float().mean()).backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_count_parameters_and_documented_defaults():
    lin = nn.Linear(3, 5)
    assert count_parameters(lin) == 20
    sampler = UVSampler(TINY_SAMPLER)
    assert count_parameters(sampler.out) == (64 + 1) * 2 * 19 * 19  # offsets on the 19 x 19 control grid
    assert count_parameters(UVSampler(dataclasses.replace(TINY_SAMPLER, control_size=None)).out) == 65 * 2 * 24 * 24
    # the numbers quoted in train/models.py's docstrings
    torch.manual_seed(0)
    full = UVSampler()
    assert count_parameters(full) == 21_296_722
    assert count_parameters(full.out) == 740_050
    literal = UVSampler(SamplerConfig(control_size=None))
    assert count_parameters(literal) == 67_919_872
    assert count_parameters(literal.out) == 47_363_200
    assert count_parameters(UVGenerator(256)) == 50_245_635
    assert count_parameters(PatchDiscriminator()) == 1_843_649
