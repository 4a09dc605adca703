"""Small camera-geometry helpers shared by the global-alignment modules: rotation
parametrisations, rigid transforms, pixel grids, and the Weiszfeld focal estimate of a
pointmap in its own camera frame."""

from __future__ import annotations

import math

import numpy as np
import torch

WEISZFELD_ITERS = 10
MIN_FOCAL = 1.0


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _signed_expm1(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions in (x, y, z, w) order, normalised here → (..., 3, 3)."""
    x, y, z, w = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def _rotmat_to_quat(rot: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) of a rotation matrix; branches on the largest component
    so that the division never goes through a near-zero value (Shepperd's method)."""
    m = np.asarray(rot, dtype=np.float64)
    trace = np.trace(m)
    if trace > 0:
        s = 2 * math.sqrt(1 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2 * math.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def _transform(rot: torch.Tensor, trans: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Batched x → R·x + t: rot (B, 3, 3), trans (B, 3), pts (B, P, 3)."""
    return pts @ rot.transpose(1, 2) + trans[:, None]


def _to_matrix(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=rot.dtype, device=rot.device).repeat(len(rot), 1, 1)
    out[:, :3, :3] = rot
    out[:, :3, 3] = trans
    return out


def _pixel_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(H·W, 2) integer pixel coordinates (u, v), row-major like a flattened map."""
    v, u = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2).float()


# ---------------------------------------------------------------- focal estimate


def estimate_focal(pts3d: torch.Tensor, pp: torch.Tensor | None = None) -> float:
    """Focal (pixels) of a pointmap in its own camera frame: the f for which f·(x/z, y/z)
    best matches each pixel's offset from the principal point (default: image centre),
    least squares then 10 Weiszfeld reweightings (DUSt3R's 'weiszfeld' mode, facts §5.4)."""
    h, w = pts3d.shape[:2]
    pts = pts3d.reshape(-1, 3).double()
    centre = torch.tensor([w / 2, h / 2], dtype=torch.float64, device=pts.device) if pp is None else pp.double()
    pixels = _pixel_grid(h, w, pts.device).double() - centre
    xy_over_z = (pts[:, :2] / pts[:, 2:3]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    dot_xy_px = (xy_over_z * pixels).sum(-1)
    dot_xy_xy = xy_over_z.square().sum(-1)
    focal = dot_xy_px.mean() / dot_xy_xy.mean()
    for _ in range(WEISZFELD_ITERS):
        # inverse residual weights turn least squares into an L1 (median-like) fit
        weight = (pixels - focal * xy_over_z).norm(dim=-1).clamp_min(1e-8).reciprocal()
        focal = (weight * dot_xy_px).mean() / (weight * dot_xy_xy).mean()
    return max(float(focal), MIN_FOCAL)
