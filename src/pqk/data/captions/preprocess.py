"""CLIP's image preprocessing up to the uint8 crop, with Pillow (shared by photos and folders).

Exactly the geometry of OpenAI CLIP's ``_transform``: resize so the shorter side becomes
``size`` (the longer one ``int(size * long / short)``, truncated, as torchvision computes it)
with bicubic filtering (``PIL.Image.BICUBIC``), centre crop ``size`` x ``size`` at offsets
``int(round((side - size) / 2))``, and only then convert to RGB. No EXIF rotation is applied
(CLIP applies none either). Normalisation for a model is left to the caller
(``pqk.models.clip.preprocess``); sets keep uint8 pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from pqk.errors import InputError


def clip_resize_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """`image` resized (shorter side = size, bicubic), centre-cropped to size x size, RGB uint8 (H, W, 3)."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    resized = image.resize(new, PIL.Image.BICUBIC)
    top = round((new[1] - size) / 2.0)
    left = round((new[0] - size) / 2.0)
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped.convert("RGB"), dtype=np.uint8)


def load_image(path: Path, size: int, where: str = "") -> np.ndarray:
    """The file at `path` through `clip_resize_crop`; a missing file or a file Pillow cannot
    decode is a one-line InputError (prefixed with `where`, e.g. "captions.jsonl line 3: ")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where}image {str(path)!r} does not exist")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return clip_resize_crop(opened, size)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{where}{str(path)!r} is not an image Pillow can read ({first})") from None
