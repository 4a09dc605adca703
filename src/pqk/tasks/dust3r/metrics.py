"""Quality figures of the protocol's record for DUSt3R: depth (AbsRel, RMSE, δ1) and
3D reconstruction (accuracy, completeness, Chamfer), as defined in dust3r-facts.md §7.

DUSt3R predicts geometry only up to scale (and, across a scene, up to a similarity), so
every figure is taken after an explicit alignment that is part of the returned record:
a per-view median scale for depth, a Sim(3) from known correspondences for point clouds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

ArrayLike = np.ndarray | torch.Tensor

# Stand-in for a predicted depth that is <= 0 or not finite: it keeps AbsRel and RMSE
# finite (the pixel then costs about |0 - d|) while the ratio test counts it as a failure.
DEPTH_FLOOR = 1e-6
DELTA1_THRESHOLD = 1.25
DEPTH_ALIGNMENTS = ("median", "none")


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _depth_pixels(
    pred_depth: ArrayLike, gt_depth: ArrayLike, valid: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and GT depths (1-D) of the pixels that have a usable GT depth."""
    pred, gt = _as_numpy(pred_depth), _as_numpy(gt_depth)
    if pred.shape != gt.shape:
        raise ValueError(f"predicted depth {pred.shape} and GT depth {gt.shape} differ in shape")
    mask = np.isfinite(gt) & (gt > 0)
    if valid is not None:
        valid = _as_numpy(valid).astype(bool)
        if valid.shape != gt.shape:
            raise ValueError(f"valid mask {valid.shape} and GT depth {gt.shape} differ in shape")
        mask &= valid
    return pred[mask], gt[mask]


def _positive(pred: np.ndarray) -> np.ndarray:
    return np.isfinite(pred) & (pred > 0)


def median_scale(pred_depth: ArrayLike, gt_depth: ArrayLike, valid: ArrayLike | None) -> float:
    """s = median(d / d̂) over valid pixels, so that s·d̂ matches d in the median.

    This is the per-view alignment of monocular and multi-view depth benchmarks for
    scale-ambiguous predictions (SlowTV protocol, Robust MVD benchmark; facts §7). Pixels
    whose prediction is <= 0 or not finite carry no scale information and are left out;
    with none left the scale is 1 (every pixel will then count as a failure).
    """
    pred, gt = _depth_pixels(pred_depth, gt_depth, valid)
    ok = _positive(pred)
    if not ok.any():
        return 1.0
    return float(np.median(gt[ok] / pred[ok]))


def depth_metrics(
    pred_depth: ArrayLike, gt_depth: ArrayLike, valid: ArrayLike | None, align: str = "median"
) -> dict:
    """AbsRel, RMSE and δ1 of one view over valid GT pixels (GT depth > 0 and finite).

    `align`: "median" rescales the prediction by `median_scale` first, "none" takes it
    as is. A predicted depth <= 0 or not finite fails the ratio test and enters AbsRel and
    RMSE as DEPTH_FLOOR. Returns absrel, rmse, delta1, scale (the factor applied) and
    n_pixels; with no valid pixel the figures are NaN and n_pixels is 0.
    """
    if align not in DEPTH_ALIGNMENTS:
        raise ValueError(f"align must be one of {DEPTH_ALIGNMENTS} (got {align!r})")
    pred, gt = _depth_pixels(pred_depth, gt_depth, valid)
    if gt.size == 0:
        return dict(absrel=math.nan, rmse=math.nan, delta1=math.nan, scale=math.nan, n_pixels=0)
    scale = median_scale(pred_depth, gt_depth, valid) if align == "median" else 1.0
    aligned = scale * pred
    ok = _positive(aligned)
    aligned = np.where(ok, aligned, DEPTH_FLOOR)
    ratio = np.maximum(aligned / gt, gt / aligned)
    return dict(
        absrel=float(np.mean(np.abs(aligned - gt) / gt)),
        rmse=float(np.sqrt(np.mean((aligned - gt) ** 2))),
        delta1=float(np.mean(ok & (ratio < DELTA1_THRESHOLD))),
        scale=float(scale),
        n_pixels=int(gt.size),
    )


def aggregate_depth_metrics(per_view: Sequence[dict]) -> dict:
    """Pixel-weighted figures over several views, as if all their pixels were one set.

    AbsRel and δ1 are pixel-weighted means; RMSE is the square root of the pixel-weighted
    mean of the squared per-view RMSEs. Views without pixels are skipped.
    """
    used = [m for m in per_view if m["n_pixels"] > 0]
    n = sum(m["n_pixels"] for m in used)
    if n == 0:
        return dict(absrel=math.nan, rmse=math.nan, delta1=math.nan, n_pixels=0, n_views=0)

    def weighted(key: str, f=lambda v: v) -> float:
        return sum(m["n_pixels"] * f(m[key]) for m in used) / n

    return dict(
        absrel=weighted("absrel"),
        rmse=math.sqrt(weighted("rmse", lambda v: v * v)),
        delta1=weighted("delta1"),
        n_pixels=int(n),
        n_views=len(used),
    )


def pair_depth_metrics(
    result: dict, gt_depth_view1: ArrayLike, valid_view1: ArrayLike | None, align: str = "median"
) -> dict:
    """`depth_metrics` for view 1 of a pair result: its depth is the z of `pred1['pts3d']`,
    which lies in camera 1's own frame (facts §3.4)."""
    depth = result["pred1"]["pts3d"][..., 2]
    return depth_metrics(depth, gt_depth_view1, valid_view1, align=align)


def _points(x: ArrayLike) -> np.ndarray:
    pts = _as_numpy(x)
    if pts.shape[-1] != 3:
        raise ValueError(f"expected points with 3 coordinates in the last axis (got {pts.shape})")
    return pts.reshape(-1, 3)


def umeyama_sim3(
    src: ArrayLike, dst: ArrayLike, weights: ArrayLike | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) minimising Σ w‖s·R·src + t − dst‖² (Umeyama 1991, weighted).

    The sign fix on the last singular direction keeps R a rotation (det +1) when the best
    orthogonal fit would be a reflection. Inputs (N, 3) or any (..., 3); float64 maths.
    """
    src, dst = _points(src), _points(dst)
    if src.shape != dst.shape:
        raise ValueError(f"src {src.shape} and dst {dst.shape} must have the same shape")
    w = np.ones(len(src)) if weights is None else _as_numpy(weights).reshape(-1)
    if w.shape != (len(src),) or (w < 0).any() or not w.sum() > 0:
        raise ValueError("weights must be one non-negative value per point, not all zero")
    w = w / w.sum()
    mu_src, mu_dst = w @ src, w @ dst
    src_c, dst_c = src - mu_src, dst - mu_dst
    cov = (dst_c * w[:, None]).T @ src_c
    u, d, vt = np.linalg.svd(cov)
    signs = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[2] = -1.0
    rot = u @ np.diag(signs) @ vt
    var_src = float(w @ (src_c**2).sum(axis=1))
    if var_src <= 0:
        raise ValueError("source points are all at one place: the similarity is undetermined")
    scale = float((d * signs).sum() / var_src)
    return scale, rot, mu_dst - scale * rot @ mu_src


def apply_sim3(points: ArrayLike, s: float, R: ArrayLike, t: ArrayLike) -> np.ndarray:
    """s·R·p + t for points of shape (..., 3)."""
    return s * _as_numpy(points) @ _as_numpy(R).T + _as_numpy(t)


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce([np.isfinite(a).reshape(len(a), -1).all(axis=1) for a in arrays])


def _subsample(points: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    # a fixed seed makes the figure repeatable; sorting keeps the original point order
    if len(points) <= max_points:
        return points
    keep = np.random.default_rng(seed).choice(len(points), size=max_points, replace=False)
    return points[np.sort(keep)]


def _correspondence_sim3(correspondences: Sequence[ArrayLike]) -> tuple[float, np.ndarray, np.ndarray]:
    if len(correspondences) not in (2, 3):
        raise ValueError("correspondences must be (pred_points, gt_points[, weights])")
    src, dst = _points(correspondences[0]), _points(correspondences[1])
    w = np.ones(len(src)) if len(correspondences) == 2 else _as_numpy(correspondences[2]).reshape(-1)
    if not (len(src) == len(dst) == len(w)):
        raise ValueError("correspondences must hold as many predicted points as GT points (and weights)")
    keep = _finite_rows(src, dst, w[:, None])
    return umeyama_sim3(src[keep], dst[keep], w[keep])


def chamfer(
    pred_pts: ArrayLike,
    gt_pts: ArrayLike,
    align: bool = True,
    correspondences: Sequence[ArrayLike] | None = None,
    max_points: int = 200_000,
    seed: int = 42,
) -> dict:
    """Accuracy (pred → nearest GT, mean distance), completeness (GT → nearest pred) and
    Chamfer (their mean), the DTU figures of facts §7, in GT units.

    With `align`, the prediction is first mapped into the GT frame by the Sim(3) fitted
    (weighted Umeyama) on `correspondences` = (pred_points, gt_points[, weights]): points
    known to be the same surface point, e.g. the predicted and GT pointmaps of the same
    pixels. Fitting on nearest neighbours instead (ICP) could collapse a bad prediction onto
    the GT and flatter it, so correspondences are required. Non-finite points are dropped;
    each cloud is then subsampled to `max_points` with a fixed seed. Returns the three
    figures plus the applied scale, n_pred and n_gt (after subsampling).
    """
    pred, gt = _points(pred_pts), _points(gt_pts)
    pred, gt = pred[_finite_rows(pred)], gt[_finite_rows(gt)]
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError("chamfer needs at least one finite point in each cloud")
    scale = 1.0
    if align:
        if correspondences is None:
            raise ValueError("align=True needs correspondences (pred_points, gt_points) to fit the Sim(3)")
        scale, rot, trans = _correspondence_sim3(correspondences)
        pred = apply_sim3(pred, scale, rot, trans)
    pred, gt = _subsample(pred, max_points, seed), _subsample(gt, max_points, seed)
    accuracy = float(cKDTree(gt).query(pred)[0].mean())
    completeness = float(cKDTree(pred).query(gt)[0].mean())
    return dict(
        accuracy=accuracy,
        completeness=completeness,
        chamfer=(accuracy + completeness) / 2,
        scale=float(scale),
        n_pred=len(pred),
        n_gt=len(gt),
    )
