"""Quality metrics (facts §7) against values worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pqk.tasks.dust3r.metrics import (
    DEPTH_FLOOR,
    aggregate_depth_metrics,
    apply_sim3,
    chamfer,
    depth_metrics,
    median_scale,
    pair_depth_metrics,
    umeyama_sim3,
)


def _random_sim3(seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return float(rng.uniform(0.3, 3.0)), Rotation.random(random_state=seed).as_matrix(), rng.normal(size=3)


def test_depth_metrics_by_hand_without_alignment() -> None:
    pred = np.array([1.0, 2.0, 4.0, 0.5])
    gt = np.array([1.0, 2.0, 2.0, 1.0])
    m = depth_metrics(pred, gt, None, align="none")
    # |d̂−d|/d = 0, 0, 1, 0.5 → mean 1.5/4
    assert m["absrel"] == pytest.approx(0.375)
    # (d̂−d)² = 0, 0, 4, 0.25 → sqrt(4.25/4)
    assert m["rmse"] == pytest.approx(math.sqrt(1.0625))
    # ratios max(d̂/d, d/d̂) = 1, 1, 2, 2 → two of four below 1.25
    assert m["delta1"] == pytest.approx(0.5)
    assert m["scale"] == 1.0 and m["n_pixels"] == 4


def test_depth_metrics_by_hand_with_median_and_mask() -> None:
    pred = torch.tensor([2.0, 4.0, 8.0, 100.0])
    gt = torch.tensor([1.0, 1.0, 2.0, 5.0])
    valid = torch.tensor([True, True, True, False])
    # d/d̂ over valid pixels = 0.5, 0.25, 0.25 → median 0.25 → aligned d̂ = 0.5, 1, 2
    assert median_scale(pred, gt, valid) == pytest.approx(0.25)
    m = depth_metrics(pred, gt, valid)
    assert m["scale"] == pytest.approx(0.25)
    # |d̂−d|/d = 0.5, 0, 0 → 1/6;  (d̂−d)² = 0.25, 0, 0 → sqrt(0.25/3);  ratios 2, 1, 1 → 2/3
    assert m["absrel"] == pytest.approx(1 / 6)
    assert m["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["delta1"] == pytest.approx(2 / 3)
    assert m["n_pixels"] == 3


def test_median_alignment_removes_any_scale() -> None:
    gt = np.random.default_rng(0).uniform(0.5, 10.0, size=(12, 16))
    m = depth_metrics(3.7 * gt, gt, np.ones_like(gt, dtype=bool))
    assert m["absrel"] == pytest.approx(0.0, abs=1e-12)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert m["delta1"] == 1.0
    assert m["scale"] == pytest.approx(1 / 3.7)


def test_nonpositive_and_nan_predictions_are_failures() -> None:
    pred = np.array([1.0, 0.0, -1.0, np.nan])
    gt = np.array([1.0, 2.0, 4.0, 1.0])
    # only the first pixel has a usable prediction: its ratio d/d̂ = 1 is the median
    assert median_scale(pred, gt, None) == 1.0
    m = depth_metrics(pred, gt, None)
    # failures enter as the floor: |floor−d|/d = 1 − floor/d for d = 2, 4, 1
    expected_absrel = (0 + (1 - DEPTH_FLOOR / 2) + (1 - DEPTH_FLOOR / 4) + (1 - DEPTH_FLOOR)) / 4
    assert m["absrel"] == pytest.approx(expected_absrel)
    assert math.isfinite(m["rmse"])
    assert m["delta1"] == pytest.approx(0.25)


def test_gt_without_depth_is_ignored_and_empty_view_is_nan() -> None:
    m = depth_metrics(np.array([1.0, 5.0]), np.array([1.0, 0.0]), None, align="none")
    assert m["n_pixels"] == 1 and m["absrel"] == 0.0
    empty = depth_metrics(np.ones(3), np.ones(3), np.zeros(3, dtype=bool))
    assert empty["n_pixels"] == 0 and math.isnan(empty["absrel"])
    with pytest.raises(ValueError):
        depth_metrics(np.ones(3), np.ones(3), None, align="mean")


def test_aggregate_is_pixel_weighted() -> None:
    a = dict(absrel=0.1, rmse=1.0, delta1=1.0, n_pixels=3)
    b = dict(absrel=0.5, rmse=2.0, delta1=0.0, n_pixels=1)
    empty = dict(absrel=math.nan, rmse=math.nan, delta1=math.nan, n_pixels=0)
    agg = aggregate_depth_metrics([a, b, empty])
    # absrel (3·0.1 + 0.5)/4 = 0.2;  rmse sqrt((3·1 + 4)/4);  delta1 3/4
    assert agg["absrel"] == pytest.approx(0.2)
    assert agg["rmse"] == pytest.approx(math.sqrt(7 / 4))
    assert agg["delta1"] == pytest.approx(0.75)
    assert agg["n_pixels"] == 4 and agg["n_views"] == 2


def test_aggregate_equals_metrics_of_concatenated_views() -> None:
    rng = np.random.default_rng(1)
    gts = [rng.uniform(1, 5, 20), rng.uniform(1, 5, 7)]
    preds = [g * rng.uniform(0.7, 1.4, g.shape) for g in gts]
    per_view = [depth_metrics(p, g, None, align="none") for p, g in zip(preds, gts)]
    joint = depth_metrics(np.concatenate(preds), np.concatenate(gts), None, align="none")
    agg = aggregate_depth_metrics(per_view)
    for key in ("absrel", "rmse", "delta1"):
        assert agg[key] == pytest.approx(joint[key])


def test_pair_depth_metrics_reads_view1_z() -> None:
    pts = torch.zeros(2, 2, 3)
    pts[..., 2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pts[..., :2] = 99.0  # x, y must not matter
    result = {"pred1": {"pts3d": pts, "conf": torch.ones(2, 2)}}
    m = pair_depth_metrics(result, 2 * pts[..., 2], torch.ones(2, 2, dtype=torch.bool))
    assert m["absrel"] == pytest.approx(0.0) and m["scale"] == pytest.approx(2.0)


def test_umeyama_recovers_known_sim3() -> None:
    s, rot, t = _random_sim3(3)
    src = np.random.default_rng(4).normal(size=(50, 3))
    s_hat, rot_hat, t_hat = umeyama_sim3(src, apply_sim3(src, s, rot, t))
    assert s_hat == pytest.approx(s, rel=1e-10)
    np.testing.assert_allclose(rot_hat, rot, atol=1e-10)
    np.testing.assert_allclose(t_hat, t, atol=1e-10)


def test_umeyama_weights_ignore_zero_weight_outliers() -> None:
    s, rot, t = _random_sim3(5)
    src = np.random.default_rng(6).normal(size=(40, 3))
    dst = apply_sim3(src, s, rot, t)
    dst[:10] += np.random.default_rng(7).normal(scale=50.0, size=(10, 3))
    weights = np.r_[np.zeros(10), np.full(30, 2.5)]
    s_hat, rot_hat, t_hat = umeyama_sim3(src, dst, weights)
    assert s_hat == pytest.approx(s, rel=1e-10)
    np.testing.assert_allclose(rot_hat, rot, atol=1e-10)
    np.testing.assert_allclose(t_hat, t, atol=1e-10)
    assert not np.allclose(umeyama_sim3(src, dst)[1], rot, atol=1e-3)


def test_umeyama_returns_a_rotation_for_mirrored_points() -> None:
    src = np.random.default_rng(8).normal(size=(30, 3))
    _, rot, _ = umeyama_sim3(src, src * np.array([1.0, 1.0, -1.0]))
    assert np.linalg.det(rot) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        umeyama_sim3(np.ones((5, 3)), src[:5])


def _grid_cloud() -> np.ndarray:
    axis = np.arange(5.0)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def test_chamfer_of_identical_clouds_is_zero() -> None:
    cloud = _grid_cloud()
    m = chamfer(cloud, cloud, align=True, correspondences=(cloud, cloud))
    assert m["accuracy"] == pytest.approx(0.0, abs=1e-9)
    assert m["completeness"] == pytest.approx(0.0, abs=1e-9)
    assert m["chamfer"] == pytest.approx(0.0, abs=1e-9)


def test_chamfer_of_shifted_cloud_by_hand() -> None:
    gt = _grid_cloud()  # unit spacing
    shift = np.array([0.1, 0.2, 0.2])  # ‖shift‖ = 0.3 < 0.5: every nearest neighbour is the partner
    m = chamfer(gt + shift, gt, align=False)
    assert m["accuracy"] == pytest.approx(0.3)
    assert m["completeness"] == pytest.approx(0.3)
    assert m["chamfer"] == pytest.approx(0.3)


def test_chamfer_alignment_removes_known_sim3() -> None:
    gt = np.random.default_rng(9).uniform(-1, 1, size=(500, 3))
    s, rot, t = _random_sim3(10)
    # pred = gt seen through the inverse similarity, so aligning pred → GT must undo it
    pred = apply_sim3(gt - t, 1 / s, rot.T, np.zeros(3))
    m = chamfer(pred, gt, align=True, correspondences=(pred, gt))
    assert m["chamfer"] < 1e-6
    assert m["scale"] == pytest.approx(s)
    assert chamfer(pred, gt, align=False)["chamfer"] > 0.1
    with pytest.raises(ValueError):
        chamfer(pred, gt, align=True)


def test_chamfer_subsampling_is_deterministic() -> None:
    rng = np.random.default_rng(11)
    pred, gt = rng.normal(size=(3000, 3)), rng.normal(size=(2500, 3))
    a = chamfer(pred, gt, align=False, max_points=1000)
    b = chamfer(pred, gt, align=False, max_points=1000)
    assert a == b and a["n_pred"] == 1000 and a["n_gt"] == 1000
    assert chamfer(pred, gt, align=False, max_points=1000, seed=1) != a
