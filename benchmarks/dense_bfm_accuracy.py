"""Accuracy and build time of the public dense BFM (:func:`common.loaders.load_tddfa_dense_public`).

Ground truth: the exact BFM bases at the 68 landmarks (3DDFA ``c++/weights/{u_base,w_shp_base,w_exp_base}.txt``)
and the 3,860 on-surface points of ``Model_PAF.pkl``. Rows:

* basis error per component: ``||B_lift[kp, :, k] - B_exact[:, :, k]|| / ||B_exact[:, :, k]||`` (median / max over k);
* landmark displacement: for ``--n`` parameter draws ``alpha = mean + std * N(0, 1)`` from 3DDFA_V2's
  ``param_mean_std_62d_120x120.pkl`` (alpha parts only), ``|(B_lift - B_exact)[kp] alpha|`` per landmark, in
  BFM units and in % of the inter-ocular (outer eye corner 36-45) distance of the mean (mean / p95 / max);
* PAF residual: the lifted basis interpolated at the PAF points (triangle + barycentrics) against the PAF rows.

``held-out`` builds the identity basis from the PAF points only (``landmark_anchors=False``) and is the honest
accuracy; ``anchored`` (the default model) also interpolates the 68 exact rows, so it is exact there by
construction. The expression basis only has the 68 exact rows as data (the PAF file's expression block is a
copy of its shape block): its held-out figure is leave-one-landmark-out of the same thin-plate spline.

    python benchmarks/dense_bfm_accuracy.py [--assets ../shared/assets] [--repeats 3] [--picture /tmp/dense_bfm.png]
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from pathlib import Path

import numpy as np
from scipy.interpolate import RBFInterpolator

from common.faces.assets import TDDFAAssets
from common.loaders import (
    DenseLiftParams,
    _barycentric_matrix,
    load_bfm_mean_mesh,
    load_bfm_uv,
    load_param_stats,
    load_tddfa_dense_public,
)


def exact_landmark_bases(v1: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u_base (68, 3), w_shp_base (68, 3, 40), w_exp_base (68, 3, 10) from the 3DDFA c++ weights."""
    w = v1 / "c++" / "weights"
    return (np.loadtxt(w / "u_base.txt").reshape(68, 3), np.loadtxt(w / "w_shp_base.txt").reshape(68, 3, 40),
            np.loadtxt(w / "w_exp_base.txt").reshape(68, 3, 10))


def relative_basis_error(lifted: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """(P, 3, K) each -> (K,) relative Frobenius error per basis column."""
    return np.linalg.norm(lifted - exact, axis=(0, 1)) / np.linalg.norm(exact, axis=(0, 1))


def draw_alphas(v2: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 40) identity and (n, 10) expression coefficients: mean + std * N(0, 1) of 3DDFA_V2's statistics."""
    mean, std = load_param_stats(TDDFAAssets.from_dir(v2).param_stats)
    p = mean[12:] + std[12:] * np.random.default_rng(seed).standard_normal((n, 50)).astype(np.float32)
    return p[:, :40].astype(np.float64), p[:, 40:].astype(np.float64)


def displacement_error(delta_basis: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(P, 3, K) basis error and (n, K) coefficients -> (n, P) point displacement error (model units)."""
    return np.linalg.norm(np.einsum("pck,nk->npc", delta_basis, alpha), axis=-1)


def exp_leave_one_out(uv_lm: np.ndarray, exact_exp: np.ndarray) -> np.ndarray:
    """(68, 3, 10) error of the expression spline at each landmark when that landmark is left out."""
    err = np.zeros_like(exact_exp)
    flat = exact_exp.reshape(68, -1)
    for i in range(68):
        keep = np.arange(68) != i
        err[i] = (RBFInterpolator(uv_lm[keep], flat[keep], kernel="thin_plate_spline")(uv_lm[i:i + 1])[0]
                  - flat[i]).reshape(3, 10)
    return err


def paf_data(v1: Path, v2: Path):
    """Barycentric matrix (P, 53215) of the on-surface PAF points, their id rows (P, 3, 40), and the
    noneck ids (38365,) to pad a noneck basis back to 53,215 rows."""
    import scipy.io as sio

    paf = pickle.load(open(v1 / "train.configs" / "Model_PAF.pkl", "rb"), encoding="latin1")
    z = np.load(v1 / "derived" / "paf_uv_bary.npz")
    tri = sio.loadmat(str(v1 / "visualize" / "tri.mat"))["tri"].T.astype(np.int64) - 1
    on = z["surf_dist"] <= 1.0
    files = TDDFAAssets.from_dir(v2)
    a = _barycentric_matrix(tri, z["tri_id"][on].astype(np.int64), z["bary"][on], len(load_bfm_uv(files.bfm_uv)))
    w_id = paf["w_filter"].reshape(-1, 3, 40)[on].astype(np.float64)
    return a, w_id, np.load(files.indices).astype(np.int64)


def fmt(x: np.ndarray) -> str:
    return f"{np.median(x):9.4g} {np.percentile(x, 95):9.4g} {np.max(x):9.4g}"


def timed(fn, repeats: int) -> tuple[object, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def picture(model, path: Path, alpha_id: np.ndarray, alpha_exp: np.ndarray, size: int = 400) -> None:
    """Debug picture, rows frontal / 40 deg yaw; columns: mean, id + exp deformation, exp only (x2).

    Every 2nd vertex, far to near; deformed faces are coloured by displacement from the mean (jet, blue 0 to red
    at the 99th percentile), so a spike or a seam at the forehead / neck shows up as a colour jump.
    """
    import cv2

    from common.geometry import make_pose, project_to_image

    zi, ze = np.zeros(40), np.zeros(10)
    shapes = model.shape(np.stack([zi, alpha_id, zi]), np.stack([ze, alpha_exp, 2 * alpha_exp])).astype(np.float64)
    canvas = np.full((2 * size, 3 * size, 3), 255, np.uint8)
    ext = float(np.ptp(model.mean_shape, 0).max())
    for row, yaw in enumerate((0.0, np.radians(40))):
        for col, v in enumerate(shapes):
            disp = np.linalg.norm(v - model.mean_shape, axis=1)
            level = np.clip(255 * disp / max(np.percentile(disp, 99), 1e-9), 0, 255).astype(np.uint8)
            colour = cv2.applyColorMap(level[:, None], cv2.COLORMAP_JET)[:, 0] if col else np.zeros((len(v), 3))
            centre = [[size / 2 + col * size, size / 2 + (1 - row) * size, 0]]
            pose = make_pose(0.85 * size / ext, yaw, 0.0, 0.0, centre)
            pix = project_to_image(v[None], pose, 2 * size)[0]
            for i in np.argsort(pix[:, 2])[::2]:
                cv2.circle(canvas, (int(pix[i, 0]), int(pix[i, 1])), 1, tuple(int(c) for c in colour[i]), -1)
    cv2.imwrite(str(path), canvas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get(
        "UVTEX_SHARED_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets")))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="parameter draws")
    ap.add_argument("--picture", type=Path, default=None, help="write a debug picture of mean + deformed face")
    args = ap.parse_args()
    v1, v2 = args.assets / "3ddfa_v1", args.assets / "3ddfa_v2"

    anchored, t_dense = timed(lambda: load_tddfa_dense_public(v1, v2), args.repeats)
    held = load_tddfa_dense_public(v1, v2, params=DenseLiftParams(landmark_anchors=False))
    _, t_mean = timed(lambda: load_bfm_mean_mesh(v1, v2), args.repeats)
    print(f"build time (s), {args.repeats} runs      min    median")
    print(f"  load_tddfa_dense_public      {min(t_dense):6.2f} {np.median(t_dense):6.2f}")
    print(f"  load_bfm_mean_mesh (no bases) {min(t_mean):6.2f} {np.median(t_mean):6.2f}   "
          f"ratio {np.median(t_dense) / np.median(t_mean):.2f}")

    u_base, w_id, w_exp = exact_landmark_bases(v1)
    kp = anchored.keypoints
    iod = float(np.linalg.norm(u_base[45] - u_base[36]))
    a_id, a_exp = draw_alphas(v2, args.n)
    print(f"\nmean at landmarks vs u_base.txt: max |diff| {np.abs(anchored.mean_shape[kp] - u_base).max():.3g} units; "
          f"inter-ocular distance {iod:.0f} units; {args.n} parameter draws")
    uv_lm = anchored.uv[kp].astype(np.float64)
    loo = exp_leave_one_out(uv_lm, w_exp)
    print(f"\n{'landmarks (68)':38s} {'median':>9s} {'p95':>9s} {'max':>9s}")
    rows = [("held-out", held.id_basis[kp] - w_id, loo), ("anchored", anchored.id_basis[kp] - w_id,
                                                             anchored.exp_basis[kp] - w_exp)]
    for name, d_id, d_exp in rows:
        print(f"  {name} id  rel. basis error / col   {fmt(relative_basis_error(w_id + d_id, w_id))}")
        print(f"  {name} exp rel. basis error / col   {fmt(relative_basis_error(w_exp + d_exp, w_exp))}")
        for what, err in (("id", displacement_error(d_id, a_id)), ("exp", displacement_error(d_exp, a_exp)),
                          ("id+exp", displacement_error(np.concatenate([d_id, d_exp], 2), np.concatenate(
                              [a_id, a_exp], 1)))):
            print(f"  {name} {what:6s} displacement (units) {fmt(err)}")
            print(f"  {name} {what:6s} displacement (% IOD) {fmt(100 * err / iod)}")

    a, paf_id, noneck = paf_data(v1, v2)
    inside = np.asarray(np.abs(a[:, noneck]).sum(1)).ravel() > 1 - 1e-6  # PAF points in noneck triangles
    a = a[inside][:, noneck]
    print(f"\nPAF points (the {int(inside.sum())} in noneck triangles) {'median':>9s} {'p95':>9s} {'max':>9s}")
    for name, m in (("held-out", held), ("anchored", anchored)):
        rec = (a @ m.id_basis.reshape(m.n_vertices, -1)).reshape(-1, 3, 40)
        print(f"  {name} id rel. residual / col     {fmt(relative_basis_error(rec, paf_id[inside]))}")
        err = displacement_error(rec - paf_id[inside], a_id)
        print(f"  {name} id displacement (% IOD)    {fmt(100 * err / iod)}")

    if args.picture is not None:
        picture(anchored, args.picture, a_id[0], a_exp[0])
        print(f"\npicture: {args.picture}")


if __name__ == "__main__":
    main()
