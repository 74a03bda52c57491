"""LightCNN-29 v2 (common/identity/lightcnn.py): loading a checkpoint in the official layout, features against an
independent functional forward, the parameter count, bad checkpoints and the gray 128 px input. CPU."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from common.identity.lightcnn import (
    CheckpointError,
    LightCNN29v2,
    checkpoint_state_dict,
    lightcnn_input,
    load_lightcnn29v2,
)

# The official network_29layers_v2, written out a second time as (checkpoint key, in, out, kernel) of its 29 MFM
# convolutions in forward order; "pool" marks the max + avg pool after a layer.
_MFM_LAYERS = [("conv1", 1, 48, 5, "pool")]
for _stage, (_width, _out, _n) in enumerate([(48, 96, 1), (96, 192, 2), (192, 128, 3), (128, 128, 4)], start=1):
    for _b in range(_n):
        _MFM_LAYERS += [(f"block{_stage}.{_b}.conv1", _width, _width, 3, "res_in"),
                        (f"block{_stage}.{_b}.conv2", _width, _width, 3, "res_out")]
    _MFM_LAYERS += [(f"group{_stage}.conv_a", _width, _width, 1, ""),
                    (f"group{_stage}.conv", _width, _out, 3, "" if _stage == 3 else "pool")]


def _official_state_dict(num_classes: int = 10, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random weights with the keys and shapes of the official file (DataParallel 'module.' prefix, fc2 with
    num_classes rows instead of 80013). Scaled 1/sqrt(fan_in) so 29 layers stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for name, cin, cout, k, _ in _MFM_LAYERS:
        sd[f"module.{name}.filter.weight"] = torch.randn(2 * cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        sd[f"module.{name}.filter.bias"] = 0.1 * torch.randn(2 * cout, generator=g)
    sd["module.fc.weight"] = torch.randn(256, 8 * 8 * 128, generator=g) / (8 * 8 * 128) ** 0.5
    sd["module.fc.bias"] = 0.1 * torch.randn(256, generator=g)
    sd["module.fc2.weight"] = torch.randn(num_classes, 256, generator=g) / 16
    return sd


def _reference_features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """network_29layers_v2 forward up to fc, from the state dict with F.conv2d / F.linear: x (B, 1, 128, 128)."""
    res = None
    for name, _, cout, k, tag in _MFM_LAYERS:
        if tag == "res_in":
            res = x
        y = F.conv2d(x, sd[f"module.{name}.filter.weight"], sd[f"module.{name}.filter.bias"], padding=k // 2)
        x = torch.max(y[:, :cout], y[:, cout:])
        if tag == "res_out":
            x = x + res
        if tag == "pool":
            x = F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
    return F.linear(x.reshape(x.shape[0], -1), sd["module.fc.weight"], sd["module.fc.bias"])


@pytest.fixture(scope="module")
def official_sd() -> OrderedDict[str, torch.Tensor]:
    return _official_state_dict()


def _save_official(path, sd, legacy: bool = False) -> None:
    # The layout of train.py's save_checkpoint in github.com/AlfredXiangWu/LightCNN.
    ckpt = {"epoch": 80, "arch": "LightCNN", "state_dict": sd, "prec1": torch.tensor(98.5)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)


# ----------------------------------------------------------------------------------------------- network


def test_layer_table_is_the_29_layer_network():
    # 1 + 2 * (1 + 2 + 3 + 4) + 2 * 4 = 29 MFM convs, + fc: the "29 layers"; 4 poolings 128 -> 8.
    assert len(_MFM_LAYERS) + 1 == 30
    assert sum(tag == "pool" for *_, tag in _MFM_LAYERS) == 4


def test_parameter_count():
    model = LightCNN29v2()
    n = sum(p.numel() for p in model.parameters())
    # Convolutions 8,378,464 + fc 8192 * 256 + 256 = 2,097,408. A third-party run report of the official file
    # counts the same: "netIP 10,475,872/60" (60 tensors; "61 checkpoint tensors ... only module.fc2.weight was
    # filtered", file 123,844,849 B = (10,475,872 + 256 * 80,013) * 4 B + 8,049 B of pickle).
    assert n == 10_475_872
    assert sum(p.numel() for name, p in model.named_parameters() if not name.startswith("fc.")) == 8_378_464
    assert len(model.state_dict()) == 60
    assert model.fc2 is None
    with_fc2 = LightCNN29v2(num_classes=80013)
    assert sum(p.numel() for p in with_fc2.parameters()) - n == 256 * 80013


def test_module_keys_match_the_official_layout(official_sd):
    # fc2 optional: with it, the official keys load with plain load_state_dict after stripping 'module.'.
    model = LightCNN29v2(num_classes=10)
    model.load_state_dict({k.removeprefix("module."): v for k, v in official_sd.items()}, strict=True)
    feats = torch.randn(3, 256)
    assert torch.equal(model.eval().classify(feats), feats @ official_sd["module.fc2.weight"].T)
    with pytest.raises(RuntimeError, match="no fc2"):
        LightCNN29v2().classify(feats)


@pytest.mark.parametrize("legacy", [False, True], ids=["zipfile", "legacy-pickle"])
def test_load_official_layout_matches_functional_forward(tmp_path, official_sd, legacy):
    path = tmp_path / "LightCNN_29Layers_V2_checkpoint.pth.tar"
    _save_official(path, official_sd, legacy=legacy)
    model = load_lightcnn29v2(path)

    assert not model.training
    assert model.fc2 is None
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())

    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = model(x)
    with torch.no_grad():
        ref = _reference_features(official_sd, x)
    assert out.shape == (2, 256)
    assert ref.abs().max() > 0.1  # a non-degenerate feature
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # same ops: equal up to summation order

    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bare_state_dict_without_prefix(official_sd):
    bare = {k.removeprefix("module."): v for k, v in official_sd.items() if "fc2" not in k}
    state = checkpoint_state_dict(bare)
    assert list(state) == list(LightCNN29v2().state_dict())
    assert state["fc.weight"] is official_sd["module.fc.weight"]


# ----------------------------------------------------------------------------------------------- bad files


def test_missing_key(tmp_path, official_sd):
    sd = OrderedDict(official_sd)
    del sd["module.block3.1.conv2.filter.bias"]
    path = tmp_path / "missing.pth.tar"
    _save_official(path, sd)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): block3\.1\.conv2\.filter\.bias.*"
                                              r"LightCNN_29Layers_V2_checkpoint\.pth\.tar"):
        load_lightcnn29v2(path)


def test_wrong_shape_and_unexpected_key(official_sd):
    sd = OrderedDict(official_sd)
    sd["module.fc.weight"] = torch.zeros(256, 4096)
    sd["module.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): extra\.weight.*"
                                              r"wrong shape for 1 key\(s\): fc\.weight \(256, 4096\) "
                                              r"\(expected \(256, 8192\)\)"):
        checkpoint_state_dict({"state_dict": sd}, source="ckpt.pth.tar")


def test_v1_checkpoint_is_named():
    with pytest.raises(CheckpointError, match="LightCNN-9 or LightCNN-29 \\(v1\\)"):
        checkpoint_state_dict({"state_dict": {"module.features.0.filter.weight": torch.zeros(96, 1, 5, 5)}})


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match="expected a dict .* found list"):
        load_lightcnn29v2(path)
    with pytest.raises(CheckpointError, match="expected 'state_dict' to be a dict of tensors, found str"):
        checkpoint_state_dict({"state_dict": "weights.bin"})
    with pytest.raises(CheckpointError, match="entry 'module.fc.bias' is int, expected a tensor"):
        checkpoint_state_dict({"state_dict": {"module.fc.bias": 3}})


def test_unreadable_files(tmp_path, official_sd):
    with pytest.raises(FileNotFoundError, match="LightCNN_29Layers_V2_checkpoint.pth.tar"):
        load_lightcnn29v2(tmp_path / "absent.pth.tar")
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth.tar"):
        load_lightcnn29v2(garbage)
    # A pickled Python object that weights_only refuses: a clear error, not a silent unsafe load.
    with_object = tmp_path / "object.pth.tar"
    torch.save({"state_dict": official_sd, "args": argparse.Namespace(lr=0.01)}, with_object)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*re-save just its tensors.*argparse\.Namespace"):
        load_lightcnn29v2(with_object)


# ----------------------------------------------------------------------------------------------- input


def test_input_gray_weights_and_passthrough():
    rgb = torch.zeros(3, 3, 128, 128)
    for c in range(3):
        rgb[c, c] = 1.0  # pure red, green, blue
    gray = lightcnn_input(rgb)
    assert gray.shape == (3, 1, 128, 128)
    assert torch.allclose(gray[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]))
    assert torch.allclose(lightcnn_input(torch.ones(1, 3, 128, 128)), torch.ones(1, 1, 128, 128))
    g = torch.rand(2, 1, 128, 128)
    assert lightcnn_input(g) is g


def test_input_resize_is_antialiased_and_differentiable():
    # A 1-in-4 column pattern at 512 px: antialiased 4x down-sampling keeps its mean 0.25 in every pixel; plain
    # bilinear would sample between columns 1 and 2 of each period and return 0.
    img = torch.zeros(1, 3, 512, 512)
    img[..., ::4] = 1.0
    img.requires_grad_(True)
    out = lightcnn_input(img)
    assert out.shape == (1, 1, 128, 128)
    assert (out[..., 4:-4, 4:-4] - 0.25).abs().max() < 1e-4
    out.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_input_errors():
    with pytest.raises(ValueError, match=r"expected square face crops, found 128 x 96"):
        lightcnn_input(torch.zeros(1, 3, 128, 96))
    with pytest.raises(ValueError, match=r"found \(1, 4, 128, 128\)"):
        lightcnn_input(torch.zeros(1, 4, 128, 128))
    with pytest.raises(ValueError, match=r"expected \(B, 1, 128, 128\).*found \(1, 3, 128, 128\).*lightcnn_input"):
        LightCNN29v2()(torch.zeros(1, 3, 128, 128))


def test_identity_spec_lightcnn_path(tmp_path, official_sd):
    """--identity lightcnn:PATH: aligned grey 128 px chips from the landmarks -> the checkpoint's fc features."""
    from common.identity import load_identity
    from common.identity.align import DLIB_5PT_TEMPLATE, face_chip

    path = tmp_path / "LightCNN_29Layers_V2_checkpoint.pth.tar"
    _save_official(path, official_sd)
    net = load_identity(f"lightcnn:{path}")
    img = torch.rand(2, 3, 256, 256, requires_grad=True)
    pts = ((0.25 + DLIB_5PT_TEMPLATE.float()) / 1.5 * 200 + 20).expand(2, 5, 2)
    feat = net(img, pts)
    assert feat.shape == (2, 256)
    grey = lightcnn_input(face_chip(img.detach(), pts, size=128))
    torch.testing.assert_close(feat.detach(), _reference_features(official_sd, grey), rtol=1e-4, atol=1e-4)
    feat.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError):
        load_identity(f"lightcnn:{tmp_path / 'nowhere.pth.tar'}")
