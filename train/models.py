"""The three networks of the method: the UV sampler (Section 3.1), the UV generator (Section 3.2) and the
PatchGAN discriminators used as D_ctr, D_sd and D_face (Section 3.2.2).

Images and UV maps enter every network as float (B, 3, H, W) in [0, 1] and are mapped to [-1, 1] inside.
All three run in float32 or under bfloat16/float16 autocast: the spectrally normalised convolutions
compute their normalised weight in float32 (:class:`SNConv2d`), and the sampler predicts, resizes and
uses its sampling grid in float32 (a bfloat16 coordinate near 1 is only good to 1/128, i.e. two pixels
of a 256 image).

Parameter counts of the default configurations (``count_parameters``):

* ``UVSampler(SamplerConfig())`` (S = 152, 19 x 19 control grid): 21,296,722 -- 18,981,760 in the feature
  extractor (4,195,840 of them in the projection of the 4 x 4 pooled map to 512), 2,314,962 in the sampler head,
  740,050 of them in its last layer. With ``control_size=None`` (the paper's per-texel head): 67,919,872, of which
  47,363,200 in the last layer (1024 x 46,208 weights + biases).
* ``UVGenerator(256)`` (5 halvings, bottleneck 8 x 8): 50,245,635 (``UVGenerator(152)``, 3 halvings: 26,640,387).
* ``PatchDiscriminator()``: 1,843,649.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from train.config import DiscriminatorConfig, GeneratorConfig, SamplerConfig
from train.uvops import expect_shape, mirror

__all__ = [
    "SNConv2d",
    "UVSampler",
    "UVGenerator",
    "PatchDiscriminator",
    "identity_grid",
    "resize_grid",
    "auto_n_down",
    "count_parameters",
]



def count_parameters(module: nn.Module) -> int:
    """Number of trainable-or-not parameters (spectral-norm power-iteration vectors are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


class SNConv2d(nn.Conv2d):
    """``nn.Conv2d`` with spectral normalisation [36] (``torch.nn.utils.parametrizations.spectral_norm``).

    The normalised weight (power iteration and sigma) is computed with autocast off, so in float32: under
    CUDA autocast ``torch.mv`` runs in low precision while the stored u/v vectors are float32, and sigma
    would lose precision or mix dtypes. The convolution itself still runs in the autocast dtype.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight
        return self._conv_forward(x, weight, self.bias)


# ---------------------------------------------------------------------------------------------------------------
# UV sampler (Section 3.1)


def identity_grid(size: int, device: torch.device | str | None = None) -> Tensor:
    """(size, size, 2) float32 grid_sample grid (x, y in [-1, 1], align_corners=False) of the pixel centres.

    ``grid[i, j] = ((2j + 1) / size - 1, (2i + 1) / size - 1)``: sampling an image of side ``size`` with it
    returns the image itself, and any other side gets its bilinear resample.
    """
    c = (2 * torch.arange(size, dtype=torch.float32, device=device) + 1) / size - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y], -1)


def resize_grid(grid: Tensor, size: int) -> Tensor:
    """Bilinearly resample a sampling grid's two coordinate channels: (B, S, S, 2) -> (B, size, size, 2).

    Section 4.1: "apply a simple bilinear interpolation of the predicted sampling coordinates and use
    them to sample the 256 sized images". Texel centres map to texel centres (align_corners=False).
    """
    if grid.shape[1] == size and grid.shape[2] == size:
        return grid
    g = F.interpolate(grid.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1)


class _DownResBlock(nn.Module):
    """Pre-activation residual block that halves H and W: ReLU-conv3-ReLU-conv3-avgpool + (conv1-avgpool)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = SNConv2d(c_in, c_out, 3, padding=1)
        self.conv2 = SNConv2d(c_out, c_out, 3, padding=1)
        self.skip = SNConv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(F.relu(x))))
        return F.avg_pool2d(h, 2) + self.skip(F.avg_pool2d(x, 2))


class UVSampler(nn.Module):
    """UV attention sampler (Section 3.1): image -> sampling grid S_att -> incomplete UV map UV_spl.

    "the feature extractor is composed of stacked residual blocks. Spectral normalization is applied to
    each convolution layer ... a 512-dimensional feature is extracted from the input image. Then, the
    feature is fed into the sampler head, a stack of fully connected layers interspersed with ReLU
    activations. The sampler's output is reshaped as S_att in R^{B x 152 x 152 x 2}".

    Feature extractor: SN conv3x3 stem, ``n_down`` SN residual blocks each halving the map (avg-pool), ReLU,
    average pooling to a ``pool_size``² map (so any input side >= 2**n_down works: 128 and 256 in practice), a
    linear projection of the flattened map to ``feature_dim`` and a LayerNorm. Head: ``head_layers`` x (Linear +
    ReLU), then a Linear to 2 C^2 offsets on a C x C control grid (C = ``control_size``; C = S with
    ``control_size=None``, the paper's literal head), bilinearly upsampled to S and added to the template: the
    (B, S, S, 2) normalised image coordinates (x, y; grid_sample convention, align_corners=False). Coordinates
    are not clamped: outside [-1, 1] the sample is 0, which is how the sampler can leave a texel empty. The
    output layer runs in float32, with autocast off.

    Starts from the identity grid (:func:`identity_grid`); the trainer calls :meth:`set_template` with the
    mean sampling map of the data. Parameter counts are in the module docstring.
    """

    def __init__(self, config: SamplerConfig = SamplerConfig()) -> None:
        super().__init__()
        self.config = c = config
        widths = [min(c.channels * 2**k, c.max_channels) for k in range(c.n_down + 1)]
        self.stem = SNConv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(*(_DownResBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.project = nn.Linear(widths[-1] * c.pool_size**2, c.feature_dim)
        self.norm = nn.LayerNorm(c.feature_dim)
        hidden: list[nn.Module] = []
        width = c.feature_dim
        for _ in range(c.head_layers):
            hidden += [nn.Linear(width, c.head_hidden), nn.ReLU()]
            width = c.head_hidden
        self.hidden = nn.Sequential(*hidden)
        side = c.grid_size if c.control_size is None else c.control_size
        self.out = nn.Linear(width, 2 * side**2)
        self.register_buffer("template", identity_grid(c.grid_size))
        self.set_template(identity_grid(c.grid_size))

    @torch.no_grad()
    def set_template(self, grid: Tensor) -> None:
        """Start the sampler from a template grid: (S, S, 2) normalised image coordinates.

        The template is kept as a buffer (saved with the weights) and the head predicts offsets from it: the
        output layer's bias is zeroed and its weights are redrawn from ``nn.Linear``'s default uniform init scaled
        by ``template_weight_scale`` (redrawn, so calling it again does not shrink them further), so the first
        predictions are the template plus a small image-dependent perturbation rather than noise around the
        image centre. Call before training.
        """
        s = self.config.grid_size
        expect_shape("grid", grid, (s, s, 2))
        bound = self.config.template_weight_scale / math.sqrt(self.out.in_features)
        self.out.weight.uniform_(-bound, bound)
        self.out.bias.zero_()
        self.template.copy_(grid.to(self.template))

    def features(self, image: Tensor) -> Tensor:
        """The image feature: image (B, 3, H, W) in [0, 1] -> (B, feature_dim)."""
        h = self.blocks(self.stem(image * 2 - 1))
        pooled = F.adaptive_avg_pool2d(F.relu(h), self.config.pool_size).flatten(1)
        return self.norm(self.project(pooled))

    def forward(self, image: Tensor, out_size: int | None = None) -> tuple[Tensor, Tensor]:
        """image (B, 3, H, W) in [0, 1], H, W >= 2**n_down -> (uv_spl (B, 3, U, U), grid (B, U, U, 2)), float32.

        The grid is predicted at S = ``grid_size``; ``out_size`` U other than S resizes it bilinearly
        (:func:`resize_grid`). uv_spl = grid_sample(image, grid, bilinear, zeros padding, align_corners=False).
        """
        b = expect_shape("image", image, ("B", 3, None, None))["B"]
        n = 2**self.config.n_down
        if image.shape[-2] < n or image.shape[-1] < n:
            raise ValueError(f"image: expected sides >= {n} (2**n_down), found {tuple(image.shape)}")
        if out_size is not None and int(out_size) <= 0:
            raise ValueError(f"out_size: expected a positive UV size or None, found {out_size}")
        h = self.hidden(self.features(image))
        s = self.config.grid_size
        with torch.autocast(image.device.type, enabled=False):
            offset = self.out(h.float())
            side = s if self.config.control_size is None else self.config.control_size
            grid = self.template + resize_grid(offset.view(b, side, side, 2), s)
            if out_size is not None:
                grid = resize_grid(grid, int(out_size))
            uv = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return uv, grid


# ---------------------------------------------------------------------------------------------------------------
# UV generator (Section 3.2)


def auto_n_down(uv_size: int, min_bottleneck: int = 8) -> int:
    """Most halvings of ``uv_size`` that stay integer and leave a side >= ``min_bottleneck`` (256 -> 5, 152 -> 3)."""
    k = 0
    while uv_size % 2 ** (k + 1) == 0 and uv_size // 2 ** (k + 1) >= min_bottleneck:
        k += 1
    return k


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 32), c)


def _conv_norm_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), _norm(c_out), nn.LeakyReLU(0.2))


class _ResBlock(nn.Module):
    """x + GN(conv3(LReLU(GN(conv3(x)))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.LeakyReLU(0.2),
                                  nn.Conv2d(c, c, 3, padding=1), _norm(c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Up(nn.Module):
    """Resize-convolution up step: nearest x2, conv3 (c_in -> c_out), concat the skip, conv3 (2 c_out -> c_out)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up = _conv_norm_act(c_in, c_out)
        self.fuse = _conv_norm_act(2 * c_out, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.fuse(torch.cat([x, skip], 1))


_RESIDUAL_EPS = 1e-3
"""UV_spl is clamped to [eps, 1 - eps] before its logit (GeneratorConfig.residual)."""
_GATE_INIT = 4.0
"""Initial logit of the visibility gate (GeneratorConfig.visibility_gate): training starts from UV_pred ~ UV_spl."""


class UVGenerator(nn.Module):
    """UV generator (Section 3.2): complete an incomplete UV map, (UV_spl, mask) -> UV_pred.

    A U-Net: a conv3x3 stem on [UV_spl * mask in [-1, 1], mask] (4 channels; 8 with ``config.mirror_input``,
    which appends both mirrored across the face; 2 more with ``config.grid_input``: the sampler's grid),
    ``n_down`` levels of stride-2 conv3x3 + conv3x3, ``n_res`` residual blocks at the bottleneck, and per level a
    resize-convolution (nearest x2 then conv3x3, which avoids the checkerboard of transposed convolutions)
    concatenated with the encoder's skip and fused by a conv3x3; a conv3x3 to RGB and a sigmoid. With
    ``config.residual`` the conv3x3's output is added to logit(UV_spl) * mask before the sigmoid and starts at zero.
    ``config.visibility_gate`` adds a fresh RGB fill and a gate v (4 more output channels): UV_pred = v * that
    corrected UV_spl + (1 - v) * the fill.

    Normalisation: GroupNorm (up to 32 groups) after every conv. It normalises per sample, so it
    behaves the same at batch 6 (the paper's) as at batch 1 and in train and eval mode (BatchNorm's
    statistics are noisy at batch 6 and differ at inference); unlike InstanceNorm it normalises over
    groups of channels, so the relative scale of channels within a group -- e.g. colour -- survives.

    ``uv_size`` fixes the automatic ``n_down``; the network then runs at any U divisible by 2**n_down
    (U = 32, 64, 128, 152, 256 with their own automatic depths).
    """

    def __init__(self, uv_size: int, config: GeneratorConfig = GeneratorConfig(),
                 mirror_index: Tensor | None = None) -> None:
        """``mirror_index`` (U * U,) int64 (the store's texel mirror, -1: none) is needed by ``config.mirror_input``;
        it is a buffer of the state dict, so a network built without it (to load a checkpoint) gets it there."""
        super().__init__()
        self.config = c = config
        self.uv_size = int(uv_size)
        if c.mirror_input:
            if mirror_index is None:
                mirror_index = torch.full((self.uv_size**2,), -1, dtype=torch.int64)
            expect_shape("mirror_index", mirror_index, (self.uv_size**2,))
            self.register_buffer("mirror_index", mirror_index.detach().to(torch.int64).clone())
        self.n_down = auto_n_down(self.uv_size, c.min_bottleneck) if c.n_down is None else int(c.n_down)
        if self.uv_size % 2**self.n_down:
            raise ValueError(f"uv_size {uv_size} is not divisible by 2**n_down = {2**self.n_down}; "
                             f"pass n_down=None for the automatic depth")
        widths = [min(c.channels * 2**k, c.max_channels) for k in range(self.n_down + 1)]
        self.stem = _conv_norm_act((8 if c.mirror_input else 4) + (2 if c.grid_input else 0), widths[0])
        self.down = nn.ModuleList(nn.Sequential(_conv_norm_act(a, b, stride=2), _conv_norm_act(b, b))
                                  for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.bottleneck = nn.Sequential(*(_ResBlock(widths[-1]) for _ in range(c.n_res)))
        self.up = nn.ModuleList(_Up(a, b) for a, b in zip(widths[:0:-1], widths[-2::-1], strict=True))
        # RGB; with the gate also a fresh RGB fill and the gate's logit
        self.head = nn.Conv2d(widths[0], 7 if c.visibility_gate else 3, 3, padding=1)
        if c.residual:  # start as the identity: UV_pred = UV_spl
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if c.visibility_gate:  # ... trusting UV_spl everywhere (gate sigmoid(4) = 0.98)
                nn.init.constant_(self.head.bias[6:], _GATE_INIT)

    def forward(self, uv_spl: Tensor, mask: Tensor, grid: Tensor | None = None, return_gate: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        """uv_spl (B, 3, U, U) in [0, 1], mask (B, 1, U, U) {0, 1} (its valid texels) -> UV_pred (B, 3, U, U).

        grid: (B, U, U, 2) the sampler's sampling grid in grid_sample's [-1, 1] coordinates; needed by
        ``config.grid_input``, ignored otherwise.

        UV_pred is float32 in [0, 1] (the sigmoid is taken in float32 under autocast). ``return_gate`` (needs
        ``config.visibility_gate``): also the gate's logits (B, 1, U, U) float32, for
        :func:`train.losses.visibility_loss`.
        """
        if return_gate and not self.config.visibility_gate:
            raise ValueError("return_gate: this generator has no visibility gate (GeneratorConfig.visibility_gate)")
        d = expect_shape("uv_spl", uv_spl, ("B", 3, "U", "U"))
        expect_shape("mask", mask, ("B", 1, "U", "U"), d)
        if d["U"] % 2**self.n_down:
            raise ValueError(f"uv_spl: expected a side divisible by 2**n_down = {2**self.n_down}, found {d['U']}")
        mask = mask.to(uv_spl.dtype)
        x = torch.cat([(uv_spl * 2 - 1) * mask, mask], 1)
        if self.config.mirror_input:
            if d["U"] != self.uv_size:
                raise ValueError(f"uv_spl: mirror_input needs the side {self.uv_size} its mirror index has, "
                                 f"found {d['U']}")
            x = torch.cat([x, mirror(x, self.mirror_index)], 1)
        if self.config.grid_input:
            if grid is None:
                raise ValueError("grid: this generator reads the sampler's grid (GeneratorConfig.grid_input); pass it")
            expect_shape("grid", grid, (d["B"], d["U"], d["U"], 2))
            x = torch.cat([x, grid.permute(0, 3, 1, 2).clamp(-2.0, 2.0).to(x.dtype)], 1)
        h = self.stem(x)
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        h = self.bottleneck(h)
        for up, skip in zip(self.up, skips[-2::-1], strict=True):
            h = up(h, skip)
        out = self.head(h).float()
        rgb = out[:, :3]
        if self.config.residual:
            rgb = rgb + torch.logit(uv_spl.float().clamp(_RESIDUAL_EPS, 1 - _RESIDUAL_EPS)) * mask.float()
        uv_pred = torch.sigmoid(rgb)
        if not self.config.visibility_gate:
            return uv_pred
        gate_logit = out[:, 6:7]
        gate = torch.sigmoid(gate_logit)
        uv_pred = gate * uv_pred + (1 - gate) * torch.sigmoid(out[:, 3:6])
        return (uv_pred, gate_logit) if return_gate else uv_pred


# ---------------------------------------------------------------------------------------------------------------
# Discriminators (Section 3.2.2)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator with spectral norm on every conv and LeakyReLU(0.2), no other normalisation.

    ``n_layers`` SN conv4x4 stride 2 (padding 1: exact halving), then SN conv3x3 stride 1 and an SN conv3x3
    to one logit per patch. Size-preserving 3x3 tail convolutions (pix2pix uses 4x4, which shrinks by one
    per layer) keep small, non-square crops valid: 16 x 24 -> 2 x 3 logits, 40 x 56 -> 5 x 7. Receptive
    field 54 x 54 at n_layers = 3.
    """

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()) -> None:
        super().__init__()
        self.config = c = config
        widths = [min(c.channels * 2**k, 8 * c.channels) for k in range(c.n_layers + 1)]
        layers: list[nn.Module] = [SNConv2d(c.in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for a, b in zip(widths[:-2], widths[1:-1], strict=True):
            layers += [SNConv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2)]
        layers += [SNConv2d(widths[-2], widths[-1], 3, 1, 1), nn.LeakyReLU(0.2), SNConv2d(widths[-1], 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, in_channels, h, w) in [0, 1], h, w >= 2**(n_layers + 1) -> logits (B, 1, h // 2**L, w // 2**L).

        L = n_layers; logits in the autocast dtype when under autocast.
        """
        expect_shape("x", x, (None, self.config.in_channels, None, None))
        n = 2 ** (self.config.n_layers + 1)
        if x.shape[-2] < n or x.shape[-1] < n:
            raise ValueError(f"x: expected sides >= {n} (2**(n_layers + 1)), found {tuple(x.shape)}")
        return self.net(x * 2 - 1)
