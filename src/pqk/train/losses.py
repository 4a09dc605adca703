"""DUSt3R's training objective: confidence-weighted regression of normalized pointmaps
(dust3r/losses.py: ConfLoss(Regr3D(L21, norm_mode='avg_dis'), alpha=0.2), facts §6)."""

from __future__ import annotations

import torch


def normalize_pair(pts1: torch.Tensor, pts2: torch.Tensor, valid1: torch.Tensor, valid2: torch.Tensor):
    """Divide both views' points by their mean distance to the origin over valid pixels.

    pts*: (B, H, W, 3), valid*: (B, H, W) bool. One factor per sample, shared by the views,
    so the prediction is scored up to the global scale it cannot know."""
    dist = pts1.norm(dim=-1) * valid1 + 0.0
    dist2 = pts2.norm(dim=-1) * valid2
    total = dist.flatten(1).sum(1) + dist2.flatten(1).sum(1)
    count = valid1.flatten(1).sum(1) + valid2.flatten(1).sum(1)
    factor = (total / count.clamp(min=1)).clamp(min=1e-8)[:, None, None, None]
    return pts1 / factor, pts2 / factor


def pointmap_errors(pred1, pred2, gt1, gt2, valid1, valid2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel Euclidean error (B, H, W) of each view after avg-distance normalization."""
    p1, p2 = normalize_pair(pred1, pred2, valid1, valid2)
    g1, g2 = normalize_pair(gt1, gt2, valid1, valid2)
    return (p1 - g1).norm(dim=-1), (p2 - g2).norm(dim=-1)


def conf_regression_loss(
    res1: dict, res2: dict, gt: dict, alpha: float = 0.2
) -> tuple[torch.Tensor, dict[str, float]]:
    """conf · ‖p − g‖ − α·log(conf), averaged over each view's valid pixels, summed over views.

    `gt` holds 'pts1', 'pts2' (both in view 1's camera frame) and 'valid1', 'valid2'."""
    valid1, valid2 = gt["valid1"], gt["valid2"]
    err1, err2 = pointmap_errors(res1["pts3d"], res2["pts3d_in_other_view"], gt["pts1"], gt["pts2"], valid1, valid2)
    total = 0.0
    logs = {}
    for name, err, conf, valid in (("1", err1, res1["conf"], valid1), ("2", err2, res2["conf"], valid2)):
        if not bool(valid.any()):
            continue
        e, c = err[valid], conf[valid]
        total = total + (e * c - alpha * torch.log(c)).mean()
        logs[f"regr{name}"] = float(e.detach().mean())
    if not torch.is_tensor(total):
        total = res1["pts3d"].sum() * 0.0  # no valid pixel anywhere: a zero that keeps the graph
    logs["loss"] = float(total.detach())
    return total, logs
