"""Image loading and preprocessing that reproduces DUSt3R's ``load_images``.

The network only accepts sides that are multiples of its 16-px patch, and the
released checkpoints were trained on specific resolutions, so images are
resized and centre-cropped with exactly the official rules (see
``shared/design/dust3r-facts.md`` §2). Pixel-level agreement matters: a
different filter or rounding shifts every prediction.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

from pqk.errors import InputError

try:  # HEIC support is optional, exactly as upstream.
    import pillow_heif  # type: ignore[import-not-found]

    pillow_heif.register_heif_opener()
    _HEIF_EXTENSIONS: tuple[str, ...] = (".heic", ".heif")
except ImportError:
    _HEIF_EXTENSIONS = ()

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png") + _HEIF_EXTENSIONS
SUPPORTED_SIZES: tuple[int, ...] = (224, 512)
PATCH_SIZE = 16

ImageSource = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #
def _resize_long_side(img: PIL.Image.Image, long_side: int) -> PIL.Image.Image:
    """Scale so the longest side becomes ``long_side`` (official rounding/filter)."""
    longest = max(img.size)
    # LANCZOS avoids aliasing when shrinking; upstream uses BICUBIC otherwise.
    resample = PIL.Image.LANCZOS if longest > long_side else PIL.Image.BICUBIC
    # Python's round() (half to even) is what upstream uses; keep it.
    new_size = tuple(int(round(side * long_side / longest)) for side in img.size)
    return img.resize(new_size, resample)


def _crop_box(width: int, height: int, size: int, square_ok: bool) -> tuple[int, int, int, int]:
    """Centred crop box for an already resized image of ``width`` x ``height``."""
    cx, cy = width // 2, height // 2
    if size == 224:
        half = min(cx, cy)
        return (cx - half, cy - half, cx + half, cy + half)
    # Even side, then rounded down to a multiple of the patch size.
    halfw = ((2 * cx) // PATCH_SIZE) * (PATCH_SIZE // 2)
    halfh = ((2 * cy) // PATCH_SIZE) * (PATCH_SIZE // 2)
    if width == height and not square_ok:
        # The 512 checkpoints never saw squares: upstream turns them into 4:3.
        # Upstream keeps 3*halfw/4 as a float and PIL rounds it; halfw is a
        # multiple of 8, so int(round()) gives the same integer.
        halfh = int(round(3 * halfw / 4))
    return (cx - halfw, cy - halfh, cx + halfw, cy + halfh)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < PATCH_SIZE:
        raise InputError(f"size must be an integer >= {PATCH_SIZE}, e.g. 224 or 512 (got {size!r})")


def resize_and_crop(img: PIL.Image.Image, size: int, square_ok: bool = False) -> PIL.Image.Image:
    """Resize and centre-crop ``img`` like DUSt3R's ``load_images``.

    ``size == 224``: the short side becomes about 224, then a centred square.
    Any other size (512 in practice): the long side becomes ``size``, then a
    centred crop to multiples of 16; a square input becomes 4:3 landscape
    unless ``square_ok``. The result may be smaller than 16 px on one side
    for extreme aspect ratios; ``load_images`` rejects those.
    """
    _check_size(size)
    width, height = img.size
    if size == 224:
        target = round(size * max(width / height, height / width))
    else:
        target = size
    resized = _resize_long_side(img, target)
    return resized.crop(_crop_box(*resized.size, size, square_ok))


def normalize(img: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (1, 3, H, W) in [-1, 1].

    Same operations and order as torchvision's ToTensor + Normalize(0.5, 0.5),
    so values are bit-identical to upstream.
    """
    return normalize_array(np.asarray(img.convert("RGB"), dtype=np.uint8)).unsqueeze(0).contiguous()


def normalize_array(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> float32 tensor (3, H, W) in [-1, 1], as `normalize`."""
    x = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(torch.float32) / 255.0
    return (x - 0.5) / 0.5


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
def _has_image_extension(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(folder: Path) -> list[Path]:
    """Image files of ``folder`` in sorted file-name order (non-images skipped)."""
    names = sorted(os.listdir(folder))
    files = [folder / name for name in names if _has_image_extension(folder / name)]
    files = [path for path in files if path.is_file()]
    if not files:
        accepted = ", ".join(IMAGE_EXTENSIONS)
        raise InputError(f"no images in folder {str(folder)!r} (accepted extensions: {accepted})")
    return files


def _expand_sources(sources: Any) -> list[ImageSource]:
    """Turn the user's ``sources`` argument into a flat list of single images."""
    if isinstance(sources, (str, os.PathLike)):
        path = Path(sources)
        if not path.exists():
            raise InputError(f"image path does not exist: {str(path)!r}")
        if path.is_dir():
            return list(_list_folder(path))
        return [path]
    if isinstance(sources, (PIL.Image.Image, np.ndarray)):
        return [sources]
    if isinstance(sources, Sequence):
        return list(sources)
    raise InputError(
        f"cannot read images from {type(sources).__name__}; "
        "give a folder, a list of image paths, PIL images or HxWx3 uint8 arrays"
    )


def _open_file(path: Path) -> PIL.Image.Image:
    """Open an image file as upright RGB, or raise a one-line InputError."""
    if not path.exists():
        raise InputError(f"image path does not exist: {str(path)!r}")
    if path.is_dir():
        raise InputError(f"expected an image file but got a folder inside the list: {str(path)!r}")
    if not _has_image_extension(path):
        accepted = ", ".join(IMAGE_EXTENSIONS)
        raise InputError(f"unsupported image type {path.suffix!r} for {str(path)!r} (accepted: {accepted})")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # PIL is lazy: force decoding so corrupt files fail here
            # Phone photos store rotation as a tag; upstream applies it.
            upright = ImageOps.exif_transpose(opened)
            return upright.convert("RGB")
    except PermissionError:
        raise InputError(f"no permission to read image: {str(path)!r}") from None
    except PIL.Image.DecompressionBombError as err:
        raise InputError(f"image too large to decode safely: {str(path)!r} ({err})") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"not an image (PIL cannot read it): {str(path)!r}") from None


def _array_to_pil(array: np.ndarray, position: int) -> PIL.Image.Image:
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(
            f"in-memory image #{position} has shape {array.shape} and dtype {array.dtype}; "
            "expected an HxWx3 uint8 array"
        )
    return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _to_pil(source: ImageSource, position: int) -> tuple[PIL.Image.Image, str | None]:
    """One source -> (RGB image, file path or None for in-memory images)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_file(Path(source)), str(source)
    if isinstance(source, PIL.Image.Image):
        return source.convert("RGB"), None
    if isinstance(source, np.ndarray):
        return _array_to_pil(source, position), None
    raise InputError(
        f"image #{position} is a {type(source).__name__}; "
        "expected a file path, a PIL image or an HxWx3 uint8 array"
    )


def _describe(path: str | None, position: int) -> str:
    return repr(path) if path is not None else f"in-memory image #{position}"


def _load_one(source: ImageSource, idx: int, size: int, square_ok: bool, verbose: bool) -> dict:
    img, path = _to_pil(source, idx)
    original = img.size
    cropped = resize_and_crop(img, size, square_ok)
    width, height = cropped.size
    if width < PATCH_SIZE or height < PATCH_SIZE:
        raise InputError(
            f"image {_describe(path, idx)} of size {original[0]}x{original[1]} becomes "
            f"{width}x{height} after preprocessing, smaller than one {PATCH_SIZE}-px patch; "
            "use a less elongated image"
        )
    if verbose:
        print(
            f" - adding {_describe(path, idx)} with resolution "
            f"{original[0]}x{original[1]} --> {width}x{height}",
            file=sys.stderr,
        )
    return {
        "img": normalize(cropped),
        "true_shape": torch.tensor([[height, width]], dtype=torch.int32),
        "idx": idx,
        "instance": str(idx),
        # Kept for coloured point clouds; equals img * 0.5 + 0.5 up to rounding.
        "rgb": np.asarray(cropped, dtype=np.float32) / 255.0,
        "path": path,
    }


def load_images(
    sources: Any,
    size: int = 512,
    square_ok: bool = False,
    verbose: bool = False,
) -> list[dict]:
    """Load and preprocess images for DUSt3R.

    ``sources`` is a folder (its jpg/jpeg/png files in sorted name order,
    other files skipped), a single file, or a list mixing file paths, PIL
    images and HxWx3 uint8 arrays. Each result dict holds ``img`` (1,3,H,W
    float32 in [-1,1]), ``true_shape`` (int32 [[H, W]]), ``idx``,
    ``instance`` (``str(idx)``), ``rgb`` (H,W,3 float32 in [0,1]) and
    ``path`` (str or None). Raises InputError for any bad input. Does not
    require two images; callers decide that.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size not in SUPPORTED_SIZES:
        raise InputError(f"size must be 224 or 512 (got {size!r})")
    items = _expand_sources(sources)
    if not items:
        raise InputError("no images given; give a folder or a list of image files")
    if verbose:
        print(f">> Loading {len(items)} image(s) at size {size}", file=sys.stderr)
    return [_load_one(item, idx, size, square_ok, verbose) for idx, item in enumerate(items)]


def motorcycle_pair() -> list[np.ndarray]:
    """The bundled (offline) Middlebury motorcycle stereo pair as uint8 arrays."""
    from skimage import data  # imported lazily: skimage is slow to import

    left, right, _disparity = data.stereo_motorcycle()
    return [np.asarray(left, dtype=np.uint8), np.asarray(right, dtype=np.uint8)]
