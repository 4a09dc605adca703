"""The official CLIP image preprocessing, with Pillow (clip-facts.md section 6).

Resize the shorter side to n_px with PIL's own bicubic (a = -0.5, antialiased, uint8 two-pass:
torch's bicubic differs by up to 8-19 grey levels), centre-crop n_px x n_px with Python's
round-half-to-even offsets, convert to RGB after the crop (alpha dropped, not composited), scale
to [0, 1], normalise with the OpenAI mean and std. torchvision is not needed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pqk.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, n_px: int) -> tuple[int, int]:
    """(new_width, new_height): the shorter side becomes n_px, the longer int(n_px * long / short)
    (truncated, as torchvision computes it)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = n_px, int(n_px * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_box(width: int, height: int, n_px: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop; round() is half-to-even, as official."""
    top = round((height - n_px) / 2.0)
    left = round((width - n_px) / 2.0)
    return left, top, left + n_px, top + n_px


def to_unit_tensor(image: Image.Image, n_px: int) -> torch.Tensor:
    """Resize, centre-crop, RGB, /255: a float32 (3, n_px, n_px) tensor in [0, 1], not normalised."""
    if not isinstance(image, Image.Image):
        raise InputError(f"preprocess_image takes a PIL image, got {type(image).__name__}")
    if isinstance(n_px, bool) or not isinstance(n_px, int) or n_px < 1:
        raise InputError(f"n_px must be a positive integer, got {n_px!r}")
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"image is empty ({width}x{height} pixels)")
    size = resized_size(width, height, n_px)
    if size != image.size:  # torchvision skips the resize when the size already matches
        image = image.resize(size, Image.Resampling.BICUBIC)
    image = image.crop(crop_box(*image.size, n_px)).convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(unit: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel, for (3, H, W) or (N, 3, H, W) tensors in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, dtype=unit.dtype, device=unit.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=unit.dtype, device=unit.device)[:, None, None]
    return (unit - mean) / std


def preprocess_image(image: Image.Image, n_px: int) -> torch.Tensor:
    """The official `_transform(n_px)`: a normalised float32 (3, n_px, n_px) tensor. n_px is the
    model's `visual.input_resolution` (224 for ViT-B/16 and ViT-L/14, 336 for ViT-L/14@336)."""
    return normalize(to_unit_tensor(image, n_px))
