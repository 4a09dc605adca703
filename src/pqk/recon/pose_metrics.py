"""Evaluation of an aligned scene against ground truth: per image pair, the rotation
error of the relative pose and the angle between the relative translation directions."""

from __future__ import annotations

import math

import numpy as np
import torch


def _angle(sin_like: torch.Tensor, cos_like: torch.Tensor) -> torch.Tensor:
    # atan2 stays accurate near 0°, where acos of a cosine ≈ 1 loses half the digits
    return torch.rad2deg(torch.atan2(sin_like, cos_like))


def relative_pose_errors(est_cam2world: torch.Tensor, gt_cam2world: torch.Tensor) -> dict:
    """Per pair of images (a < b): the rotation error (degrees) of the relative pose
    a→b and the angle (degrees) between estimated and GT relative translation directions,
    which is free of the unknown scene scale. Returns lists per pair plus their means and
    maxima."""
    est = torch.as_tensor(est_cam2world, dtype=torch.float64)
    gt = torch.as_tensor(gt_cam2world, dtype=torch.float64)
    if est.shape != gt.shape or est.shape[1:] != (4, 4):
        raise ValueError(f"expected two (N, 4, 4) pose stacks (got {tuple(est.shape)} and {tuple(gt.shape)})")
    pairs = [(a, b) for a in range(len(est)) for b in range(a + 1, len(est))]
    rot_err, trans_err = [], []
    for a, b in pairs:
        rel_e = torch.linalg.inv(est[a]) @ est[b]
        rel_g = torch.linalg.inv(gt[a]) @ gt[b]
        delta = rel_e[:3, :3].T @ rel_g[:3, :3]
        skew = torch.stack([delta[2, 1] - delta[1, 2], delta[0, 2] - delta[2, 0], delta[1, 0] - delta[0, 1]])
        rot_err.append(float(_angle(skew.norm() / 2, (torch.trace(delta) - 1) / 2)))
        te, tg = rel_e[:3, 3], rel_g[:3, 3]
        trans_err.append(float(_angle(torch.linalg.cross(te, tg).norm(), te @ tg)))
    nan = math.nan
    return dict(
        pairs=pairs,
        rotation_deg=rot_err,
        translation_deg=trans_err,
        mean_rotation_deg=float(np.mean(rot_err)) if pairs else nan,
        mean_translation_deg=float(np.mean(trans_err)) if pairs else nan,
        max_rotation_deg=float(np.max(rot_err)) if pairs else nan,
        max_translation_deg=float(np.max(trans_err)) if pairs else nan,
    )
