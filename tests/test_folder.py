"""Users' scene folders: format, round trip, preprocessing geometry and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pqk.data.folder import (
    FOLDER_FORMAT,
    adjust_intrinsics,
    load_folder_scenes,
    preprocess_geometry,
    resample_nearest,
    save_folder_scene,
)
from pqk.data.images import resize_and_crop
from pqk.data.scenes import Scene, generate_scene
from pqk.errors import InputError


@pytest.fixture(scope="module")
def scene() -> Scene:
    return generate_scene(8, n_views=3, width=512, height=384)


def _write_images(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> None:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / "images" / f"{index:02d}.png")


def test_round_trip(scene: Scene, tmp_path: Path) -> None:
    folder = save_folder_scene(scene, tmp_path)
    assert folder == tmp_path / scene.name
    (loaded,) = load_folder_scenes(tmp_path)
    assert loaded.name == scene.name and len(loaded.views) == len(scene.views)
    for a, b in zip(scene.views, loaded.views):
        assert np.array_equal(a.img, b.img)
        assert np.array_equal(a.valid, b.valid)
        np.testing.assert_allclose(b.depth, a.depth, rtol=1e-6)
        np.testing.assert_allclose(b.intrinsics, a.intrinsics, rtol=1e-6)
        np.testing.assert_allclose(b.cam2world, a.cam2world, atol=1e-6)
        np.testing.assert_allclose(b.pts3d, a.pts3d, atol=1e-4)


def test_root_holding_images_is_one_scene(scene: Scene, tmp_path: Path) -> None:
    folder = save_folder_scene(scene, tmp_path)
    (loaded,) = load_folder_scenes(folder)
    assert loaded.name == scene.name and loaded.seed == -1


def test_several_scenes_sorted(tmp_path: Path) -> None:
    _write_images(tmp_path / "b", 2)
    _write_images(tmp_path / "a", 3)
    (tmp_path / "notes").mkdir()  # no images/: not a scene
    scenes = load_folder_scenes(tmp_path)
    assert [s.name for s in scenes] == ["a", "b"] and [len(s.views) for s in scenes] == [3, 2]


def test_images_only_has_no_ground_truth(tmp_path: Path) -> None:
    _write_images(tmp_path / "s", 2, (100, 50))
    (scene,) = load_folder_scenes(tmp_path)
    view = scene.views[0]
    assert view.img.shape == (256, 512, 3)  # same as load_images at 512
    assert not view.valid.any() and np.all(view.depth == 0)
    assert np.isnan(view.intrinsics).all() and np.isnan(view.cam2world).all()


SOURCES = [(4032, 3024), (1920, 1080), (800, 533), (3024, 4032), (741, 500), (100, 50), (300, 300)]


@pytest.mark.parametrize("src", SOURCES)
@pytest.mark.parametrize("size", [224, 512])
def test_geometry_matches_resize_and_crop(src: tuple[int, int], size: int) -> None:
    geom = preprocess_geometry(*src, size)
    assert geom.size == resize_and_crop(PIL.Image.new("L", src), size).size


def test_intrinsics_follow_scale_and_crop() -> None:
    # The generator draws the same scene at any size, so a 1024x768 render
    # downscaled by 2, or a 512x392 render cropped to 512x384, must carry the
    # intrinsics of a native 512x384 render.
    native = generate_scene(5, 1, 512, 384).views[0]
    for width, height in ((1024, 768), (512, 392)):
        K = generate_scene(5, 1, width, height).views[0].intrinsics
        adjusted = adjust_intrinsics(K, preprocess_geometry(width, height))
        np.testing.assert_allclose(adjusted, native.intrinsics, rtol=1e-6)
    # A pure crop keeps the rays, so depth is resampled exactly.
    tall = generate_scene(5, 1, 512, 392).views[0]
    cropped = resample_nearest(tall.depth, preprocess_geometry(512, 392))
    np.testing.assert_allclose(cropped, native.depth, rtol=1e-5)


def test_resample_nearest_never_blends() -> None:
    depth = np.zeros((500, 741), dtype=np.float32)
    depth[:, ::2] = 3.0  # alternate valid / invalid columns
    small = resample_nearest(depth, preprocess_geometry(741, 500))
    assert small.shape == (336, 512) and set(np.unique(small)) <= {0.0, 3.0}


def test_downscaled_scene_stays_consistent(tmp_path: Path) -> None:
    big = generate_scene(5, 2, 1024, 768)
    save_folder_scene(big, tmp_path)
    (loaded,) = load_folder_scenes(tmp_path, size=512)
    native = generate_scene(5, 2, 512, 384)
    for a, b in zip(native.views, loaded.views):
        assert b.img.shape == (384, 512, 3)
        close = np.abs(a.depth - b.depth) < 0.01 * a.depth
        assert close.mean() > 0.95  # nearest sampling differs only at depth edges


def test_format_string_mentions_every_file() -> None:
    for part in ("images/", "depth/<stem>.npz", "cameras.npz", "intrinsics", "cam2world"):
        assert part in FOLDER_FORMAT


def _scene_with_cameras(tmp_path: Path, n_cameras: int) -> Path:
    folder = tmp_path / "s"
    _write_images(folder, 2)
    np.savez(folder / "cameras.npz", intrinsics=np.tile(np.eye(3), (n_cameras, 1, 1)),
             cam2world=np.tile(np.eye(4), (n_cameras, 1, 1)))
    return folder


def test_error_root_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_folder_scenes(tmp_path / "nope")


def test_error_no_scenes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no scenes"):
        load_folder_scenes(tmp_path)


def test_error_no_images(tmp_path: Path) -> None:
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "images" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        load_folder_scenes(tmp_path)


def test_error_camera_count(tmp_path: Path) -> None:
    _scene_with_cameras(tmp_path, 3)
    with pytest.raises(InputError, match="2 images"):
        load_folder_scenes(tmp_path)


def test_error_depth_shape(tmp_path: Path) -> None:
    folder = _scene_with_cameras(tmp_path, 2)
    (folder / "depth").mkdir()
    np.savez(folder / "depth" / "00.npz", depth=np.ones((10, 10)))
    with pytest.raises(InputError, match="shape"):
        load_folder_scenes(tmp_path)


def test_error_depth_without_cameras(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    _write_images(folder, 1)
    (folder / "depth").mkdir()
    np.savez(folder / "depth" / "00.npz", depth=np.ones((48, 64)))
    with pytest.raises(InputError, match="cameras.npz"):
        load_folder_scenes(tmp_path)


def test_error_bad_npz(tmp_path: Path) -> None:
    folder = _scene_with_cameras(tmp_path, 2)
    (folder / "cameras.npz").write_text("not an archive")
    with pytest.raises(InputError, match="npz"):
        load_folder_scenes(tmp_path)
    np.savez(folder / "cameras.npz", K=np.eye(3))
    with pytest.raises(InputError, match="lacks"):
        load_folder_scenes(tmp_path)


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        load_folder_scenes(tmp_path / "nope")
    assert "\n" not in str(info.value)
