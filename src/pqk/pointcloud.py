"""From a pair's prediction to a coloured point cloud (both views in view 1's frame)."""

from __future__ import annotations

import numpy as np


def pair_point_cloud(
    result: dict, rgb1: np.ndarray, rgb2: np.ndarray, min_conf: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Points and colours of the pixels whose confidence exceeds `min_conf`.

    Returns (points (N,3), colours (N,3) in [0,1], total pixel count). DUSt3R's demo uses
    min_conf 3; confidences are always > 1.
    """
    pts = [result["pred1"]["pts3d"].numpy(), result["pred2"]["pts3d_in_other_view"].numpy()]
    conf = [result["pred1"]["conf"].numpy(), result["pred2"]["conf"].numpy()]
    rgbs = [rgb1, rgb2]
    points, colors, total = [], [], 0
    for p, c, rgb in zip(pts, conf, rgbs):
        if rgb.shape[:2] != p.shape[:2]:
            # landscape_only models transpose portrait outputs
            rgb = rgb.transpose(1, 0, 2)
        keep = (c > min_conf) & np.isfinite(p).all(axis=-1)
        points.append(p[keep])
        colors.append(rgb[keep])
        total += c.size
    return np.concatenate(points), np.concatenate(colors), total
