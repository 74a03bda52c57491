"""The model part of UV_bl (issue 11.5): a greyscale photo keeps a grey model part, and a basis learned from too
few photos says so."""

from __future__ import annotations

import dataclasses

import numpy as np

from preprocess.build import build_store
from preprocess.buildcli import make_config
from preprocess.config import BuildArgs
from preprocess.texture import match_greyscale


def test_grey_photo_gets_a_grey_model_part_and_colour_photos_are_unchanged():
    rng = np.random.default_rng(0)
    uv_bfm = rng.uniform(0.2, 0.8, (2, 8, 8, 3)).astype(np.float32)  # a coloured model fit
    grey = np.repeat(rng.uniform(0, 1, (8, 8, 1)), 3, -1)
    colour = rng.uniform(0, 1, (8, 8, 3))
    mask = np.zeros((2, 8, 8), bool)
    mask[:, :4] = True
    out = match_greyscale(uv_bfm, np.stack([grey, colour]), mask)
    assert np.allclose(out[0], out[0, ..., :1])  # grey: R = G = B
    lum = uv_bfm[0] @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(out[0, ..., 0], lum, rtol=1e-6)
    np.testing.assert_array_equal(out[1], uv_bfm[1])
    # a JPEG-ish grey photo (tiny chroma noise) still counts as grey; no observed texel: unchanged
    noisy = np.clip(grey + rng.normal(0, 0.002, grey.shape), 0, 1)
    assert np.allclose(*np.moveaxis(match_greyscale(uv_bfm[:1], noisy[None], mask[:1])[0, ..., :2], -1, 0))
    np.testing.assert_array_equal(match_greyscale(uv_bfm[:1], noisy[None], np.zeros_like(mask[:1])), uv_bfm[:1])


def test_too_few_photos_for_the_basis_is_reported(tmp_path):
    cfg, run = make_config(BuildArgs(out=tmp_path / "s.zarr", count=4, image_size=64, uv_size=32, chunk=4,
                                     pca_samples=4, n_tex=12))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    msg = [e for e in summary.errors if "usable components" in e]
    # 4 maps and their mirror images span 7 directions
    assert len(msg) == 1 and "7 usable components of the 12 requested" in msg[0] and "at least 13" in msg[0], msg
