"""Differentiable face-chip alignment in PyTorch, following dlib's ``get_face_chip_details`` + ``extract_image_chip``.

A chip of side ``size`` is cut out of the image by the least-squares similarity transform T (scale, rotation,
translation; Umeyama) that maps dlib's mean-face template (scaled by ``padding``) onto the face's landmarks.
Chip pixel (c, r) samples the image bilinearly at T(c + 1/2, r + 1/2). Landmarks are in pixels with pixel
centres at integer coordinates (dlib's and OpenCV's convention).

Two landmark sets are accepted:

- **5 points** in the order of dlib's ``shape_predictor_5_face_landmarks``: the corners of the eye on the image's
  right (outer, inner), of the eye on the image's left (outer, inner), and the bottom of the nose;
- **68 points** in the iBUG order (what the project's face fitters give): dlib then uses its 68-point mean face,
  without the brows and the lower lip (33 points).

Anti-aliasing: when T shrinks the image (scale s = image pixels per chip pixel >= 2), dlib samples from an image
pyramid level chosen so the face is still at least chip-sized; here level L = floor(log2 s) is a stack of L 2x2
average pools (dlib's ``pyramid_down<2>`` uses a slightly different filter). Measured on the real faces in
``../shared/assets`` against ``dlib.get_face_chip`` the chips differ by 0.7-2.5 / 255 mean absolute error;
see ``tests/test_identity.py`` for what that does to the descriptor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DLIB_5PT_TEMPLATE", "DLIB_68PT_TEMPLATE", "DLIB_68PT_USED", "chip_transform", "face_chip",
           "five_from_68", "similarity_transform"]

DLIB_5PT_TEMPLATE = torch.tensor([
    [0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677], [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242], [0.4901123135679, 0.6277975316475]], dtype=torch.float64)
"""dlib's mean positions of the 5 points in a unit square (``get_face_chip_details``)."""

_MEAN_X = (0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
           0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
           0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
           0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
           0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
           0.42689)
_MEAN_Y = (0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
           0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
           0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
           0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
           0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
           0.831803, 0.824182)
DLIB_68PT_USED = torch.tensor([i for i in range(17, 68) if not (55 <= i <= 59 or 65 <= i <= 67 or i <= 26)])
"""The iBUG points dlib aligns 68-point faces on: eyes, nose, upper lip (33 of 68)."""
DLIB_68PT_TEMPLATE = torch.tensor([[_MEAN_X[i - 17], _MEAN_Y[i - 17]] for i in DLIB_68PT_USED.tolist()],
                                  dtype=torch.float64)
"""dlib's mean positions of :data:`DLIB_68PT_USED` in a unit square."""

_FIVE_FROM_68 = (45, 42, 36, 39, 33)  # eye corners (image right: outer, inner; image left: outer, inner), nose


def five_from_68(points: Tensor) -> Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2) in the order of dlib's 5-point model (eye corners, nose base)."""
    return points[:, list(_FIVE_FROM_68)]


def similarity_transform(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity (Umeyama, no reflection) mapping src onto dst, batched and differentiable.

    src, dst: (B, N, 2) point sets, N >= 2. Returns (B, 2, 3) matrices A with dst ~ A[:, :, :2] @ p + A[:, :, 2].
    In 2D the similarity is a complex affine map z -> c z + t; the least-squares c is
    sum(conj(s_i - s_mean) (d_i - d_mean)) / sum |s_i - s_mean|^2, which is Umeyama's closed form.
    """
    if src.shape != dst.shape or src.ndim != 3 or src.shape[-1] != 2 or src.shape[1] < 2:
        raise ValueError(f"similarity_transform: expected two (B, N>=2, 2) point sets, found {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    s = src - src.mean(1, keepdim=True)
    d = dst - dst.mean(1, keepdim=True)
    den = (s * s).sum((1, 2)).clamp_min(1e-12)
    a = (s * d).sum((1, 2)) / den                                           # Re(c): scale * cos
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / den        # Im(c): scale * sin
    lin = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)   # (B, 2, 2)
    t = dst.mean(1) - (lin @ src.mean(1)[..., None])[..., 0]
    return torch.cat([lin, t[..., None]], -1)


def chip_transform(points: Tensor, size: int = 150, padding: float = 0.25) -> Tensor:
    """The (B, 2, 3) similarity mapping chip coordinates (pixel (c, r) centred at (c + 1/2, r + 1/2)) to image
    pixels, from (B, 5, 2) or (B, 68, 2) landmarks (see the module docstring for their order)."""
    if points.ndim != 3 or points.shape[-1] < 2 or points.shape[1] not in (5, 68):
        raise ValueError(f"points: expected (B, 5, 2) or (B, 68, 2) landmarks in pixels, found "
                         f"{tuple(points.shape)}")
    pts = points[..., :2].to(torch.float64)
    if points.shape[1] == 5:
        tmpl = DLIB_5PT_TEMPLATE.to(pts.device)
    else:
        tmpl, pts = DLIB_68PT_TEMPLATE.to(pts.device), pts[:, DLIB_68PT_USED.to(pts.device)]
    tmpl = (padding + tmpl) / (2 * padding + 1) * size
    return similarity_transform(tmpl.expand_as(pts), pts)


def face_chip(image: Tensor, points: Tensor, size: int = 150, padding: float = 0.25,
              antialias: bool = True) -> Tensor:
    """Aligned face chips, differentiable in the image and the landmarks.

    image: (B, C, H, W) float. points: (B, 5, 2) or (B, 68, 2) landmark pixels in ``image``.
    Returns (B, C, size, size); samples falling outside the image are zero (dlib fills black too).
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected (B, C, H, W), found {tuple(image.shape)}")
    if points.shape[0] != image.shape[0]:
        raise ValueError(f"points: {points.shape[0]} faces for {image.shape[0]} images")
    h, w = image.shape[-2:]
    A = chip_transform(points, size, padding)                              # (B, 2, 3) float64
    g = torch.arange(size, device=image.device, dtype=torch.float64) + 0.5
    cr = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)              # (S, S, 2) chip (x, y)
    xy = torch.einsum("bij,yxj->byxi", A[:, :, :2], cr) + A[:, None, None, :, 2]
    norm = torch.tensor([w, h], device=image.device, dtype=torch.float64)
    grid = (2.0 * (xy + 0.5) / norm - 1.0).to(image.dtype)                  # align_corners=False coordinates
    if not antialias:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    scale = torch.linalg.vector_norm(A[:, :, 0], dim=-1)                   # image pixels per chip pixel
    levels = torch.floor(torch.log2(scale.clamp_min(1.0))).long().tolist()
    out = image.new_zeros(image.shape[0], image.shape[1], size, size)
    pyramid = image
    for level in range(max(levels) + 1):
        if level > 0:
            pyramid = F.avg_pool2d(pyramid, 2, ceil_mode=False)
        idx = [i for i, lv in enumerate(levels) if lv == level]
        if idx:
            # A 2x2 pool of an odd side drops the last row/column: rescale so [-1, 1] still spans the input.
            ph, pw = pyramid.shape[-2:]
            fix = torch.tensor([w / (pw * 2 ** level), h / (ph * 2 ** level)], device=image.device,
                               dtype=image.dtype)
            gi = (grid[idx] + 1.0) * fix - 1.0
            out = out.index_copy(0, torch.tensor(idx, device=image.device),
                                 F.grid_sample(pyramid[idx], gi, mode="bilinear", padding_mode="zeros",
                                               align_corners=False))
    return out
