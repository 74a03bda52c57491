"""Camera and pose geometry: the 62-parameter convention of 3DDFA(_V2) and Euler angles.

The 62-vector is ``[P (12, the 3x4 matrix [sR | t] row-major), alpha_id (40), alpha_exp (10)]``.
``P`` maps model space to a y-up *frame* of side ``S`` pixels by scaled orthographic projection:
``X = s R V + t``. Image pixel coordinates (x right, y down, pixel ``j`` covers ``[j, j + 1)``,
so its centre is ``j + 0.5``) are ``x = X_x``, ``y = S - X_y``; depth ``z = X_z`` grows towards
the camera. For the synthetic world the frame is the whole image; for 3DDFA_V2 fits the frame
is the 120x120 crop, mapped back to the photo by the ROI box (see ``common.faces.fit``).

Euler angles follow 3DDFA_V2's ``matrix2angle``: ``yaw = asin(R[2, 0])``,
``pitch = atan2(R[2, 1], R[2, 2])``, ``roll = atan2(R[1, 0], R[0, 0])``, i.e.
``R = Rz(roll) @ Ry(-yaw) @ Rx(pitch)``. Positive yaw turns the face's left cheek (model +x)
towards the camera, so the face looks towards the image's left; positive pitch brings the
forehead towards the camera (the face looks down).
"""

from __future__ import annotations

import numpy as np
import torch

N_POSE, N_ID, N_EXP = 12, 40, 10
N_PARAMS = N_POSE + N_ID + N_EXP


def split_params(params):
    """(B, 62) -> pose (B, 3, 4), alpha_id (B, 40), alpha_exp (B, 10). numpy or torch."""
    if params.shape[-1] != N_PARAMS:
        raise ValueError(f"expected 62 parameters (12 pose + 40 id + 10 exp), found {params.shape[-1]}")
    pose = params[..., :N_POSE].reshape(*params.shape[:-1], 3, 4)
    return pose, params[..., N_POSE:N_POSE + N_ID], params[..., N_POSE + N_ID:]


def compose_params(pose, alpha_id, alpha_exp):
    """Inverse of :func:`split_params`: pose (B, 3, 4), alpha_id (B, <=40), alpha_exp (B, <=10) -> (B, 62)."""
    b = pose.shape[0]
    if isinstance(pose, torch.Tensor):
        out = pose.new_zeros(b, N_PARAMS)
    else:
        out = np.zeros((b, N_PARAMS), np.float32)
    out[:, :N_POSE] = pose.reshape(b, N_POSE)
    out[:, N_POSE:N_POSE + alpha_id.shape[1]] = alpha_id
    out[:, N_POSE + N_ID:N_POSE + N_ID + alpha_exp.shape[1]] = alpha_exp
    return out


def euler_to_matrix(yaw, pitch, roll) -> np.ndarray:
    """Angles in radians, each (B,) -> rotation matrices (B, 3, 3): ``Rz(roll) Ry(-yaw) Rx(pitch)``."""
    yaw, pitch, roll = (np.atleast_1d(np.asarray(a, np.float64)) for a in (yaw, pitch, roll))
    cy, sy = np.cos(-yaw), np.sin(-yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def pose_to_srt(pose: np.ndarray):
    """Decompose scaled poses (B, 3, 4) into scale (B,), rotation (B, 3, 3), translation (B, 3).

    As 3DDFA_V2's ``P2sRt``: the scale is the mean norm of the first two rows, the rotation is
    the two normalised rows completed by their cross product (then re-orthonormalised).
    """
    pose = np.asarray(pose, np.float64)
    r1, r2 = pose[:, 0, :3], pose[:, 1, :3]
    n1, n2 = np.linalg.norm(r1, axis=1), np.linalg.norm(r2, axis=1)
    s = (n1 + n2) / 2
    r1, r2 = r1 / n1[:, None], r2 / n2[:, None]
    r3 = np.cross(r1, r2)
    u, _, vt = np.linalg.svd(np.stack([r1, r2, r3], 1))
    return s, u @ vt, pose[:, :, 3]


def matrix_to_euler(rot: np.ndarray):
    """Rotation matrices (B, 3, 3) -> (yaw, pitch, roll) in radians, each (B,), as 3DDFA_V2's matrix2angle.

    At gimbal lock (|R[2, 0]| > 0.998) roll is set to 0 and pitch absorbs it.
    """
    rot = np.asarray(rot, np.float64)
    r20 = np.clip(rot[:, 2, 0], -1.0, 1.0)
    yaw = np.arcsin(r20)
    pitch = np.arctan2(rot[:, 2, 1], rot[:, 2, 2])
    roll = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    lock = np.abs(r20) > 0.998
    if lock.any():
        sgn = np.sign(r20[lock])
        roll[lock] = 0.0
        pitch[lock] = np.arctan2(-sgn * rot[lock, 0, 1], -sgn * rot[lock, 0, 2])
    return yaw, pitch, roll


def params_to_euler(params: np.ndarray) -> np.ndarray:
    """(B, 62) -> (B, 3) (yaw, pitch, roll) in degrees."""
    pose, _, _ = split_params(np.asarray(params, np.float64))
    _, rot, _ = pose_to_srt(pose)
    return np.degrees(np.stack(matrix_to_euler(rot), 1))


def make_pose(scale, yaw, pitch, roll, translation) -> np.ndarray:
    """Scaled pose matrices (B, 3, 4) = [s R(yaw, pitch, roll) | t]; angles in radians, t (B, 3)."""
    rot = euler_to_matrix(yaw, pitch, roll)
    scale = np.atleast_1d(np.asarray(scale, np.float64))
    t = np.asarray(translation, np.float64).reshape(-1, 3)
    return np.concatenate([scale[:, None, None] * rot, t[:, :, None]], 2).astype(np.float32)


def project_to_image(vertices, pose, frame_size: float):
    """Scaled-orthographic projection of model-space vertices to image pixels.

    vertices: (B, V, 3); pose: (B, 3, 4) [sR | t]; frame_size: S (the y-up frame's side).
    Returns (B, V, 3): x right and y down in pixels (pixel j covers [j, j+1)), z = depth,
    larger is nearer the camera. numpy or torch (differentiable).
    """
    if isinstance(vertices, torch.Tensor):
        pose = torch.as_tensor(pose, dtype=vertices.dtype, device=vertices.device)
        x = torch.einsum("bij,bvj->bvi", pose[:, :, :3], vertices) + pose[:, None, :, 3]
        return torch.stack([x[..., 0], frame_size - x[..., 1], x[..., 2]], -1)
    pose = np.asarray(pose)
    x = np.einsum("bij,bvj->bvi", pose[:, :, :3], vertices) + pose[:, None, :, 3]
    return np.stack([x[..., 0], frame_size - x[..., 1], x[..., 2]], -1).astype(vertices.dtype, copy=False)


def vertex_normals(vertices, triangles):
    """Area-weighted unit vertex normals. vertices (B, V, 3) torch, triangles (F, 3) long -> (B, V, 3).

    Uses the outward winding convention of :mod:`common.facemodel`; in image space (y down)
    call it on y-up coordinates or flip the result's y.
    """
    v0, v1, v2 = (vertices[:, triangles[:, k]] for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    vn = torch.zeros_like(vertices)
    for k in range(3):
        vn.index_add_(1, triangles[:, k], fn)
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-12)
