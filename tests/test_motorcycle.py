"""The Middlebury Motorcycle pair as a ground-truth Scene in load_images geometry."""

from __future__ import annotations

import numpy as np
import pytest

from pqk.data.images import load_images, motorcycle_pair
from pqk.data.motorcycle import BASELINE, NAME, disparity_to_depth, motorcycle_scene, warp_disparity_to_right
from pqk.data.scenes import Scene, points_in_camera, project_points


@pytest.fixture(scope="module")
def scene() -> Scene:
    return motorcycle_scene(512)


def test_images_are_exactly_load_images_output(scene: Scene) -> None:
    loaded = load_images(motorcycle_pair(), size=512)
    assert scene.name == NAME and len(scene.views) == 2
    for view, item in zip(scene.views, loaded):
        assert view.img.shape == (336, 512, 3) and view.img.dtype == np.uint8
        assert tuple(item["true_shape"][0].tolist()) == view.depth.shape == view.valid.shape
        assert np.array_equal(np.rint(item["rgb"] * 255).astype(np.uint8), view.img)


def test_depth_range_and_valid_fractions(scene: Scene) -> None:
    left, right = scene.views
    for view in scene.views:
        depth = view.depth[view.valid]
        assert depth.min() > 2.0 and depth.max() < 5.5  # actual: 2.11 - 5.01 m
        assert np.all(view.depth[~view.valid] == 0)
    assert left.valid.mean() > 0.9  # ~0.92: Middlebury's own holes
    assert right.valid.mean() > 0.5  # ~0.84 after warping: occlusions stay holes


def test_cameras(scene: Scene) -> None:
    left, right = scene.views
    np.testing.assert_array_equal(left.cam2world, np.eye(4, dtype=np.float32))
    expected = np.eye(4, dtype=np.float32)
    expected[0, 3] = BASELINE
    np.testing.assert_array_equal(right.cam2world, expected)
    # Same focal lengths and row centre; the right principal point is shifted by doffs.
    assert left.intrinsics[0, 0] == right.intrinsics[0, 0] and left.intrinsics[1, 2] == right.intrinsics[1, 2]
    assert right.intrinsics[0, 2] > left.intrinsics[0, 2]


def test_left_points_land_on_the_right_consistently(scene: Scene) -> None:
    left, right = scene.views
    cam = points_in_camera(left.pts3d, right.cam2world)
    uv, front = project_points(cam, right.intrinsics)
    rows = np.arange(left.depth.shape[0])[:, None]
    # Rectified: the same scanline in both images.
    assert np.abs(uv[..., 1] - rows)[left.valid].max() < 1e-3
    px = np.rint(uv).astype(np.int64)
    h, w = right.depth.shape
    inside = left.valid & front & (px[..., 0] >= 0) & (px[..., 0] < w)
    u, v = px[..., 0][inside], px[..., 1][inside]
    both = right.valid[v, u]
    rel = np.abs(right.depth[v, u][both] - cam[..., 2][inside][both]) / cam[..., 2][inside][both]
    assert np.mean(rel < 0.01) > 0.85
    colour_gap = np.abs(left.img[inside].astype(int) - right.img[v, u].astype(int)).mean()
    assert colour_gap < 15  # the warp follows real image content


def test_warp_of_a_constant_disparity() -> None:
    disparity = np.full((4, 12), 3.0)
    disparity[:, 0] = np.inf
    right = warp_disparity_to_right(disparity)
    # Left columns 1..11 land on right columns -2..8; columns 0..8 are covered.
    assert np.all(right[:, :9] == 3.0)
    assert np.all(np.isnan(right[:, 9:]))


def test_warp_keeps_the_nearest_surface() -> None:
    disparity = np.full((1, 20), 2.0)
    disparity[0, 10:13] = 6.0  # a near object: lands 4 px further left, over the background
    right = warp_disparity_to_right(disparity)
    assert np.all(right[0, 4:7] == 6.0)
    assert np.isnan(right[0, 8:10]).all()  # background revealed only in the right view: hole


def test_disparity_to_depth_formula() -> None:
    depth = disparity_to_depth(np.array([0.0, np.inf, np.nan]))
    assert depth[0] == pytest.approx(0.193001 * 994.978 / 31.086, rel=1e-6)
    assert np.all(depth[1:] == 0)


def test_size_224() -> None:
    scene = motorcycle_scene(224)
    loaded = load_images(motorcycle_pair()[:1], size=224)
    assert scene.views[0].img.shape == (224, 224, 3)
    assert np.array_equal(np.rint(loaded[0]["rgb"] * 255).astype(np.uint8), scene.views[0].img)
