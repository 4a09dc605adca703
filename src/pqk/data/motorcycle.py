"""The Middlebury 2014 "Motorcycle" pair bundled with scikit-image, as a Scene with ground truth.

scikit-image ships the pair at 741 x 500, the full 2964 x 2000 images
downscaled by exactly 4 (``downscale_local_mean``), with the left image's
disparity (+inf = unknown). Its documented calibration is the full-size
``calib.txt`` divided by 4 (f 3979.911 -> 994.978, cx 1244.772 -> 311.193,
cy 1019.507 -> 254.877, doffs 124.343 -> 31.086), so it already belongs to
these images and needs no further scaling. One refinement: block-averaging by
4 moves pixel centres, so with pixel centres at integer coordinates (our
convention, assumed for the full-size calibration too) a full-size
coordinate c becomes
``(c + 0.5) / 4 - 0.5 = c / 4 - 0.375``. We apply that to cx and cy; doffs is
a difference of two principal points and disparities are differences of
columns, so neither changes.

Geometry: rectified pair, left camera at the origin, right camera translated
by +baseline along x, depth Z = baseline * f / (d + doffs) in metres. The right
camera's principal point is cx + doffs (that is what doffs means). The right
image has no ground truth of its own; its depth comes from forward-warping the
left disparity (x_r = x_l - d) with a z-buffer, holes left invalid.

Everything is returned in the geometry of ``load_images(..., size)``.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image

from pqk.data.folder import preprocess_geometry, preprocessed_view
from pqk.data.images import resize_and_crop
from pqk.data.scenes import Scene, View

NAME = "middlebury-motorcycle"
FOCAL = 994.978  # px, for the 741 x 500 images
PRINCIPAL_X = 311.193 - 0.375  # see module docstring: centre shift of the 4x downscale
PRINCIPAL_Y = 254.877 - 0.375
DOFFS = 31.086  # px, x-difference of the two principal points
BASELINE = 0.193001  # metres
# Neighbouring left pixels whose disparities differ by more than this are
# taken to be on different surfaces, so the warp does not stretch across the gap.
_SAME_SURFACE = 1.0


def _left_intrinsics() -> np.ndarray:
    return np.array([[FOCAL, 0.0, PRINCIPAL_X], [0.0, FOCAL, PRINCIPAL_Y], [0.0, 0.0, 1.0]])


def _right_intrinsics() -> np.ndarray:
    K = _left_intrinsics()
    K[0, 2] += DOFFS
    return K


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """Middlebury disparity (px, non-finite = unknown) -> depth in metres (0 = unknown)."""
    ok = np.isfinite(disparity)
    safe = np.where(ok, disparity, 0.0)
    return np.where(ok, BASELINE * FOCAL / (safe + DOFFS), 0.0).astype(np.float32)


def _segment_splats(disp: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, ...]:
    """Right-image pixels covered by each left scanline segment, with interpolated disparity.

    Warping pixel centres alone leaves cracks where a surface stretches in the
    right view; warping the segment between two neighbours on the same
    surface fills every integer column it covers.
    """
    pair = ok[:, :-1] & ok[:, 1:] & (np.abs(disp[:, 1:] - disp[:, :-1]) <= _SAME_SURFACE)
    rows, cols = np.nonzero(pair)
    d0, d1 = disp[rows, cols], disp[rows, cols + 1]
    x0, x1 = cols - d0, cols + 1 - d1  # x1 - x0 = 1 - (d1 - d0), in [0, 2]
    first = np.ceil(x0)
    out_rows, out_cols, out_disp = [], [], []
    for step in range(3):  # a segment at most 2 px long covers at most 3 integers
        x = first + step
        keep = x <= x1
        span = np.where(x1 > x0, x1 - x0, 1.0)
        weight = (x - x0) / span
        out_rows.append(rows[keep])
        out_cols.append(x[keep].astype(np.int64))
        out_disp.append((d0 + weight * (d1 - d0))[keep])
    return np.concatenate(out_rows), np.concatenate(out_cols), np.concatenate(out_disp)


def _zbuffer(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Largest disparity (= nearest surface) landing on each pixel; -inf where none."""
    height, width = shape
    inside = (cols >= 0) & (cols < width)
    buffer = np.full(height * width, -np.inf)
    np.maximum.at(buffer, rows[inside] * width + cols[inside], disp[inside])
    return buffer.reshape(shape)


def warp_disparity_to_right(disparity: np.ndarray) -> np.ndarray:
    """Right-view disparity from the left one by forward warping (NaN = hole)."""
    ok = np.isfinite(disparity)
    disp = np.where(ok, disparity, 0.0).astype(np.float64)
    right = _zbuffer(disp.shape, *_segment_splats(disp, ok))
    # Isolated pixels (no same-surface neighbour) still land at their nearest column,
    # but only where the exact segment interpolation left a hole.
    rows, cols = np.nonzero(ok)
    nearest = _zbuffer(disp.shape, rows, np.rint(cols - disp[rows, cols]).astype(np.int64), disp[rows, cols])
    right = np.where(np.isfinite(right), right, nearest)
    return np.where(np.isfinite(right), right, np.nan)


@functools.lru_cache(maxsize=1)
def _raw_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from skimage import data  # lazy: importing skimage is slow

    left, right, disparity = data.stereo_motorcycle()
    return np.asarray(left, np.uint8), np.asarray(right, np.uint8), np.asarray(disparity, np.float64)


def _view(img: np.ndarray, depth: np.ndarray, K: np.ndarray, offset_x: float, size: int) -> View:
    geom = preprocess_geometry(img.shape[1], img.shape[0], size)
    # The very call load_images makes, so pixels are identical.
    small = np.asarray(resize_and_crop(PIL.Image.fromarray(img, mode="RGB"), size), dtype=np.uint8)
    pose = np.eye(4)
    pose[0, 3] = offset_x
    return preprocessed_view(small, depth, K, pose, geom)


def motorcycle_scene(size: int = 512) -> Scene:
    """The two-view Motorcycle scene, preprocessed like ``load_images(..., size)``; depth in metres."""
    left, right, disparity = _raw_pair()
    right_disparity = warp_disparity_to_right(disparity)
    views = [
        _view(left, disparity_to_depth(disparity), _left_intrinsics(), 0.0, size),
        _view(right, disparity_to_depth(right_disparity), _right_intrinsics(), BASELINE, size),
    ]
    return Scene(name=NAME, seed=-1, views=views)
