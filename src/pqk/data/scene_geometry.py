"""Camera geometry on numpy arrays, in the conventions of `pqk.data.scenes`: world
points into a camera, depth maps back to points, camera points onto pixels. Used by the
scene generator, the loaders and evaluation alike."""

from __future__ import annotations

import numpy as np

from pqk.errors import InputError

_EPS = 1e-4  # minimum ray parameter, keeps hits strictly in front of the camera


def _float_type(array: np.ndarray) -> np.dtype:
    """float32 stays float32, everything else computes and returns float64."""
    return np.result_type(array.dtype, np.float32)


def points_in_camera(pts_world: np.ndarray, cam2world: np.ndarray) -> np.ndarray:
    """World points (..., 3) -> coordinates in the camera whose pose is ``cam2world``."""
    pose = np.asarray(cam2world, dtype=np.float64)
    pts = np.asarray(pts_world)
    # Row vectors: R^T (p - t) is (p - t) @ R.
    cam = (pts.astype(np.float64) - pose[:3, 3]) @ pose[:3, :3]
    return cam.astype(_float_type(pts))


def depth_to_points(
    depth: np.ndarray, intrinsics: np.ndarray, cam2world: np.ndarray | None = None
) -> np.ndarray:
    """Back-project a depth map (H, W) to points (H, W, 3).

    Pixel (u, v) is the ray through K^-1 (u, v, 1) (integer pixel centres).
    Points are in the camera frame, or in the world frame when ``cam2world`` is
    given. Pixels whose depth is not finite and positive give 0.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise InputError(f"depth must be an (H, W) array (got shape {depth.shape})")
    K = np.asarray(intrinsics, dtype=np.float64)
    height, width = depth.shape
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)
    # General K (including skew): solve the upper-triangular system per axis.
    y = (v - K[1, 2]) / K[1, 1]
    x = (u[None, :] - K[0, 2] - K[0, 1] * y[:, None]) / K[0, 0]
    ok = np.isfinite(depth) & (depth > 0)
    z = np.where(ok, depth, 0).astype(np.float64)  # no inf/NaN arithmetic below
    pts = np.stack([x * z, np.broadcast_to(y[:, None], z.shape) * z, z], axis=-1)
    if cam2world is not None:
        pose = np.asarray(cam2world, dtype=np.float64)
        pts = pts @ pose[:3, :3].T + pose[:3, 3]
    pts = np.where(ok[..., None], pts, 0.0)
    return pts.astype(_float_type(depth))


def project_points(pts_cam: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (..., 3) -> (pixel coordinates (..., 2), in-front mask)."""
    K = np.asarray(intrinsics, dtype=np.float64)
    pts = np.asarray(pts_cam, dtype=np.float64)
    z = pts[..., 2]
    front = z > _EPS
    safe_z = np.where(front, z, 1.0)
    uvw = pts @ K.T
    uv = uvw[..., :2] / safe_z[..., None]
    return uv, front
