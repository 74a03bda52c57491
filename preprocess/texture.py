"""Linear texture model in UV space: the ridge fit of Eq. 8 and a basis learned from incomplete UV maps.

Everything here works on UV images (texel level), so a per-vertex basis (BFM, Deep3D, procedural)
and a basis learned from data (masked PCA over UV_gt) are used the same way:

* :class:`common.texbasis.UVTextureBasis` (shared with the trainer, re-exported here) holds ``mean``
  (U, U, 3) and ``basis`` (U, U, 3, K) float32 plus the ``valid`` (U, U) texels the layout covers.
  ``UV_bfm = mean + basis @ c``.
* :func:`ridge_texture_fit` is Eq. 8: the closed-form ridge regression of the coefficients on
  the observed texels of UV_gt.
* :func:`learn_masked_pca` learns ``mean`` and ``basis`` from many incomplete UV_gt maps
  (EM-PCA with missing data, optionally adding each map's mirror image as extra evidence).

Pure functions: arrays in, arrays out, no I/O, except :meth:`UVTextureBasis.save` / ``load``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.texbasis import UVTextureBasis  # re-exported: preprocess.texture.UVTextureBasis stays valid
from preprocess.config import MaskedPCAConfig


def basis_from_model_file(kind: str, path: str | Path, uv_size: int, v1_dir: str | Path, v2_dir: str | Path,
                          n_tex: int | None = None, deep3d_front_idx: str | Path | None = None) -> UVTextureBasis:
    """The texture basis of a licensed face-model file, rasterised into the BFM UV layout of ``bfm-public``.

    kind: ``bfm2009`` (``01_MorphableModel.mat``, mapped onto the 3DDFA noneck vertex set) or ``deep3d``
    (``BFM_model_front.mat``; its UVs come from ``BFM_UV.mat`` through ``deep3d_front_idx``, Deep3D's
    ``BFM_front_idx.mat``). v1_dir / v2_dir: the 3DDFA / 3DDFA_V2 folders. Save the result with
    :meth:`UVTextureBasis.save` and pass it to ``uvprep build --texture-model PATH``.
    """
    from common import loaders
    from common.faces.assets import TDDFAAssets

    if kind == "bfm2009":
        model = loaders.load_bfm2009(path, loaders.BFMLayout.from_dirs(v1_dir, v2_dir), n_tex=n_tex)
    elif kind == "deep3d":
        if deep3d_front_idx is None:
            raise ValueError("deep3d: pass Deep3DFaceRecon's BFM_front_idx.mat (its vertex ids into the BFM) so "
                             "that the model's vertices get BFM_UV coordinates")
        uv = loaders.deep3d_uv_from_layout(TDDFAAssets.from_dir(v2_dir).bfm_uv, deep3d_front_idx)
        model = loaders.load_deep3d(path, uv=uv)
    else:
        raise ValueError(f"unknown texture model file kind {kind!r}; expected 'bfm2009' or 'deep3d'")
    basis = UVTextureBasis.from_face_model(model, uv_size)
    if n_tex is not None and basis.n_components > n_tex:
        basis = UVTextureBasis(basis.mean, basis.basis[..., :n_tex].copy(), basis.valid, basis.name)
    return basis


def match_greyscale(uv_bfm: np.ndarray, uv_gt: np.ndarray, mask: np.ndarray, tol: float = 2.0 / 255) -> np.ndarray:
    """Keep a greyscale photo's model part grey: where a photo's observed texels have no colour (mean channel
    spread <= ``tol``), its UV_bfm (coloured by the basis learned from colour photos) becomes its luminance.

    uv_bfm: (B, U, U, 3) float in [0, 1]; uv_gt: (B, U, U, 3) float in [0, 1] or uint8; mask: (B, U, U) bool.
    Returns (B, U, U, 3) float32 (colour photos unchanged).
    """
    gt = _as_unit_float(uv_gt)
    r, g, b = gt[..., 0], gt[..., 1], gt[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # (B, U, U); max(-1) is ~5x slower
    n = mask.sum((1, 2))
    grey = (n > 0) & ((spread * mask).sum((1, 2)) / np.maximum(n, 1) <= tol)
    out = np.asarray(uv_bfm, np.float32).copy()
    if grey.any():
        lum = out[grey] @ np.array([0.299, 0.587, 0.114], np.float32)
        out[grey] = lum[..., None]
    return out


def ridge_texture_fit(uv_gt: np.ndarray, mask: np.ndarray, basis: UVTextureBasis, lam: float = 1.0,
                      n_components: int | None = None) -> np.ndarray:
    """Eq. 8: texture coefficients by ridge regression on the observed texels, in closed form.

    ``c* = argmin_c || M (mean + B c - UV_gt) ||^2 + lam ||c||^2 = (B^T M B + lam I)^-1 B^T M (UV_gt - mean)``

    uv_gt: (B, U, U, 3) float in [0, 1] (or uint8, scaled by 1/255); mask: (B, U, U) bool observed texels;
    lam: ridge weight (in units of squared texel error summed over observed texels; larger = closer to
    the mean). Returns (B, K) float32. A sample with no observed texel gets zeros (the mean texture).
    """
    uv_gt = _as_unit_float(uv_gt)
    if uv_gt.ndim != 4 or uv_gt.shape[1:] != basis.mean.shape:
        raise ValueError(f"uv_gt: expected (B, {basis.size}, {basis.size}, 3), found {uv_gt.shape}")
    if mask.shape != uv_gt.shape[:3]:
        raise ValueError(f"mask: expected {uv_gt.shape[:3]}, found {mask.shape}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, found {lam}")
    k = basis.n_components if n_components is None else n_components
    b = basis.basis[..., :k].reshape(-1, 3, k)  # (T, 3, K)
    valid = basis.valid.reshape(-1)
    out = np.zeros((uv_gt.shape[0], k), np.float32)
    for i in range(uv_gt.shape[0]):
        sel = mask[i].reshape(-1) & valid
        if not sel.any():
            continue
        a = b[sel].reshape(-1, k).astype(np.float64)  # (3 T_obs, K)
        r = (uv_gt[i].reshape(-1, 3)[sel] - basis.mean.reshape(-1, 3)[sel]).reshape(-1).astype(np.float64)
        gram = a.T @ a + lam * np.eye(k)
        try:
            out[i] = np.linalg.solve(gram, a.T @ r)
        except np.linalg.LinAlgError:  # lam = 0 and too few texels to pin every component
            out[i] = np.linalg.lstsq(gram, a.T @ r, rcond=None)[0]
    return out


def learn_masked_pca(uv_maps: np.ndarray, masks: np.ndarray, valid: np.ndarray,
                     config: MaskedPCAConfig = MaskedPCAConfig(), mirror_index: np.ndarray | None = None,
                     name: str = "pca", out_valid: np.ndarray | None = None) -> UVTextureBasis:
    """Learn a linear UV texture basis from incomplete maps by EM-PCA with missing data.

    uv_maps: (N, U, U, 3) in [0, 1] (float or uint8); masks: (N, U, U) bool observed texels; valid: (U, U)
    bool layout coverage; mirror_index: optional (U*U,) int64 texel -> mirror texel (-1 none), default a
    column flip. Missing entries start at the per-texel observed mean and are re-imputed from the
    rank-K reconstruction each iteration. Returns a basis at the input resolution (or at the resolution
    of ``out_valid`` (U', U') bool, the layout coverage there, when the maps were downsampled beforehand),
    components scaled so that coefficients are ~N(0, 1) over the training maps.
    """
    import cv2

    uv_maps = _as_unit_float(uv_maps)
    n, u = uv_maps.shape[0], uv_maps.shape[1]
    if masks.shape != (n, u, u):
        raise ValueError(f"masks: expected {(n, u, u)}, found {masks.shape}")
    if config.symmetric:
        uv_maps, masks = _add_mirrors(uv_maps, masks, mirror_index)
    fs = u if config.fit_size is None else min(config.fit_size, u)
    x, m = downsample_maps(uv_maps, masks, fs)  # (N, fs*fs*3), (N, fs*fs*3)
    vd = cv2.resize(valid.astype(np.float32), (fs, fs), interpolation=cv2.INTER_AREA) > 0.5
    known = vd & (m.reshape(-1, fs, fs, 3)[..., 0].mean(0) >= config.min_observed)
    if not known.any():
        raise ValueError("no texel is observed in enough maps to learn a texture basis; "
                         "check the masks or lower MaskedPCAConfig.min_observed")
    keep = np.repeat(known.reshape(-1), 3)
    x, m = x[:, keep], m[:, keep]
    k = min(config.n_components, x.shape[0] - 1, x.shape[1])
    count = m.sum(0)
    mean = np.where(count > 0, (x * m).sum(0) / np.maximum(count, 1), 0.5)
    filled = np.where(m, x, mean)
    rng = np.random.default_rng(config.seed)
    for _ in range(config.iterations):
        mean = filled.mean(0)
        comps, scores = _top_components(filled - mean, k, rng)
        recon = mean + scores @ comps
        filled = np.where(m, x, recon)
    mean = filled.mean(0)
    comps, scores = _top_components(filled - mean, k, rng)
    std = scores.std(0) + 1e-12
    comps = comps * std[:, None]  # coefficient ~ N(0, 1)
    full_mean = np.zeros((fs * fs * 3,), np.float32)
    full_comps = np.zeros((k, fs * fs * 3), np.float32)
    full_mean[keep], full_comps[:, keep] = mean, comps
    stacked = np.concatenate([full_mean.reshape(fs, fs, 3), full_comps.reshape(k, fs, fs, 3).transpose(1, 2, 0, 3)
                              .reshape(fs, fs, 3 * k)], 2)
    # Extend past the layout over the whole grid, not just over ``vd``: the bilinear upsampling below reads the
    # neighbours of every output texel, and at the layout's rim those lie outside ``vd``. Left at zero they
    # darkened every rim texel whose low-resolution cell fell outside ``vd``: a dashed dark band along the edge.
    stacked = extend_smoothly(stacked, known, np.ones_like(vd))
    if out_valid is not None:
        u, valid = out_valid.shape[0], out_valid
    mean_img = _upsample(stacked[None, :, :, :3], u)[0]
    basis_img = _upsample(stacked[:, :, 3:].reshape(fs, fs, k, 3).transpose(2, 0, 1, 3), u).transpose(1, 2, 3, 0)
    return UVTextureBasis(mean=mean_img, basis=np.ascontiguousarray(basis_img), valid=valid.copy(), name=name)


def extend_smoothly(img: np.ndarray, known: np.ndarray, valid: np.ndarray, max_rings: int = 4096,
                    fast: bool = False) -> np.ndarray:
    """Fill ``valid & ~known`` texels of img (H, W, C) ring by ring with the mean of their known 3x3 neighbours.

    known, valid: (H, W) bool. Texels outside ``valid`` are left as they are. Vectorised per ring. fast: the
    neighbourhood sums by OpenCV (~5x quicker than scipy's uniform_filter; the same values up to float32 rounding,
    not bit for bit, so the learned texture bases keep scipy's).
    """
    from scipy.ndimage import uniform_filter

    out = np.where(known[..., None], img, 0.0).astype(np.float32)
    have = known.copy()
    for _ in range(max_rings):
        todo = valid & ~have
        if not todo.any():
            break
        w = have.astype(np.float32)
        if fast:  # out is 0 wherever it is not known yet: its box sum is the known texels' sum
            num, den = _box_sum3(out), _box_sum3(w)
        else:
            num = uniform_filter(out * w[..., None], size=(3, 3, 1), mode="constant")
            den = uniform_filter(w, size=3, mode="constant")
        grow = todo & (den > 0)
        if not grow.any():  # a valid island with no known texel: fall back to the global mean
            out[todo] = out[have].mean(0) if have.any() else 0.0
            break
        out[grow] = num[grow] / den[grow][:, None]
        have |= grow
    return out


def _box_sum3(x: np.ndarray) -> np.ndarray:
    """Sum over each texel's 3x3 neighbourhood (0 beyond the border) of an (H, W) or (H, W, C) float32 image."""
    import cv2

    if x.ndim == 3 and x.shape[2] > 128:  # OpenCV's channel limit: a basis stack holds 3 (K + 1) channels
        return np.concatenate([_box_sum3(x[..., i:i + 128]) for i in range(0, x.shape[2], 128)], 2)
    y = cv2.boxFilter(x, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return y[..., None] if x.ndim == 3 and y.ndim == 2 else y  # OpenCV drops a single channel


def _as_unit_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.asarray(a, np.float32)


def _add_mirrors(uv, masks, mirror_index):
    n, u = uv.shape[:2]
    if mirror_index is None:
        return np.concatenate([uv, uv[:, :, ::-1]]), np.concatenate([masks, masks[:, :, ::-1]])
    src = np.asarray(mirror_index).reshape(-1)
    ok = src >= 0
    flat, mflat = uv.reshape(n, -1, 3), masks.reshape(n, -1)
    muv = np.zeros_like(flat)
    mm = np.zeros_like(mflat)
    muv[:, ok], mm[:, ok] = flat[:, src[ok]], mflat[:, src[ok]]
    return np.concatenate([uv, muv.reshape(uv.shape)]), np.concatenate([masks, mm.reshape(masks.shape)])


def downsample_maps(uv: np.ndarray, masks: np.ndarray, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask-aware area downsampling of UV maps (N, U, U, 3) in [0, 1] with masks (N, U, U) bool.

    Returns values (N, fs*fs*3) float32 (mean of the observed texels under each new texel) and observed
    flags (N, fs*fs*3) bool (at least half of the texels under it observed).
    """
    import cv2

    n, u = uv.shape[:2]
    if fs == u:
        return uv.reshape(n, -1), np.repeat(masks.reshape(n, -1), 3, axis=1)
    xs, ms = [], []
    for i in range(n):
        w = masks[i].astype(np.float32)
        num = cv2.resize(uv[i] * w[..., None], (fs, fs), interpolation=cv2.INTER_AREA)
        den = cv2.resize(w, (fs, fs), interpolation=cv2.INTER_AREA)
        xs.append((num / np.maximum(den, 1e-6)[..., None]).reshape(-1))
        ms.append(np.repeat((den >= 0.5).reshape(-1), 3))
    return np.stack(xs), np.stack(ms)


def _upsample(imgs, u):
    import cv2

    return np.stack([cv2.resize(im, (u, u), interpolation=cv2.INTER_LINEAR) for im in imgs]).astype(np.float32)


def _top_components(centred, k, rng):
    """Top-k principal directions (k, D) and scores (N, k) of a centred (N, D) matrix."""
    if min(centred.shape) <= 4 * k:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
    else:  # randomised range finder with two power iterations
        q = centred @ rng.standard_normal((centred.shape[1], k + 10))
        for _ in range(2):
            q, _ = np.linalg.qr(centred @ (centred.T @ q))
        _, s, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
    comps = vt[:k]
    return comps, centred @ comps.T
