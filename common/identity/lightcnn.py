"""LightCNN-29 v2 face-identity features (Wu et al., "A Light CNN for Deep Face Representation with Noisy Labels").

The network is ``network_29layers_v2`` of github.com/AlfredXiangWu/LightCNN (``light_cnn.py``), written here
from its description; the submodule names follow that file so the official
``LightCNN_29Layers_V2_checkpoint.pth.tar`` loads key for key once the ``DataParallel`` prefix ``module.`` is
stripped. Only the 256-d ``fc`` feature is computed; the 80013-way identity classifier ``fc2`` of the checkpoint
is ignored (pass ``num_classes`` to build one).

    images (B, 3, H, W) in [0, 1] --lightcnn_input--> (B, 1, 128, 128) gray --LightCNN29v2--> (B, 256)

The network expects aligned face crops (the official test crops are 128 x 128 gray faces); alignment is done by
the caller.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 128
"""Side of the square gray input LightCNN was trained and tested on."""

FEATURE_DIM = 256
"""Size of the ``fc`` identity feature."""

OFFICIAL_NUM_CLASSES = 80013
"""Rows of ``fc2`` in the official LightCNN-29 v2 checkpoint (ignored by the loader)."""

OFFICIAL_FILE = "LightCNN_29Layers_V2_checkpoint.pth.tar"

_RGB_TO_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as cv2.COLOR_RGB2GRAY / PIL "L"
_STAGES = ((48, 96), (96, 192), (192, 128), (128, 128))  # (residual width, group output) of block_i / group_i
_BLOCKS = (1, 2, 3, 4)  # residual blocks per stage


class CheckpointError(ValueError):
    """A file that is not a usable LightCNN-29 v2 checkpoint."""


class MFM(nn.Module):
    """Max-Feature-Map 2/1 convolution: a conv to ``2 * out_channels`` maps, then the elementwise max of the
    first and second halves of the channels.

    (B, in_channels, H, W) -> (B, out_channels, H', W'). The conv is called ``filter`` as in the official code.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.filter = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride=1, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.filter(x).split(self.out_channels, dim=1)
        return torch.maximum(a, b)


class Group(nn.Module):
    """A 1 x 1 MFM at constant width (``conv_a``) followed by a 3 x 3 MFM to ``out_channels`` (``conv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_a = MFM(in_channels, in_channels, 1, 0)
        self.conv = MFM(in_channels, out_channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv_a(x))


class ResBlock(nn.Module):
    """Two 3 x 3 MFMs at constant width with an identity shortcut: ``x + conv2(conv1(x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = MFM(channels, channels, 3, 1)
        self.conv2 = MFM(channels, channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


def _max_plus_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """The v2 down-sampling: 2 x 2 max pool + 2 x 2 average pool. (B, C, H, W) -> (B, C, H/2, W/2)."""
    return F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)


class LightCNN29v2(nn.Module):
    """LightCNN-29 v2 feature extractor.

    ``forward``: x (B, 1, 128, 128) float gray in [0, 1] -> (B, 256) the ``fc`` feature (before dropout, as the
    official code returns it). 10,475,872 parameters in 60 tensors without ``fc2``.

    num_classes: build the identity classifier ``fc2`` (256 -> num_classes, no bias) for :meth:`classify`;
    None (default) leaves it out.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.conv1 = MFM(1, 48, 5, 2)
        for i, ((width, out), n) in enumerate(zip(_STAGES, _BLOCKS, strict=True), start=1):
            self.add_module(f"block{i}", nn.Sequential(*(ResBlock(width) for _ in range(n))))
            self.add_module(f"group{i}", Group(width, out))
        self.fc = nn.Linear(8 * 8 * 128, FEATURE_DIM)
        self.fc2 = None if num_classes is None else nn.Linear(FEATURE_DIM, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, INPUT_SIZE, INPUT_SIZE) or not x.is_floating_point():
            raise ValueError(
                f"LightCNN29v2 input: expected (B, 1, {INPUT_SIZE}, {INPUT_SIZE}) float gray in [0, 1], found "
                f"{tuple(x.shape)} {x.dtype}; convert RGB face crops with lightcnn_input()"
            )
        x = _max_plus_avg_pool(self.conv1(x))  # 64 x 64
        x = _max_plus_avg_pool(self.group1(self.block1(x)))  # 32 x 32
        x = _max_plus_avg_pool(self.group2(self.block2(x)))  # 16 x 16
        x = self.group3(self.block3(x))
        x = _max_plus_avg_pool(self.group4(self.block4(x)))  # (B, 128, 8, 8)
        return self.fc(x.flatten(1))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, 256) -> identity logits (B, num_classes) through ``fc2`` (dropout in train mode)."""
        if self.fc2 is None:
            raise RuntimeError("this LightCNN29v2 has no fc2; build it with LightCNN29v2(num_classes=...)")
        return self.fc2(F.dropout(features, training=self.training))


def lightcnn_input(images: torch.Tensor) -> torch.Tensor:
    """Face crops -> LightCNN input. Differentiable.

    images: (B, 3, H, W) RGB (or (B, 1, H, W) gray) float in [0, 1], square, H == W.
    Returns (B, 1, 128, 128): BT.601 gray (0.299 R + 0.587 G + 0.114 B), resized by antialiased bilinear
    interpolation when H != 128. Values are not clamped or range-checked.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(
            f"lightcnn_input: expected (B, 3, H, W) RGB or (B, 1, H, W) gray float images, found "
            f"{tuple(images.shape)} {images.dtype}"
        )
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(
            f"lightcnn_input: expected square face crops, found {h} x {w}; crop the aligned face to a square first "
            f"(resizing would change the face's aspect ratio)"
        )
    if images.shape[1] == 3:
        weights = images.new_tensor(_RGB_TO_GRAY).view(1, 3, 1, 1)
        gray = (images * weights).sum(dim=1, keepdim=True)
    else:
        gray = images
    if h != INPUT_SIZE:
        gray = F.interpolate(gray, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                             antialias=True)
    return gray


def _expected_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in LightCNN29v2().state_dict().items()}


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def checkpoint_state_dict(checkpoint: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The LightCNN29v2 (no fc2) state dict in a loaded checkpoint, checked key for key and shape for shape.

    checkpoint: ``{'state_dict': {...}, ...}`` (the official layout: also 'epoch', 'arch', ...) or a bare state
    dict; keys with or without the ``module.`` prefix; ``fc2.*`` entries are dropped.
    source: names the file in errors. Raises :class:`CheckpointError` listing every missing, unexpected or
    misshapen tensor.
    """
    hint = f"expected the official {OFFICIAL_FILE} (github.com/AlfredXiangWu/LightCNN, 'LightCNN-29 v2')"
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a dict (a checkpoint or a state dict), found "
                              f"{type(checkpoint).__name__}; {hint}")
    state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected 'state_dict' to be a dict of tensors, found "
                              f"{type(state).__name__}; {hint}")
    found = {}
    for key, value in state.items():
        name = key.removeprefix("module.") if isinstance(key, str) else key
        if isinstance(name, str) and name.startswith("fc2."):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is {type(value).__name__}, expected a tensor; {hint}")
        found[name] = value

    expected = _expected_shapes()
    missing = [k for k in expected if k not in found]
    unexpected = [str(k) for k in found if k not in expected]
    misshapen = [f"{k} {tuple(found[k].shape)} (expected {tuple(s)})"
                 for k, s in expected.items() if k in found and found[k].shape != s]
    if missing or unexpected or misshapen:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        if misshapen:
            problems.append(f"wrong shape for {len(misshapen)} key(s): {_listing(misshapen)}")
        if any(k.startswith("features.") or k.startswith("fc.filter.") for k in unexpected):
            problems.append("this looks like a LightCNN-9 or LightCNN-29 (v1) checkpoint, not v2")
        raise CheckpointError(f"{source} is not a LightCNN-29 v2 checkpoint: " + "; ".join(problems) + f". {hint}")
    return {k: found[k] for k in expected}


def load_lightcnn29v2(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LightCNN29v2:
    """Load the official LightCNN-29 v2 checkpoint as a frozen feature extractor.

    path: ``LightCNN_29Layers_V2_checkpoint.pth.tar`` (or any file in its layout, see
    :func:`checkpoint_state_dict`), read with ``torch.load(weights_only=True)``.
    Returns a :class:`LightCNN29v2` (no fc2) in eval mode with ``requires_grad=False`` parameters, float32, on
    ``map_location``. Gradients still flow to its input.
    """
    hint = f"expected the official {OFFICIAL_FILE} (github.com/AlfredXiangWu/LightCNN, 'LightCNN-29 v2')"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LightCNN-29 v2 checkpoint not found: {os.fspath(path)}; {hint}, pass its path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(
            f"{os.fspath(path)} could not be read with torch.load(weights_only=True): it is not a torch file or "
            f"it holds Python objects other than tensors, numbers, strings and dicts; {hint}. If you trust the "
            f"file, re-save just its tensors: ckpt = torch.load(path, weights_only=False); "
            f"torch.save({{'state_dict': ckpt['state_dict']}}, new_path)."
            + (f" ({reason})" if reason else "")
        ) from e
    except Exception as e:  # a corrupt or foreign file fails anywhere in the unpickler (EOFError, IndexError, ...)
        raise CheckpointError(
            f"{os.fspath(path)} is not a readable torch checkpoint ({type(e).__name__}: {e}); {hint}"
        ) from e
    state = checkpoint_state_dict(checkpoint, source=os.fspath(path))
    with torch.device("meta"):
        model = LightCNN29v2()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
