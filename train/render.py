"""Rendering for the trainer: rasterise once per sample and pose, then render any UV map by one ``grid_sample``.

The stored pose of a sample never changes during training, and the random pose of I1 is drawn once per sample
visit, so the non-differentiable part of rendering (the z-buffered rasterisation) is done once per batch, in the
data loader's workers or batched on the training device (:func:`train.data.add_renders`), and never per loss
term. What reaches the losses is a per-pixel **UV lookup**: for every
image pixel covered by the face mesh, the UV coordinate of the surface point it sees, in ``grid_sample``'s
normalised convention. Rendering a texture is then Eq. 3 (barycentric interpolation of the UV coordinate, done
once here) followed by a bilinear texture read, and its gradient w.r.t. the texture is Eq. 4
(:func:`render_lookup`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.facemodel import FaceModel
from common.geometry import euler_to_matrix, matrix_to_euler, pose_to_srt, project_to_image, split_params
from common.render import interpolate, rasterize
from common.uvtools import model_uv_fragments

__all__ = ["PosedMesh", "render_lookup", "rotated_params"]


class PosedMesh:
    """The face model's geometry as tensors on one device: fitted 62-parameter faces -> pixels -> UV lookups.

    Used in the loader's workers (CPU) or, with ``uvtrain fit --render-on device``, in the training step on the GPU.
    """

    def __init__(self, model: FaceModel, device: torch.device | str = "cpu") -> None:
        dev = torch.device(device)
        f32 = torch.float32
        self.model = model
        self.mean = torch.as_tensor(model.mean_shape, dtype=f32, device=dev)
        self.id_basis = torch.as_tensor(model.id_basis, dtype=f32, device=dev)
        self.exp_basis = torch.as_tensor(model.exp_basis, dtype=f32, device=dev)
        self.triangles = torch.as_tensor(np.ascontiguousarray(model.triangles), dtype=torch.int64, device=dev)
        self.uv = torch.as_tensor(model.uv, dtype=f32, device=dev)
        self.keypoints = (None if model.keypoints is None
                          else torch.as_tensor(model.keypoints, dtype=torch.int64, device=dev))
        self._uv_frags: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def verts(self, params: torch.Tensor, frame_size: int, out_size: int) -> torch.Tensor:
        """params (B, 62) in a frame of side ``frame_size`` -> (B, V, 3) pixel coordinates of an ``out_size`` image."""
        if params.ndim != 2 or params.shape[1] != 62:
            raise ValueError(f"params: expected (B, 62), found {tuple(params.shape)}")
        p = params.to(self.mean.device, torch.float32)
        pose, a_id, a_exp = split_params(p)
        k_id, k_exp = min(a_id.shape[1], self.id_basis.shape[2]), min(a_exp.shape[1], self.exp_basis.shape[2])
        shape = (self.mean + torch.einsum("vck,bk->bvc", self.id_basis[:, :, :k_id], a_id[:, :k_id])
                 + torch.einsum("vck,bk->bvc", self.exp_basis[:, :, :k_exp], a_exp[:, :k_exp]))
        return project_to_image(shape, pose, float(frame_size)) * (out_size / frame_size)

    def landmarks(self, verts_px: torch.Tensor) -> torch.Tensor | None:
        """The 68 iBUG landmarks of posed meshes, (B, 68, 2) pixels with pixel centres at integers (the convention
        of :func:`common.identity.align.face_chip`), or None when the face model has no ``keypoints``.

        verts_px: (B, V, 3) from :meth:`verts` (pixel j covers [j, j + 1)).
        """
        if self.keypoints is None:
            return None
        return verts_px[:, self.keypoints, :2] - 0.5

    def texel_grid(self, verts_px: torch.Tensor, uv_size: int, image_size: int) -> torch.Tensor:
        """Where each texel's surface point projects in the image, in ``grid_sample`` coordinates.

        verts_px: (B, V, 3) in an image of side ``image_size``. Returns (B, U, U, 2) float32 (x, y in [-1, 1]
        inside the image) for a ``uv_size`` UV map, NaN on texels outside the layout. Averaged over samples it is
        the UV sampler's template grid; per sample, the target of :func:`train.losses.grid_loss`. The UV layout's
        rasterisation is computed once per size.
        """
        if uv_size not in self._uv_frags:
            frags = model_uv_fragments(self.model, uv_size)
            self._uv_frags[uv_size] = (frags.tri_id[0].to(self.uv.device), frags.bary[0].to(self.uv.device))
        tri_id, bary = self._uv_frags[uv_size]
        corners = verts_px[:, self.triangles[tri_id.clamp(min=0)], :2].to(torch.float64)  # (B, U, U, 3, 2)
        pos = (bary.to(torch.float64)[None, ..., None] * corners).sum(-2)  # (B, U, U, 2) pixels
        grid = (2.0 * pos / image_size - 1.0).to(torch.float32)
        return torch.where((tri_id >= 0)[None, ..., None], grid, torch.full_like(grid, float("nan")))

    def lookup(self, verts_px: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rasterise posed meshes and return the per-pixel UV lookup (Eq. 3's barycentric interpolation of UVs).

        verts_px: (B, V, 3) from :meth:`verts`. Returns grid (B, size, size, 2) float32 in ``grid_sample``'s
        convention (``x = 2u - 1``, ``y = 1 - 2v``; 0 on background) and cover (B, 1, size, size) float32 in
        {0, 1}. Back faces are culled, the nearest surface wins.
        """
        frags = rasterize(verts_px, self.triangles, (size, size), cull_backfaces=True)
        uv = interpolate(frags, self.uv)
        grid = torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], -1)
        cover = frags.mask.unsqueeze(1).to(torch.float32)
        return grid * cover.permute(0, 2, 3, 1), cover


def render_lookup(texture: torch.Tensor, grid: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Render UV textures through precomputed lookups: I = R(UV, S, P) (Eq. 6), differentiable per Eq. 4.

    texture: (B, C, U, U) float; grid: (B, H, W, 2) from :meth:`PosedMesh.lookup`; cover: (B, 1, H, W).
    Returns (B, C, H, W), 0 on background. The bilinear read distributes each pixel's gradient to the
    texels around its UV point with the interpolation weights, as Eq. 4 does for the vertex colours.
    """
    if texture.ndim != 4 or grid.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != texture.shape[0]:
        raise ValueError(f"render_lookup: expected texture (B, C, U, U) and grid (B, H, W, 2), found "
                         f"{tuple(texture.shape)} and {tuple(grid.shape)}")
    img = F.grid_sample(texture, grid.to(texture.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return img * cover.to(img.dtype)


def rotated_params(params: np.ndarray, yaw_deg: np.ndarray, frame_size: int, model: FaceModel) -> np.ndarray:
    """The same faces turned to new yaw angles (I1's pose and the rotate-and-render inputs; Section 4.1).

    params: (B, 62) in a frame of side ``frame_size``; yaw_deg: (B,) the new absolute yaw in degrees (pitch
    and roll are kept). The scale is kept and the translation is chosen so that the face's mean vertex
    projects where it did. Returns (B, 62) float32.
    """
    params = np.asarray(params, np.float64)
    pose, a_id, a_exp = split_params(params)
    s, rot, t = pose_to_srt(pose)
    _, pitch, roll = matrix_to_euler(rot)
    new_rot = euler_to_matrix(np.radians(np.asarray(yaw_deg, np.float64)), pitch, roll)
    k_id, k_exp = min(a_id.shape[1], model.n_id), min(a_exp.shape[1], model.n_exp)
    # the mean vertex (B, 3): the shape is linear in the coefficients, so average the bases once
    centre = (model.mean_shape.mean(0)[:, None].astype(np.float64)
              + model.id_basis[:, :, :k_id].mean(0).astype(np.float64) @ a_id[:, :k_id].T
              + model.exp_basis[:, :, :k_exp].mean(0).astype(np.float64) @ a_exp[:, :k_exp].T).T
    old_c = s[:, None] * np.einsum("bij,bj->bi", rot, centre) + t
    new_t = old_c - s[:, None] * np.einsum("bij,bj->bi", new_rot, centre)
    out = params.copy()
    out[:, :12] = np.concatenate([s[:, None, None] * new_rot, new_t[:, :, None]], 2).reshape(-1, 12)
    return out.astype(np.float32)
