"""The words of the generated caption set, and the trivial "bag-of-attributes" readers of them.

Objects have a shape, a colour, a size and a material; a scene puts 1-4 of them on a neutral
background. ``caption_attributes`` reads the vocabulary words a text contains (plural shapes and
the synonyms the captions use are mapped to the canonical word); ``scene_attributes`` lists the
words of a scene description; ``image_attributes`` is a hand-written pixel detector (which named
colours cover enough of the picture once the background is removed). The last two are the two
sides of a trivial image-text matcher: a learned model has to beat it clearly.
"""

from __future__ import annotations

import re

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "ring")
# Hue-separated named colours (sRGB 0-255); every one is saturated, backgrounds never are.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 40),
    "green": (50, 170, 60),
    "cyan": (40, 190, 210),
    "blue": (40, 70, 220),
    "purple": (130, 50, 190),
    "pink": (235, 90, 180),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SIZES: tuple[str, ...] = ("small", "large")
MATERIALS: tuple[str, ...] = ("matte", "shiny", "striped")
BACKGROUNDS: tuple[str, ...] = ("grey", "white", "black")
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "noise")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Counting answers are words, 0-4 (a scene holds at most 4 objects).
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")

# (colour, shape) pairs the "train" split never shows (nor names, even in a "no" question); the
# "test" split has them, so generalisation to unseen compositions is measured on their own.
# Each colour once, each shape at least once.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("orange", "ring"), ("yellow", "square"), ("green", "triangle"),
    ("cyan", "circle"), ("blue", "hexagon"), ("purple", "square"), ("pink", "triangle"),
)

# Words some captions use instead of the canonical ones.
SYNONYMS: dict[str, str] = {
    "big": "large", "little": "small", "glossy": "shiny", "flat": "matte", "stripy": "striped",
    "gray": "grey", "disc": "circle", "discs": "circle",
}
PLURALS: dict[str, str] = {shape + "s": shape for shape in SHAPES}

_WORD = re.compile(r"[a-z]+")

# Detector thresholds (documented in image_attributes).
_MIN_SATURATION = 0.3
_MIN_VALUE = 0.2
_MIN_SHARE = 0.004
_BACKGROUND_DISTANCE = 40.0


def vocabulary() -> set[str]:
    """Every attribute word: shapes, colours, sizes and materials."""
    return {*SHAPES, *COLOURS, *SIZES, *MATERIALS}


def canonical_word(word: str) -> str:
    word = word.lower()
    return PLURALS.get(word, SYNONYMS.get(word, word))


def caption_attributes(caption: str) -> set[str]:
    """The vocabulary words found in a text (plurals and synonyms mapped to canonical words)."""
    words = vocabulary()
    return {w for w in (canonical_word(t) for t in _WORD.findall(caption.lower())) if w in words}


def scene_attributes(meta: dict) -> set[str]:
    """The vocabulary words of a generated scene description (``ImageTextSet.meta[i]``)."""
    out: set[str] = set()
    for obj in meta.get("objects", []):
        out.update((obj["shape"], obj["colour"], obj["size"], obj["material"]))
    return out


def _hue_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV of (..., 3) floats in [0, 1]; hue in degrees [0, 360)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    saturation = np.where(high > 0, span / np.where(high > 0, high, 1.0), 0.0)
    return hue * 60.0, saturation, high


_NAMED_HUES = _hue_saturation_value(np.array(list(COLOUR_RGB.values()), dtype=np.float64) / 255.0)[0]


def image_attributes(image: np.ndarray) -> set[str]:
    """Named colours a plain colour histogram finds in an image (H x W x 3 uint8 RGB).

    The background colour is the median of the border pixels; pixels within 40 levels
    (Euclidean RGB) of it are dropped, and so are unsaturated (S < 0.3) or dark (V < 0.2)
    pixels. Each remaining pixel votes for the named colour of nearest hue; a colour covering
    more than 0.4% of the image is reported. Only colours: it sees no shapes, sizes or materials.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image_attributes expects an H x W x 3 array; got shape {pixels.shape}")
    rgb = pixels.astype(np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    hue, saturation, value = _hue_saturation_value(rgb / 255.0)
    keep = (np.sqrt(((rgb - background) ** 2).sum(axis=-1)) > _BACKGROUND_DISTANCE)
    keep &= (saturation >= _MIN_SATURATION) & (value >= _MIN_VALUE)
    if not keep.any():
        return set()
    distance = np.abs(hue[keep][:, None] - _NAMED_HUES[None, :])
    distance = np.minimum(distance, 360.0 - distance)
    votes = np.bincount(distance.argmin(axis=1), minlength=len(COLOURS))
    share = votes / float(pixels.shape[0] * pixels.shape[1])
    return {COLOURS[k] for k in np.nonzero(share > _MIN_SHARE)[0]}
