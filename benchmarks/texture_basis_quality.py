"""Benchmark: how good is a UV texture basis learned from incomplete UV_gt maps, and how good is UV_bl?

Everything runs on the synthetic world (procedural face model), where the *true* texture basis exists:
the model's own per-vertex basis rasterised with ``UVTextureBasis.from_face_model``. Three kinds of basis
are compared on the same held-out faces:

* ``true``: the model's basis (K = 16), the ceiling for a linear albedo model;
* ``pca K=k [sym]``: masked EM-PCA (:func:`preprocess.texture.learn_masked_pca`) learned from ``N``
  incomplete UV_gt maps, with or without the mirrored maps as extra samples;
* ``mean``: the PCA mean alone (K = 0), the floor.

Two scenarios, because ``uv_true`` (what the camera sees) bakes in Lambertian shading and high-frequency
detail (freckles, stubble, marks) that no albedo basis can express:

* ``photo``: the basis is learned from, and Eq. 8 fitted to, the pipeline's UV_gt; errors against ``uv_true``;
* ``albedo``: the same masks, values from ``uv_albedo`` (the lighting-free texture); errors against it.

Errors are mean absolute differences in 1/255 units. ``vis/2`` fits Eq. 8 on half of each held-out map's
visible texels (a checkerboard of 4x4-texel blocks) and scores the other half; ``hidden`` (profiles only,
|yaw| >= 45) fits on all visible texels and scores the face texels that were never seen.

The second table is the blend study: on the hidden half of the profiles, the error of UV_bfm and UV_bl
against the truth, split by the source map (mirrored texels, code 2; model texels, code 0), for

* ``pipeline``: :func:`preprocess.blend.blend_uv` as ``preprocess.stages`` calls it (Omega = observed +
  mirrored texels, Dirichlet ``f = UV_bfm`` on every crossing edge);
* ``mirror only``: the symmetric fill without the Poisson step;
* ``model into photo`` (prototype): Eq. 9 with the roles swapped: the model texels are the unknowns, guided
  by UV_bfm's gradient, with the observed + mirrored texels as the Dirichlet boundary (kept unchanged);
* ``trusted boundary`` (prototype): Eq. 9 with the Dirichlet condition only on crossing edges into texels
  where UV_bfm is trustworthy (observed in >= ``--trust`` of the training maps); edges into the never-observed
  rim are Neumann. The untrusted rim is then filled by a second Poisson solve that follows UV_bfm's gradient
  and meets the blended result continuously (same Eq. 9, with the roles of source and boundary swapped).

Run (a few minutes on 2 cores at the defaults; the test runs a tiny version):

    python benchmarks/texture_basis_quality.py --train 160 --test 24 --uv-size 128 --image-size 192
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from common.config import FitConfig
from common.procedural import build_procedural_model
from common.synthetic import SyntheticConfig, generate_batch
from common.uvtools import region_uv_mask
from preprocess.blend import SOURCE_MIRRORED, SOURCE_MODEL, blend_uv, poisson_system, symmetric_fill
from preprocess.config import MaskedPCAConfig, StageConfig, UVGTConfig
from preprocess.sources import SampleInput
from preprocess.stages import StageContext, Timer, run_geometry
from preprocess.texture import UVTextureBasis, learn_masked_pca, ridge_texture_fit

PROFILE_YAW = 45.0
"""|yaw| (degrees) from which a held-out face counts as a profile for the ``hidden`` columns."""


@dataclass(eq=False)
class World:
    """Synthetic faces through the geometry stages: (N, U, U, 3) float32 maps in [0, 1], (N, U, U) bool masks.

    uv_gt: the pipeline's UV_gt; mask: its observed texels; uv_true / uv_albedo: the ground truth;
    yaw: (N,) degrees; face: (U, U) bool face region (skin, no eyes / mouth) inside the layout.
    """

    uv_gt: np.ndarray
    mask: np.ndarray
    uv_true: np.ndarray
    uv_albedo: np.ndarray
    yaw: np.ndarray
    face: np.ndarray
    ctx: StageContext

    def __len__(self) -> int:
        return len(self.yaw)

    def take(self, idx) -> World:
        """The faces ``idx`` (same context)."""
        return World(self.uv_gt[idx], self.mask[idx], self.uv_true[idx], self.uv_albedo[idx], self.yaw[idx],
                     self.face, self.ctx)


def make_world(n: int, image_size: int = 128, uv_size: int = 64, seed: int = 0, start: int = 0,
               yaw_min: float = 0.0, ctx: StageContext | None = None, supersample: int = 1) -> World:
    """Generate faces ``start .. start + n - 1`` of the synthetic world and run the fit + UV_gt stages on them.

    The fit is the ``given`` fitter (the true parameters), so the maps differ from the truth only by the
    unwrap (resampling, erosion, visibility): the texture questions are isolated from fitting errors.
    """
    model = ctx.model if ctx is not None else build_procedural_model()
    syn = SyntheticConfig(image_size=image_size, uv_size=uv_size, seed=seed, yaw_min_deg=yaw_min,
                          supersample=supersample)
    faces = generate_batch(range(start, start + n), syn, model)
    if ctx is None:
        cfg = StageConfig(fit=FitConfig(image_size=image_size), uvgt=UVGTConfig(uv_size=uv_size))
        ctx = StageContext.build(cfg, model=model)
    inputs = [SampleInput(index=f.index, key=str(f.index), image=f.image, given_params=f.params,
                          truth={"face_mask": f.face_mask}) for f in faces]
    geo = run_geometry(inputs, ctx, Timer())
    if (geo.reason != 0).any():
        raise RuntimeError(f"synthetic faces failed the geometry stages: reasons {geo.reason}")
    face = region_uv_mask(model, "face", uv_size) & ~region_uv_mask(model, "mouth", uv_size)
    return World(uv_gt=geo.uv_gt, mask=geo.uv_gt_mask, uv_true=np.stack([f.uv_true for f in faces]),
                 uv_albedo=np.stack([f.uv_albedo for f in faces]), yaw=geo.pose[:, 0].astype(np.float64),
                 face=face, ctx=ctx)


def learn_pca(values: np.ndarray, masks: np.ndarray, ctx: StageContext, k: int, symmetric: bool,
              fit_size: int | None = None, min_observed: float = 0.02) -> UVTextureBasis:
    """Masked-PCA basis with ``k`` components (k = 0: the mean alone) from maps (N, U, U, 3) under masks."""
    valid = ctx.uv_cache.uv_frags.tri_id[0].numpy() >= 0
    cfg = MaskedPCAConfig(n_components=max(k, 1), symmetric=symmetric, fit_size=fit_size,
                          min_observed=min_observed)
    basis = learn_masked_pca(values, masks, valid, cfg, mirror_index=ctx.mirror_index, name=f"pca{k}")
    if k == 0:
        basis = UVTextureBasis(basis.mean, basis.basis[..., :0], basis.valid, "mean")
    return basis


def true_basis(ctx: StageContext) -> UVTextureBasis:
    """The procedural model's own texture basis in UV space (valid = the layout)."""
    return UVTextureBasis.from_face_model(ctx.model, ctx.config.uvgt.uv_size)


def block_split(size: int, block: int = 4) -> np.ndarray:
    """(U, U) bool checkerboard of ``block`` x ``block`` texel squares: the fit half (the rest scores)."""
    i = np.arange(size) // block
    return (i[:, None] + i[None, :]) % 2 == 0


def fit_and_synthesize(values: np.ndarray, masks: np.ndarray, basis: UVTextureBasis, lam: float = 1.0) -> np.ndarray:
    """Eq. 8 then ``mean + B c``, clipped to [0, 1]: (N, U, U, 3). A K = 0 basis predicts its mean."""
    if basis.n_components == 0:
        return np.repeat(np.clip(basis.mean, 0, 1)[None], len(values), 0)
    return np.clip(basis.synthesize(ridge_texture_fit(values, masks, basis, lam)), 0, 1)


def _mae(pred: np.ndarray, truth: np.ndarray, sel: np.ndarray) -> float:
    """Mean absolute error (1/255 units) over the selected texels (N, U, U) of (N, U, U, 3) maps."""
    if not sel.any():
        return float("nan")
    return float(np.abs(pred - truth)[sel].mean() * 255.0)


def reconstruction_errors(basis: UVTextureBasis, fit_values: np.ndarray, test: World, truth: np.ndarray,
                          lam: float = 1.0) -> dict[str, float]:
    """Eq. 8 on held-out maps: ``vis/2`` (fit on half the visible texels, score the rest) and ``hidden``.

    fit_values: (N, U, U, 3) what Eq. 8 sees (UV_gt or the albedo under the same masks); truth: the maps
    scored against. ``hidden`` is over the profiles (|yaw| >= PROFILE_YAW) and their unseen face texels.
    """
    u = basis.size
    half = block_split(u)[None]
    pred_half = fit_and_synthesize(fit_values, test.mask & half, basis, lam)
    score = test.mask & ~half & test.face[None] & basis.valid[None]
    out = {"vis/2": _mae(pred_half, truth, score)}
    prof = np.abs(test.yaw) >= PROFILE_YAW
    if prof.any():
        pred = fit_and_synthesize(fit_values[prof], test.mask[prof], basis, lam)
        hidden = ~test.mask[prof] & test.face[None] & basis.valid[None]
        out["hidden"] = _mae(pred, truth[prof], hidden)
    else:
        out["hidden"] = float("nan")
    return out


# ---------------------------------------------------------------------------------------------- blending
def _dirichlet_solve(value: np.ndarray, guide: np.ndarray, omega: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Eq. 9 with a restricted boundary: unknowns ``omega``, guidance ``grad guide`` on inner edges,
    ``f = value`` on crossing edges into ``fixed`` texels; crossing edges into other texels are dropped
    (Neumann). (U, U, 3) float arrays; returns ``value`` with the omega texels replaced."""
    a, _ = poisson_system(omega)
    idx = -np.ones(omega.shape, np.int64)
    idx[omega] = np.arange(int(omega.sum()))
    rows, cols = np.nonzero(omega)
    n = len(rows)
    diag = np.zeros(n)
    b = np.zeros((n, value.shape[2]))
    h, w = omega.shape
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r2, c2 = rows + dr, cols + dc
        inside = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        r2c, c2c = np.clip(r2, 0, h - 1), np.clip(c2, 0, w - 1)
        nb_omega = inside & omega[r2c, c2c]
        nb_fixed = inside & ~omega[r2c, c2c] & fixed[r2c, c2c]
        diag += nb_omega | nb_fixed
        b[nb_omega] += guide[rows, cols][nb_omega] - guide[r2c, c2c][nb_omega]
        b[nb_fixed] += value[r2c, c2c][nb_fixed]
    # poisson_system's off-diagonal pattern (-1 per inner edge) with our own diagonal (inner + fixed edges)
    a = sp.csr_matrix(a - sp.diags(a.diagonal()) + sp.diags(diag))
    isolated = diag == 0  # a component with no neighbour at all: keep its guide value
    diag_fix = sp.diags(isolated.astype(float))
    b[isolated] = guide[rows, cols][isolated]
    x = spla.splu((a + diag_fix).tocsc()).solve(b)
    out = value.copy()
    out[rows, cols] = x
    return out


def trusted_blend(uv_gt: np.ndarray, mask: np.ndarray, uv_bfm: np.ndarray, valid: np.ndarray, trusted: np.ndarray,
                  mirror_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prototype: Eq. 9 with the Dirichlet boundary restricted to texels where UV_bfm is trustworthy.

    1. Omega = observed + mirrored texels; guidance = the filled UV_gt's gradient; ``f = UV_bfm`` only on
       crossing edges into ``trusted`` texels, Neumann elsewhere.
    2. The untrusted model texels (never observed in training, UV_bfm extrapolated) are unknowns of a second
       Eq. 9 with UV_bfm's gradient as guidance and the step-1 result / trusted UV_bfm as the boundary.

    Where every boundary texel is trusted this is exactly :func:`preprocess.blend.blend_uv`. Omega components
    that touch no trusted texel (rare) fall back to their plain mirrored fill.
    """
    filled, fill_mask, source_map = symmetric_fill(uv_gt, mask, mirror_index, valid)
    ref = np.where(fill_mask[..., None], filled, uv_bfm).astype(np.float64)
    step1 = _dirichlet_solve(ref, filled.astype(np.float64), fill_mask, trusted & valid & ~fill_mask)
    rim = valid & ~fill_mask & ~trusted
    # the rim's boundary: the blended Omega and the trusted model texels; its guidance: UV_bfm's gradient
    step2 = _dirichlet_solve(step1, uv_bfm.astype(np.float64), rim, valid & ~rim)
    return np.clip(step2, 0, 1).astype(np.float32), source_map


def observed_fraction(masks: np.ndarray, ctx: StageContext, symmetric: bool = True) -> np.ndarray:
    """(U, U) fraction of the training maps (and their mirrors) that observe each texel."""
    frac = masks.mean(0)
    if symmetric:
        mi = ctx.mirror_index
        mir = np.where(mi >= 0, frac.reshape(-1)[np.maximum(mi, 0)], 0).reshape(frac.shape)
        frac = (frac + mir) / 2
    return frac


def blend_study(basis: UVTextureBasis, test: World, trusted: np.ndarray, albedo: bool = False,
                lam: float = 1.0) -> dict[str, dict]:
    """Errors (1/255) on the hidden face texels of the profiles, by source code, for each blend variant.

    albedo: blend maps made of ``uv_albedo`` under the same masks and score against it (the lighting-free
    question); otherwise UV_gt against ``uv_true``. Returns ``{variant: {"mirrored", "model", "all"}}`` for
    ``UV_bfm``, ``mirror only``, ``pipeline`` (UV_bl as built), ``trusted boundary`` (:func:`trusted_blend`),
    plus ``{"boundary": {...}}``: UV_bfm's error on the model texels next to Omega (the Dirichlet boundary),
    split into trusted and untrusted texels.
    """
    ctx = test.ctx
    values, truth = (test.uv_albedo, test.uv_albedo) if albedo else (test.uv_gt, test.uv_true)
    prof = np.flatnonzero(np.abs(test.yaw) >= PROFILE_YAW)
    acc: dict[str, dict[str, list]] = {}
    cross = np.ones((3, 3), np.uint8)
    for k in prof:
        vals = np.where(test.mask[k][..., None], values[k], 0).astype(np.float32)
        uv_bfm = fit_and_synthesize(vals[None], test.mask[k:k + 1], basis, lam)[0]
        bl, src = blend_uv(vals, test.mask[k], uv_bfm, face_mask=basis.valid, mirror_index=ctx.mirror_index,
                           config=replace(ctx.config.blend, fill_mode="mirror", mirror_blend=False,
                                          mirror_min_facing=None, nose_strip=0.0))  # no normals here: plain mirror
        filled, fill_mask, _ = symmetric_fill(vals, test.mask[k], ctx.mirror_index, basis.valid)
        tb, _ = trusted_blend(vals, test.mask[k], uv_bfm, basis.valid, trusted, ctx.mirror_index)
        ref = np.where(fill_mask[..., None], filled, uv_bfm).astype(np.float64)
        swapped = np.clip(_dirichlet_solve(ref, uv_bfm.astype(np.float64), basis.valid & ~fill_mask, fill_mask), 0, 1)
        variants = {"UV_bfm": uv_bfm, "mirror only": ref, "pipeline": bl, "trusted boundary": tb,
                    "model into photo": swapped}
        hidden = ~test.mask[k] & test.face
        for name, pred in variants.items():
            err = np.abs(pred - truth[k]).mean(-1) * 255.0
            d = acc.setdefault(name, {"mirrored": [], "model": [], "all": []})
            d["mirrored"].append(err[hidden & (src == SOURCE_MIRRORED)])
            d["model"].append(err[hidden & (src == SOURCE_MODEL)])
            d["all"].append(err[hidden])
        ring = (cv2.dilate(fill_mask.astype(np.uint8), cross) > 0) & ~fill_mask & basis.valid
        err = np.abs(uv_bfm - truth[k]).mean(-1) * 255.0
        d = acc.setdefault("boundary", {"trusted": [], "untrusted": [], "untrusted share": []})
        d["trusted"].append(err[ring & trusted])
        d["untrusted"].append(err[ring & ~trusted])
        d["untrusted share"].append(np.array([(ring & ~trusted).sum() / max(ring.sum(), 1)]))
    return {name: {key: float(np.concatenate(v).mean()) if sum(len(x) for x in v) else float("nan")
                   for key, v in d.items()} for name, d in acc.items()}


# ------------------------------------------------------------------------------------------------- main
def basis_table(train: World, test: World, ks=(4, 8, 16), fit_size: int | None = None) -> list[tuple]:
    """Rows ``(basis, photo vis/2, photo hidden, albedo vis/2, albedo hidden)`` in 1/255 units."""
    rows = []
    scen = {"photo": (train.uv_gt, test.uv_gt, test.uv_true),
            "albedo": (train.uv_albedo, test.uv_albedo, test.uv_albedo)}
    candidates: list[tuple[str, dict]] = [("true K=16", {s: true_basis(train.ctx) for s in scen})]
    for k in (0, *ks):
        for sym in (False, True) if k else (True,):
            name = "mean" if k == 0 else f"pca K={k}" + (" sym" if sym else "")
            candidates.append((name, {s: learn_pca(v[0], train.mask, train.ctx, k, sym, fit_size)
                                      for s, v in scen.items()}))
    for name, bases in candidates:
        row = [name]
        for s, (_, fit_vals, truth) in scen.items():
            e = reconstruction_errors(bases[s], fit_vals, test, truth)
            row += [e["vis/2"], e["hidden"]]
        rows.append(tuple(row))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=160, help="faces the PCA is learned from")
    ap.add_argument("--test", type=int, default=24, help="held-out faces (half of them profiles)")
    ap.add_argument("--uv-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--blend-k", type=int, default=16, help="PCA components for the blend study")
    ap.add_argument("--trust", type=float, default=0.02, help="observed fraction for a trusted UV_bfm texel")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    train = make_world(args.train, args.image_size, args.uv_size, args.seed)
    half = args.test // 2
    test_a = make_world(args.test - half, args.image_size, args.uv_size, args.seed, start=100_000, ctx=train.ctx)
    test_b = make_world(half, args.image_size, args.uv_size, args.seed, start=200_000, yaw_min=60.0, ctx=train.ctx)
    test = World(*(np.concatenate([getattr(test_a, f), getattr(test_b, f)]) for f in
                   ("uv_gt", "mask", "uv_true", "uv_albedo", "yaw")), test_a.face, train.ctx)
    print(f"world: {len(train)} train / {len(test)} test faces ({int((np.abs(test.yaw) >= PROFILE_YAW).sum())} "
          f"profiles), U={args.uv_size}, S={args.image_size}; {time.perf_counter() - t0:.0f} s")

    print("\nEq. 8 reconstruction error, mean |pred - truth| in 1/255 (vis/2: held-out visible half; "
          "hidden: unseen face texels of profiles)")
    print(f"{'basis':<16} {'photo vis/2':>12} {'photo hidden':>13} {'albedo vis/2':>13} {'albedo hidden':>14}")
    for name, *vals in basis_table(train, test, tuple(args.ks)):
        print(f"{name:<16} " + " ".join(f"{v:>{w}.2f}" for v, w in zip(vals, (12, 13, 13, 14), strict=True)))

    frac = observed_fraction(train.mask, train.ctx)
    trusted = frac >= args.trust
    for albedo in (False, True):
        vals = train.uv_albedo if albedo else train.uv_gt
        basis = learn_pca(vals, train.mask, train.ctx, args.blend_k, True)
        res = blend_study(basis, test, trusted, albedo=albedo)
        what = "uv_albedo maps vs uv_albedo" if albedo else "UV_gt vs uv_true"
        print(f"\nBlend study, {what} (PCA K={args.blend_k} sym; hidden face texels of the profiles, 1/255; "
              f"trusted = observed in >= {args.trust:.0%} of training maps, {trusted[basis.valid].mean():.0%} of "
              f"the layout)")
        print(f"{'variant':<18} {'mirrored (2)':>13} {'model (0)':>10} {'all hidden':>11}")
        for name, d in res.items():
            if name != "boundary":
                print(f"{name:<18} {d['mirrored']:>13.2f} {d['model']:>10.2f} {d['all']:>11.2f}")
        b = res["boundary"]
        print(f"UV_bfm error on the Dirichlet boundary ring: trusted texels {b['trusted']:.2f}, untrusted "
              f"{b['untrusted']:.2f} ({b['untrusted share']:.0%} of the ring)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
