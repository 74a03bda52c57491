"""``uvtrain eval``: each metric on hand-made images, completion errors, the whole evaluation on a tiny synthetic
store with baselines (batch-independent, every number in the JSON), store-only methods and one-line CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.store import OK, StoreReader
from train.cli import app
from train.config import EvalConfig
from train.evaluate import completion_errors, evaluate, reconstruction_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ metrics
def test_identical_images_give_l1_0_and_ssim_1():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    m = reconstruction_metrics(img, img, mask)
    assert torch.all(m["l1"] == 0) and torch.all(m["l1_face"] == 0)
    torch.testing.assert_close(m["ssim"], torch.ones(2))


def test_known_offsets_inside_and_outside_the_mask():
    img = torch.full((1, 3, 32, 32), 0.4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, :16] = 1  # the top half is face
    brighter = img + 0.1
    m = reconstruction_metrics(brighter, img, mask)
    assert m["l1_face"].item() == pytest.approx(0.1, abs=1e-6)
    assert m["l1"].item() == pytest.approx(0.05, abs=1e-6)  # half the image is masked to 0 in both
    assert 0.0 < m["ssim"].item() < 1.0
    other = img.clone()
    other[:, :, 16:] = 1.0  # differences outside the face do not count
    m = reconstruction_metrics(other, img, mask)
    assert m["l1"].item() == 0 and m["ssim"].item() == pytest.approx(1.0, abs=1e-6)


def test_a_one_pixel_shift_lowers_ssim_by_its_structure():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 48, 48, generator=g)
    mask = torch.ones(1, 1, 48, 48)
    shifted = torch.roll(img, 1, dims=3)
    m = reconstruction_metrics(shifted, img, mask)
    assert m["ssim"].item() < 0.2  # white noise has no structure left after a shift
    assert m["l1"].item() == pytest.approx((shifted - img).abs().mean().item(), rel=1e-6)


def test_metric_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reconstruction_metrics(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), torch.ones(1, 1, 8, 8))


def test_completion_errors_split_seen_unseen_and_all():
    truth = torch.zeros(1, 3, 4, 4)
    uv = torch.zeros(1, 3, 4, 4)
    uv[..., :2] = 10 / 255  # error 10 on the left half
    seen = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    seen[..., 2:] = True  # the right half was seen
    valid = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    valid[..., 0, :] = False  # the top row is outside the layout
    e = completion_errors(uv, truth, seen, valid)
    assert e["seen"][0].item() == pytest.approx(0) and e["seen"][1].item() == 6
    assert e["unseen"][0].item() / e["unseen"][1].item() == pytest.approx(10.0) and e["unseen"][1].item() == 6
    assert e["all"][0].item() / e["all"][1].item() == pytest.approx(5.0)


# ------------------------------------------------------------------------------------- whole evaluation
@pytest.fixture(scope="module")
def result(train_store, trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "metrics.json"
    cfg = EvalConfig(store=train_store, out=out, checkpoint=trained_run,
                     methods=("bfm", "bl", "sampler", "generator"), identity="none", batch_size=5)
    return evaluate(cfg), cfg


def test_eval_with_baselines_on_a_synthetic_store(result, train_store):
    res, cfg = result
    assert json.loads(cfg.out.read_text()) == res
    r = StoreReader(train_store)
    assert res["samples"] == int((r.group["status"][...] == OK).sum())
    assert res["failures"] == [] and len(res["checkpoint_sha256"]) == 64 and res["store_fingerprint"]
    assert set(res["methods"]) == {"bfm", "bl", "sampler", "generator"}
    for m, row in res["methods"].items():
        assert 0 <= row["l1"] <= row["l1_face"] <= 1 and -1 <= row["ssim"] <= 1, m
        comp = row["completion_mae_255"]
        assert comp["all"]["samples"] == res["samples"]
        assert sum(comp[b]["samples"] for b in ("|yaw|<30", "30-60", ">60")) == res["samples"]
    # UV_bl holds the observed texels themselves: close to the truth where the photo saw the face, and its
    # re-render is the best of the four (the tiny networks are barely trained).
    bl = res["methods"]["bl"]
    assert bl["completion_mae_255"]["all"]["seen"] < 8
    assert bl["l1_face"] == min(row["l1_face"] for row in res["methods"].values())


def test_eval_is_batch_independent(result, train_store, trained_run, tmp_path):
    res, _ = result
    one = evaluate(EvalConfig(store=train_store, out=tmp_path / "m.json", checkpoint=trained_run,
                              methods=("bl", "generator"), identity="none", batch_size=1))
    for m in ("bl", "generator"):
        for k in ("l1", "l1_face", "ssim"):
            assert one["methods"][m][k] == pytest.approx(res["methods"][m][k], rel=1e-5, abs=1e-7), (m, k)
        assert one["methods"][m]["completion_mae_255"]["all"]["all"] == pytest.approx(
            res["methods"][m]["completion_mae_255"]["all"]["all"], rel=1e-5)


def test_identity_columns_with_dlib(train_store, tmp_path):
    from common.identity.dlibnet import dlib_model_path

    try:
        dlib_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the identity extra: {e}")
    res = evaluate(EvalConfig(store=train_store, out=tmp_path / "m.json", methods=("bl",), limit=4))
    row = res["methods"]["bl"]
    assert 0.5 < row["id_front"] <= row["id_recon"] + 0.05 and row["id_recon"] <= 1.0 + 1e-6
    assert res["samples"] == 4


def test_cli_store_only_method_and_errors(train_store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--store", train_store, "--method", "bl", "--identity", "none",
                              "--out", str(tmp_path / "m.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "m.json").read_text())["methods"]) == {"bl"}
    for args in (["--method", "generator"], [], ["--method", "nope"]):
        res = runner.invoke(app, ["eval", "--store", train_store, "--out", str(tmp_path / "x.json"), *args,
                                  "--no-progress"])
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, res.output)
    res = runner.invoke(app, ["eval", "--store", str(tmp_path / "none.zarr"), "--method", "bl", "--out",
                              str(tmp_path / "x.json"), "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "x.json").exists()


def test_store_only_eval_matches_its_own_arrays(train_store, tmp_path):
    """bl's re-render at the stored pose against the photo: the same number computed here from the arrays."""
    from train.render import PosedMesh, render_lookup

    res = evaluate(EvalConfig(store=train_store, out=tmp_path / "m.json", methods=("bl",), identity="none",
                              limit=3))
    r = StoreReader(train_store)
    idx = np.flatnonzero(r.group["status"][...] == OK)[:3]
    b = r.batch(idx, ["image", "face_region", "params", "uv_bl"])
    s = r.layout.image_size
    mesh = PosedMesh(r.face_model())
    grid, cover = mesh.lookup(mesh.verts(torch.from_numpy(b["params"]), s, s), s)
    uv = torch.from_numpy(b["uv_bl"]).permute(0, 3, 1, 2).float() / 255
    img = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).float() / 255
    face = torch.from_numpy(b["face_region"]).unsqueeze(1).float()
    l1 = ((render_lookup(uv, grid, cover) - img) * face).abs().mean((1, 2, 3)).mean().item()
    assert res["methods"]["bl"]["l1"] == pytest.approx(l1, rel=1e-5)
