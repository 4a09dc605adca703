"""Users' own scenes from a folder, with optional depth and camera ground truth.

Layout (``--data`` points at ``my_data/``)::

    my_data/
      <scene_name>/
        images/*.jpg|jpeg|png   sorted by file name = view order
        depth/<stem>.npz        optional: 'depth' (H x W float, metres;
                                0 or non-finite = invalid), same H x W as
                                the (EXIF-upright) image named <stem>
        cameras.npz             optional: 'intrinsics' (N x 3 x 3, pixels of
                                the original images) and 'cam2world'
                                (N x 4 x 4), in sorted image order

A ``my_data/`` that holds ``images/`` directly is a single scene.

Images go through exactly the preprocessing of ``load_images`` (resize, then
centre crop); depth maps follow the same geometry with nearest-neighbour
sampling, so an invalid pixel never blends into a valid one, and intrinsics are
rescaled and shifted to match. Conventions are the package's: OpenCV cameras,
pixel centres at integer coordinates, depth = camera-frame z (see
``pqk.data.scenes``).

Ground truth (``valid``/``pts3d``) needs both depth and cameras, so a scene
with ``depth/`` but no ``cameras.npz`` is rejected. Without depth, ``valid`` is
all False; without cameras, intrinsics and poses are NaN (unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

# _crop_box is images.py's own crop rule: reusing it keeps depth and intrinsics
# in lockstep with the pixels if that rule ever changes.
from pqk.data.images import _crop_box, load_images
from pqk.data.scenes import Scene, View, depth_to_points
from pqk.errors import InputError

FOLDER_FORMAT = """\
my_data/                  # --data points here
  <scene_name>/
    images/*.jpg|png      # sorted by file name = view order
    depth/<stem>.npz      # optional: 'depth' (HxW float, metres, 0 or non-finite = invalid),
                          #   same HxW as images/<stem>.*
    cameras.npz           # optional: 'intrinsics' (Nx3x3, original image pixels, pixel centres
                          #   at integer coordinates), 'cam2world' (Nx4x4, OpenCV x right,
                          #   y down, z forward), N = number of images, in sorted image order
A folder holding images/ directly is one scene. Depth needs cameras.npz."""

_ORIENTATION_TAG = 0x0112  # EXIF orientation
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees: width and height swap


# --------------------------------------------------------------------------- #
# The geometry of load_images' resize + crop
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Preprocess:
    """How ``resize_and_crop`` maps an image of ``src_size`` (width, height).

    PIL resizes by aligning pixel *edges*, so a source pixel centre u maps to
    ``(u + 0.5) * scale - 0.5``; the crop then subtracts ``left``/``top``.
    """

    src_size: tuple[int, int]
    scale: tuple[float, float]  # (x, y): resized size / source size, per axis
    left: int
    top: int
    size: tuple[int, int]  # (width, height) after the crop


def preprocess_geometry(width: int, height: int, size: int = 512, square_ok: bool = False) -> Preprocess:
    """The resize + centre crop that ``load_images(..., size)`` applies to a width x height image."""
    longest = max(width, height)
    # Same target and rounding as images.resize_and_crop / _resize_long_side.
    target = round(size * max(width / height, height / width)) if size == 224 else size
    resized = tuple(int(round(side * target / longest)) for side in (width, height))
    left, top, right, bottom = _crop_box(resized[0], resized[1], size, square_ok)
    return Preprocess(
        src_size=(width, height),
        scale=(resized[0] / width, resized[1] / height),
        left=int(left),
        top=int(top),
        size=(int(right - left), int(bottom - top)),
    )


def adjust_intrinsics(intrinsics: np.ndarray, geom: Preprocess) -> np.ndarray:
    """Intrinsics of the original image -> intrinsics of the preprocessed image (float32)."""
    K = np.asarray(intrinsics, dtype=np.float64).copy()
    sx, sy = geom.scale
    K[0, :] *= sx
    K[1, :] *= sy
    # (u + 0.5) * s - 0.5 - left, applied to the principal point (K[2, 2] == 1).
    K[0, 2] += 0.5 * sx - 0.5 - geom.left
    K[1, 2] += 0.5 * sy - 0.5 - geom.top
    return K.astype(np.float32)


def _source_index(count: int, offset: int, scale: float, src_len: int) -> np.ndarray:
    """Source pixel nearest to each preprocessed pixel centre along one axis."""
    centres = (np.arange(count) + offset + 0.5) / scale  # in source edge coordinates
    return np.clip(np.floor(centres).astype(np.int64), 0, src_len - 1)


def resample_nearest(array: np.ndarray, geom: Preprocess) -> np.ndarray:
    """Nearest-neighbour resample of a per-pixel map (H, W, ...) into the preprocessed grid."""
    array = np.asarray(array)
    if array.shape[1::-1] != geom.src_size:
        raise InputError(
            f"map of shape {array.shape[:2]} does not match the image size {geom.src_size[::-1]} (HxW)"
        )
    rows = _source_index(geom.size[1], geom.top, geom.scale[1], geom.src_size[1])
    cols = _source_index(geom.size[0], geom.left, geom.scale[0], geom.src_size[0])
    return array[rows[:, None], cols[None, :]]


def preprocessed_view(
    img: np.ndarray,
    depth: np.ndarray | None,
    intrinsics: np.ndarray | None,
    cam2world: np.ndarray | None,
    geom: Preprocess,
) -> View:
    """A View from an already preprocessed image and full-resolution depth/intrinsics.

    ``valid`` and ``pts3d`` are filled only when depth, intrinsics and pose are
    all known; unknown cameras are NaN.
    """
    height, width = img.shape[:2]
    if depth is None or intrinsics is None or cam2world is None:
        unknown_K, unknown_pose = np.full((3, 3), np.nan, np.float32), np.full((4, 4), np.nan, np.float32)
        K = adjust_intrinsics(intrinsics, geom) if intrinsics is not None else unknown_K
        pose = np.asarray(cam2world, np.float32) if cam2world is not None else unknown_pose
        return View(
            img=img,
            depth=np.zeros((height, width), np.float32),
            intrinsics=K,
            cam2world=pose,
            valid=np.zeros((height, width), bool),
            pts3d=np.zeros((height, width, 3), np.float32),
        )
    small = resample_nearest(np.asarray(depth, dtype=np.float32), geom)
    valid = np.isfinite(small) & (small > 0)
    small = np.where(valid, small, np.float32(0))
    K = adjust_intrinsics(intrinsics, geom)
    pose = np.asarray(cam2world, dtype=np.float32)
    return View(
        img=img,
        depth=small,
        intrinsics=K,
        cam2world=pose,
        valid=valid,
        pts3d=depth_to_points(small, K, pose).astype(np.float32),
    )


# --------------------------------------------------------------------------- #
# Reading a folder
# --------------------------------------------------------------------------- #
def _oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, as load_images sees the image (no decoding)."""
    with PIL.Image.open(path) as opened:
        width, height = opened.size
        orientation = opened.getexif().get(_ORIENTATION_TAG, 1)
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in keys if key not in data.files]
            if missing:
                raise InputError(
                    f"{str(path)!r} lacks array(s) {missing} (has {data.files}); see the folder format"
                )
            return {key: np.asarray(data[key]) for key in keys}
    except InputError:
        raise
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {str(path)!r} as an .npz archive: {err}") from None


def _read_cameras(path: Path, n_images: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    arrays = _read_npz(path, ("intrinsics", "cam2world"))
    K, pose = arrays["intrinsics"], arrays["cam2world"]
    if K.ndim != 3 or K.shape[1:] != (3, 3) or pose.ndim != 3 or pose.shape[1:] != (4, 4):
        raise InputError(
            f"{str(path)!r}: expected intrinsics Nx3x3 and cam2world Nx4x4, got {K.shape} and {pose.shape}"
        )
    if len(K) != n_images or len(pose) != n_images:
        raise InputError(
            f"{str(path)!r} has {len(K)} intrinsics and {len(pose)} poses but the scene has {n_images} images"
        )
    return K.astype(np.float64), pose.astype(np.float64)


def _read_depth(path: Path, image: Path, size: tuple[int, int]) -> np.ndarray | None:
    if not path.is_file():
        return None
    depth = _read_npz(path, ("depth",))["depth"]
    if depth.shape != (size[1], size[0]):
        raise InputError(
            f"depth {str(path)!r} has shape {depth.shape} but image {str(image)!r} "
            f"is {size[1]}x{size[0]} (HxW); they must match"
        )
    return depth.astype(np.float32)


def _load_scene(folder: Path, size: int) -> Scene:
    images_dir = folder / "images"
    items = load_images(str(images_dir), size=size)  # InputError when there are none
    paths = [Path(item["path"]) for item in items]
    cameras = _read_cameras(folder / "cameras.npz", len(paths))
    depth_dir = folder / "depth"
    if cameras is None and depth_dir.is_dir() and any(depth_dir.glob("*.npz")):
        raise InputError(
            f"scene {str(folder)!r} has depth/ but no cameras.npz; "
            "depth needs cameras to become 3D ground truth"
        )
    views = []
    for index, (item, path) in enumerate(zip(items, paths)):
        src_size = _oriented_size(path)
        geom = preprocess_geometry(*src_size, size)
        # rgb is uint8 / 255 in float32: rint recovers the exact bytes.
        img = np.rint(item["rgb"] * 255.0).astype(np.uint8)
        depth = _read_depth(depth_dir / f"{path.stem}.npz", path, src_size)
        K, pose = (None, None) if cameras is None else (cameras[0][index], cameras[1][index])
        views.append(preprocessed_view(img, depth, K, pose, geom))
    return Scene(name=folder.name, seed=-1, views=views)


def _scene_folders(root: Path) -> list[Path]:
    if (root / "images").is_dir():
        return [root]
    return sorted(child for child in root.iterdir() if (child / "images").is_dir())


def load_folder_scenes(root: Path, size: int = 512) -> list[Scene]:
    """Every scene under ``root`` (see FOLDER_FORMAT), preprocessed like ``load_images``."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"data folder does not exist: {str(root)!r}")
    if not root.is_dir():
        raise InputError(f"data path is not a folder: {str(root)!r}")
    folders = _scene_folders(root.resolve())
    if not folders:
        raise InputError(f"no scenes in {str(root)!r}: expected <scene>/images/ folders or images/ directly")
    return [_load_scene(folder, size) for folder in folders]


# --------------------------------------------------------------------------- #
# Writing a folder
# --------------------------------------------------------------------------- #
def _has_cameras(scene: Scene) -> bool:
    return all(np.isfinite(v.intrinsics).all() and np.isfinite(v.cam2world).all() for v in scene.views)


def save_folder_scene(scene: Scene, root: Path) -> Path:
    """Write ``scene`` as ``root/<scene.name>/`` in FOLDER_FORMAT; returns that folder.

    Images are PNG (lossless); depth is written for views with any valid
    pixel, cameras when every view's are known.
    """
    if not scene.views:
        raise InputError(f"scene {scene.name!r} has no views to save")
    folder = Path(root) / scene.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(len(scene.views) - 1)))
    cameras = _has_cameras(scene)
    for index, view in enumerate(scene.views):
        stem = f"{index:0{digits}d}"
        image = PIL.Image.fromarray(np.ascontiguousarray(view.img, dtype=np.uint8))
        image.save(folder / "images" / f"{stem}.png")
        if cameras and view.valid.any():
            (folder / "depth").mkdir(exist_ok=True)
            depth = np.where(view.valid, view.depth, 0).astype(np.float32)
            np.savez_compressed(folder / "depth" / f"{stem}.npz", depth=depth)
    if cameras:
        np.savez(
            folder / "cameras.npz",
            intrinsics=np.stack([v.intrinsics for v in scene.views]).astype(np.float32),
            cam2world=np.stack([v.cam2world for v in scene.views]).astype(np.float32),
        )
    return folder


__all__ = [
    "FOLDER_FORMAT",
    "Preprocess",
    "adjust_intrinsics",
    "load_folder_scenes",
    "preprocess_geometry",
    "preprocessed_view",
    "resample_nearest",
    "save_folder_scene",
]
