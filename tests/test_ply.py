"""PLY output must round-trip through our reader and through trimesh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pqk.errors import InputError
from pqk.io.ply import read_ply, read_ply_points, write_ply

trimesh = pytest.importorskip("trimesh")


def _cloud(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.random((n, 3))


def test_roundtrip_with_float_colors(tmp_path: Path) -> None:
    points, colors = _cloud()
    path = tmp_path / "cloud.ply"
    write_ply(path, points, colors)
    np.testing.assert_array_equal(read_ply_points(path), points)
    loaded = trimesh.load(path)
    assert isinstance(loaded, trimesh.PointCloud)
    np.testing.assert_allclose(loaded.vertices, points, rtol=0, atol=0)
    expected = np.round(colors * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(loaded.colors)[:, :3], expected)
    _, ours = read_ply(path)
    np.testing.assert_array_equal(ours, expected)


def test_uint8_colors_preserved(tmp_path: Path) -> None:
    points, _ = _cloud(4)
    colors = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [12, 34, 56]], dtype=np.uint8)
    path = tmp_path / "c.ply"
    write_ply(path, points, colors)
    np.testing.assert_array_equal(np.asarray(trimesh.load(path).colors)[:, :3], colors)


def test_without_colors(tmp_path: Path) -> None:
    points, _ = _cloud(10)
    path = tmp_path / "plain.ply"
    write_ply(path, points.astype(np.float64))
    pts, cols = read_ply(path)
    np.testing.assert_array_equal(pts, points)
    assert cols is None
    np.testing.assert_allclose(trimesh.load(path).vertices, points)


def test_atomic_write_leaves_no_temp_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "cloud.ply"
    write_ply(path, *_cloud(5))
    write_ply(path, *_cloud(7))
    assert read_ply_points(path).shape == (7, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud.ply"]


def test_float_colors_are_clipped(tmp_path: Path) -> None:
    path = tmp_path / "clip.ply"
    write_ply(path, np.zeros((2, 3)), np.array([[-0.5, 0.5, 1.5], [1.0, 0.0, 0.2]]))
    np.testing.assert_array_equal(read_ply(path)[1], [[0, 128, 255], [255, 0, 51]])


@pytest.mark.parametrize(
    ("points", "colors"),
    [
        (np.zeros((4, 2)), None),
        (np.zeros((4, 3)), np.zeros((3, 3))),
        (np.array([[0.0, np.nan, 0.0]]), None),
        (np.zeros((1, 3)), np.array([[300, 0, 0]])),
    ],
)
def test_bad_inputs(tmp_path: Path, points: np.ndarray, colors: np.ndarray | None) -> None:
    with pytest.raises(InputError):
        write_ply(tmp_path / "bad.ply", points, colors)
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output folder"):
        write_ply(tmp_path / "nope" / "x.ply", np.zeros((1, 3)))
