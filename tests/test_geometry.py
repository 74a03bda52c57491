"""The 62-parameter convention, Euler angles and projection."""

import numpy as np
import pytest
import torch

from common.geometry import (
    compose_params,
    euler_to_matrix,
    make_pose,
    matrix_to_euler,
    params_to_euler,
    pose_to_srt,
    project_to_image,
    split_params,
)


def test_euler_round_trip():
    rng = np.random.default_rng(0)
    yaw = rng.uniform(-1.4, 1.4, 200)
    pitch = rng.uniform(-0.6, 0.6, 200)
    roll = rng.uniform(-0.5, 0.5, 200)
    rot = euler_to_matrix(yaw, pitch, roll)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    y2, p2, r2 = matrix_to_euler(rot)
    np.testing.assert_allclose(np.stack([y2, p2, r2]), np.stack([yaw, pitch, roll]), atol=1e-9)


def test_yaw_sign_convention():
    # Positive yaw brings the face's left cheek (+x) towards the camera (+z) and moves the nose to image-left.
    rot = euler_to_matrix([0.5], [0.0], [0.0])[0]
    assert (rot @ [1.0, 0, 0])[2] > 0
    nose = project_to_image(np.array([[[0.0, 0.0, 1.0]]], np.float32), make_pose(1.0, 0.5, 0, 0, [[0, 0, 0]]), 10)
    assert nose[0, 0, 0] < 0
    # Positive pitch brings the forehead (0, 1, 0) towards the camera: the face looks down.
    rot = euler_to_matrix([0.0], [0.3], [0.0])[0]
    assert (rot @ [0, 1.0, 0.0])[2] > 0.2


def test_gimbal_lock_is_finite():
    rot = euler_to_matrix([np.pi / 2], [0.2], [0.0])
    yaw, pitch, roll = matrix_to_euler(rot)
    assert np.isfinite([yaw, pitch, roll]).all()
    np.testing.assert_allclose(yaw, np.pi / 2, atol=1e-6)
    # The composed rotation must be reproduced even if the split between pitch and roll changes.
    np.testing.assert_allclose(euler_to_matrix(yaw, pitch, roll), rot, atol=1e-3)


def test_params_split_compose_and_srt():
    rng = np.random.default_rng(1)
    pose = make_pose([2.5, 0.7], [0.3, -1.0], [0.1, 0.2], [0.0, -0.1], [[1, 2, 3], [4, 5, 6]])
    a_id, a_exp = rng.normal(size=(2, 40)).astype(np.float32), rng.normal(size=(2, 10)).astype(np.float32)
    p = compose_params(pose, a_id, a_exp)
    assert p.shape == (2, 62)
    pose2, id2, exp2 = split_params(p)
    np.testing.assert_array_equal(pose2, pose)
    np.testing.assert_array_equal(id2, a_id)
    np.testing.assert_array_equal(exp2, a_exp)
    s, rot, t = pose_to_srt(pose)
    np.testing.assert_allclose(s, [2.5, 0.7], rtol=1e-6)
    np.testing.assert_allclose(t, [[1, 2, 3], [4, 5, 6]], atol=1e-6)
    np.testing.assert_allclose(params_to_euler(p), np.degrees([[0.3, 0.1, 0.0], [-1.0, 0.2, -0.1]]), atol=1e-4)
    with pytest.raises(ValueError, match="62 parameters"):
        split_params(np.zeros((1, 61)))


def test_projection_pixel_convention_and_torch_matches_numpy():
    # Identity pose in a frame of side 8: model (x, y) -> pixel (x, 8 - y), depth unchanged.
    v = np.array([[[1.0, 1.0, 0.5], [4.0, 7.0, -2.0]]], np.float32)
    pose = make_pose(1.0, 0, 0, 0, [[0, 0, 0]])
    out = project_to_image(v, pose, 8)
    np.testing.assert_allclose(out[0], [[1, 7, 0.5], [4, 1, -2]], atol=1e-6)
    vt = torch.tensor(v, requires_grad=True)
    out_t = project_to_image(vt, pose, 8)
    np.testing.assert_allclose(out_t.detach().numpy(), out, atol=1e-6)
    out_t.sum().backward()
    assert vt.grad is not None and torch.isfinite(vt.grad).all()
