"""The surface textures of generated scenes: bundled scikit-image photographs, loaded
once per process and packed into one atlas that a single gather can sample."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Bundled (never downloaded) scikit-image photographs with enough structure to
# match on; mostly-black or binary ones (hubble, horse, retina) are left out.
TEXTURE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "camera",
    "coins", "moon", "text", "page", "immunohistochemistry", "cell", "clock",
)


@functools.lru_cache(maxsize=None)
def _load_texture(name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) uint8; loaded once per process."""
    from skimage import data  # lazy: importing skimage is slow

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


@dataclass(frozen=True)
class _Atlas:
    """All textures flattened into one (N, 3) table so one gather serves every surface."""

    texels: np.ndarray  # (sum H*W, 3) uint8
    base: np.ndarray  # (T,) first row of each texture
    width: np.ndarray  # (T,)
    height: np.ndarray  # (T,)
    grey: np.ndarray  # (T,) bool: tinted more strongly, they have no colour of their own


@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    images = [_load_texture(name) for name in TEXTURE_NAMES]
    sizes = np.array([img.shape[0] * img.shape[1] for img in images])
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    grey = np.array([np.array_equal(img[..., 0], img[..., 1]) for img in images])
    return _Atlas(
        texels=np.concatenate([img.reshape(-1, 3) for img in images]),
        # int32 halves the memory traffic of the per-pixel index arithmetic.
        base=base.astype(np.int32),
        width=np.array([img.shape[1] for img in images], dtype=np.int32),
        height=np.array([img.shape[0] for img in images], dtype=np.int32),
        grey=grey,
    )


def _mirror(index: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Mirrored tiling: no hard seam where a texture repeats."""
    m = np.mod(index, 2 * size)
    return np.where(m < size, m, 2 * size - 1 - m)
