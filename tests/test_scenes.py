"""Procedural scenes: determinism, ground-truth consistency, multi-view geometry, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pqk.data.scenes import (
    Scene,
    depth_to_points,
    generate_scene,
    generate_scenes,
    points_in_camera,
    project_points,
)
from pqk.errors import InputError

W, H = 256, 192


@pytest.fixture(scope="module")
def scene() -> Scene:
    return generate_scene(3, n_views=8, width=W, height=H)


def _arrays(scene: Scene) -> list[np.ndarray]:
    names = ("img", "depth", "intrinsics", "cam2world", "valid", "pts3d")
    return [getattr(v, name) for v in scene.views for name in names]


def test_same_seed_is_bit_identical() -> None:
    a, b = generate_scene(11, 3, 96, 64), generate_scene(11, 3, 96, 64)
    assert a.name == b.name == "gen-00011" and a.seed == 11
    for x, y in zip(_arrays(a), _arrays(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_fewer_views_are_a_prefix() -> None:
    short, long = generate_scene(9, 2, 64, 48), generate_scene(9, 4, 64, 48)
    for a, b in zip(short.views, long.views):
        assert np.array_equal(a.img, b.img) and np.array_equal(a.cam2world, b.cam2world)


def test_different_seeds_differ() -> None:
    a, b = generate_scene(1, 2, 96, 64), generate_scene(2, 2, 96, 64)
    assert not np.array_equal(a.views[0].img, b.views[0].img)
    assert not np.array_equal(a.views[0].cam2world, b.views[0].cam2world)


def test_seed_names_the_same_scene_at_every_resolution() -> None:
    small, large = generate_scene(4, 3, 64, 48), generate_scene(4, 3, 128, 96)
    for s, l in zip(small.views, large.views):
        assert np.array_equal(s.cam2world, l.cam2world)
        assert l.intrinsics[0, 0] == pytest.approx(2 * s.intrinsics[0, 0], rel=1e-6)


def test_shapes_and_dtypes(scene: Scene) -> None:
    assert len(scene.views) == 8
    for view in scene.views:
        assert view.img.shape == (H, W, 3) and view.img.dtype == np.uint8
        assert view.depth.shape == (H, W) and view.depth.dtype == np.float32
        assert view.valid.shape == (H, W) and view.valid.dtype == bool
        assert view.pts3d.shape == (H, W, 3) and view.pts3d.dtype == np.float32
        assert view.intrinsics.shape == (3, 3) and view.intrinsics.dtype == np.float32
        assert view.cam2world.shape == (4, 4) and view.cam2world.dtype == np.float32
        # Principal point at the exact image centre (documented convention).
        assert view.intrinsics[0, 2] == (W - 1) / 2 and view.intrinsics[1, 2] == (H - 1) / 2


def test_cameras_are_proper_opencv_poses(scene: Scene) -> None:
    for view in scene.views:
        R = view.cam2world[:3, :3].astype(np.float64)
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-6)
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-6)
        assert R[1, 1] > 0.5  # camera y (image down) roughly along world +y (down)
        assert np.all(view.cam2world[3] == [0, 0, 0, 1])


def test_valid_depth_and_texture(scene: Scene) -> None:
    for view in scene.views:
        assert view.valid.mean() > 0.95  # a closed room: every ray hits a wall
        assert np.all(view.depth[view.valid] > 0)
        assert np.all(view.depth[~view.valid] == 0) and np.all(view.pts3d[~view.valid] == 0)
        assert view.img[view.valid].std() > 10  # textured, not flat colour


def test_pts3d_matches_back_projection(scene: Scene) -> None:
    for view in scene.views:
        pts = depth_to_points(view.depth, view.intrinsics, view.cam2world)
        ok = view.valid
        err = np.linalg.norm(pts[ok] - view.pts3d[ok], axis=-1)
        scale = np.linalg.norm(view.pts3d[ok] - view.cam2world[:3, 3], axis=-1)
        assert np.max(err / scale) < 1e-4
        # Camera-frame back-projection has z == depth, and agrees with points_in_camera.
        cam = depth_to_points(view.depth, view.intrinsics)
        np.testing.assert_allclose(cam[..., 2], view.depth, rtol=1e-6)
        np.testing.assert_allclose(points_in_camera(view.pts3d, view.cam2world)[ok], cam[ok], atol=1e-4)


def test_depth_to_points_zeroes_invalid_pixels() -> None:
    depth = np.array([[1.0, 0.0], [np.nan, np.inf]], dtype=np.float32)
    pts = depth_to_points(depth, np.eye(3), np.eye(4))
    assert pts.dtype == np.float32
    np.testing.assert_array_equal(pts[0, 0], [0, 0, 1])
    assert np.all(pts.reshape(-1, 3)[1:] == 0)


def _reproject(scene: Scene, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View j's valid pixels projected into view i: (rounded pixel coords, inside mask, z in i)."""
    _, _, pts_j, valid_j = scene.pair_gt(i, j)
    uv, front = project_points(pts_j, scene.views[i].intrinsics)
    px = np.rint(uv).astype(np.int64)
    inside = valid_j & front & (px[..., 0] >= 0) & (px[..., 0] < W) & (px[..., 1] >= 0) & (px[..., 1] < H)
    return px, inside, pts_j[..., 2]


@pytest.mark.parametrize("offset", [1, 4])
def test_neighbouring_views_overlap_consistently(scene: Scene, offset: int) -> None:
    i, j = 2, 2 + offset
    px, inside, z = _reproject(scene, i, j)
    assert inside.mean() > 0.3
    view_i, view_j = scene.views[i], scene.views[j]
    u, v = px[..., 0][inside], px[..., 1][inside]
    # Visible (not occluded) points land where view i sees the same depth ...
    agree = np.abs(view_i.depth[v, u] - z[inside]) < 0.01 * z[inside]
    assert agree.mean() > 0.6
    # ... and show the same texture there (Lambertian shading is view-independent).
    colour_i = view_i.img[v, u][agree].astype(np.int16)
    colour_j = view_j.img[inside][agree].astype(np.int16)
    same = np.median(np.abs(colour_i - colour_j))
    shuffled = np.median(np.abs(colour_i - np.roll(colour_j, 997, axis=0)))
    assert same < 0.5 * shuffled


def test_pair_gt_frames(scene: Scene) -> None:
    pts_i, valid_i, pts_j, valid_j = scene.pair_gt(0, 1)
    assert pts_i.dtype == pts_j.dtype == np.float32 and pts_i.shape == (H, W, 3)
    # View i's own points in its own frame have z == depth.
    np.testing.assert_allclose(pts_i[..., 2], scene.views[0].depth, rtol=1e-5, atol=1e-6)
    assert np.array_equal(valid_j, scene.views[1].valid)
    assert np.all(pts_j[~valid_j] == 0)


def test_neighbour_spacing_is_small() -> None:
    for seed in range(6):
        poses = [v.cam2world.astype(np.float64) for v in generate_scene(seed, 5, 16, 12).views]
        for a, b in zip(poses, poses[1:]):
            cos = np.clip(a[:3, 2] @ b[:3, 2], -1, 1)
            assert 2.0 < np.degrees(np.arccos(cos)) < 16.0


def test_generate_scenes_and_bad_arguments() -> None:
    scenes = generate_scenes([0, 7], n_views=2, width=32, height=24)
    assert [s.name for s in scenes] == ["gen-00000", "gen-00007"]
    for bad in (dict(seed=-1), dict(seed=0, n_views=0), dict(seed=0, width=0), dict(seed=1.5)):
        with pytest.raises(InputError):
            generate_scene(**bad)


def test_speed_512x384() -> None:
    generate_scene(0, 1, 32, 24)  # textures load once per process; not part of the budget
    start = time.perf_counter()
    generate_scene(21, n_views=8, width=512, height=384)
    assert time.perf_counter() - start < 2.0


def test_stereo_rig_is_a_rectified_slider_over_the_same_room() -> None:
    orbit = generate_scene(5, n_views=4, width=64, height=48)
    stereo = generate_scene(5, n_views=4, width=64, height=48, rig="stereo")
    assert stereo.name == "gen-stereo-00005" and orbit.name == "gen-00005"
    poses = [v.cam2world.astype(np.float64) for v in stereo.views]
    steps = []
    for a, b in zip(poses, poses[1:]):
        assert np.allclose(a[:3, :3], b[:3, :3])  # same orientation: rectified
        move = a[:3, :3].T @ (b[:3, 3] - a[:3, 3])  # in camera coordinates
        assert abs(move[1]) < 1e-5 and abs(move[2]) < 1e-5 and move[0] > 0  # pure sideways
        steps.append(move[0])
    assert np.allclose(steps, steps[0], atol=1e-5) and 0.05 <= steps[0] <= 0.15
    # The middle of the rig is the first arc view (same room, same objects).
    centre = (poses[1][:3, 3] + poses[2][:3, 3]) / 2
    assert np.allclose(centre, orbit.views[0].cam2world[:3, 3], atol=1e-5)
    # The arc scene of a seed does not depend on whether a stereo scene was drawn.
    assert np.array_equal(generate_scene(5, n_views=4, width=64, height=48).views[2].img, orbit.views[2].img)
    with pytest.raises(InputError, match="unknown camera rig"):
        generate_scene(5, rig="dolly")
