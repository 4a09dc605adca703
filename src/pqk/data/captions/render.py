"""Rasterising a generated scene description: numpy only, 4x4 supersampling per object.

A description (``ImageTextSet.meta[i]`` of a generated set) fully determines its picture:
positions and radii are in units of the image side (x right, y down, both in [0, 1]), so a
scene is the same at every resolution; the background noise comes from its own ``noise_seed``.
Only +, -, *, / and comparisons touch the pixels (no transcendental functions), so the bytes are
the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np

from pqk.data.captions.vocabulary import COLOUR_RGB

SUPERSAMPLE = 4
# How far a shape reaches from its centre, in units of its radius (bounding boxes, spacing).
EXTENT = 1.25
_BACKGROUND_LEVEL = {"grey": 128.0, "white": 222.0, "black": 38.0}


def _regular_polygon(sides: int, radius: float, start_deg: float) -> np.ndarray:
    """Half-planes (nx, ny, c), inside when nx*p + ny*q <= c, of a regular polygon."""
    apothem = radius * math.cos(math.pi / sides)
    rows = []
    for k in range(sides):
        mid = math.radians(start_deg + (k + 0.5) * 360.0 / sides)
        rows.append((math.cos(mid), math.sin(mid), apothem))
    return np.array(rows)


def _edge(a: tuple[float, float], b: tuple[float, float], inside: tuple[float, float]) -> tuple[float, float, float]:
    """The half-plane bounded by the line a-b that holds the point `inside`."""
    nx, ny = b[1] - a[1], a[0] - b[0]
    c = nx * a[0] + ny * a[1]
    if nx * inside[0] + ny * inside[1] > c:
        nx, ny, c = -nx, -ny, -c
    return (nx, ny, c)


def _star_kites(points: int = 5, outer: float = 1.25, inner: float = 0.55) -> list[np.ndarray]:
    """A star as the union of convex kites (centre, inner vertex, outer tip, inner vertex)."""
    kites = []
    step = 2.0 * math.pi / points
    for k in range(points):
        tip_angle = -math.pi / 2 + k * step  # first tip points up (y down)
        tip = (outer * math.cos(tip_angle), outer * math.sin(tip_angle))
        left = (inner * math.cos(tip_angle - step / 2), inner * math.sin(tip_angle - step / 2))
        right = (inner * math.cos(tip_angle + step / 2), inner * math.sin(tip_angle + step / 2))
        centroid = ((tip[0] + left[0] + right[0]) / 4.0, (tip[1] + left[1] + right[1]) / 4.0)
        kites.append(np.array([_edge((0.0, 0.0), left, centroid), _edge(left, tip, centroid),
                               _edge(tip, right, centroid), _edge(right, (0.0, 0.0), centroid)]))
    return kites


# Convex pieces of each polygonal shape, sized so the shapes look about equally big.
_POLYGONS: dict[str, list[np.ndarray]] = {
    "square": [_regular_polygon(4, 0.86 * math.sqrt(2.0), 45.0)],  # half side 0.86, axis aligned
    "triangle": [_regular_polygon(3, 1.22, -90.0)],  # pointing up
    "hexagon": [_regular_polygon(6, 1.05, 0.0)],  # flat top and bottom
    "star": _star_kites(),
}
_RING_INNER = 0.55


def _inside(shape: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Boolean mask of the samples (p, q), in units of the radius, that the shape covers."""
    if shape in ("circle", "ring"):
        d2 = p * p + q * q
        mask = d2 <= 1.0
        return mask & (d2 >= _RING_INNER * _RING_INNER) if shape == "ring" else mask
    mask = np.zeros(p.shape, dtype=bool)
    for planes in _POLYGONS[shape]:
        piece = np.ones(p.shape, dtype=bool)
        for nx, ny, c in planes:
            piece &= nx * p + ny * q <= c
        mask |= piece
    return mask


def _material(material: str, base: np.ndarray, p: np.ndarray, q: np.ndarray, radius: float) -> np.ndarray:
    """Colour (..., 3) in 0-255 of each sample: flat, shiny (highlight + shading) or striped."""
    if material == "matte":
        return np.broadcast_to(base, (*p.shape, 3))
    if material == "shiny":
        d2 = (p + 0.35) ** 2 + (q + 0.4) ** 2  # highlight up and to the left
        highlight = np.maximum(0.0, 1.0 - d2 / 0.35) ** 2
        shade = np.minimum(d2 / 2.5, 1.0) * 0.35
        colour = base * (1.0 - shade)[..., None]
        return colour + (255.0 - colour) * (0.85 * highlight)[..., None]
    # Striped: diagonal bands of the colour and a darker shade of it, about 0.6 radius wide.
    period = 0.55 + 0.02 / radius
    band = np.floor((p + q) / period) % 2.0
    return base * (1.0 - 0.55 * band)[..., None]


def _background(meta: dict, size: int) -> np.ndarray:
    level = _BACKGROUND_LEVEL[meta["background"]] + float(meta["tone"])
    style = meta["background_style"]
    image = np.full((size, size, 3), level)
    if style == "gradient":
        rows = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
        image = image + (float(meta["gradient"]) * rows)[:, None, None]
    elif style == "noise":
        rng = np.random.default_rng(int(meta["noise_seed"]))
        image = image + (rng.random((size, size, 1)) - 0.5) * 20.0
    return image


def _sample_grid(lo: int, hi: int, size: int) -> np.ndarray:
    """Sample positions (units of the image side) of pixels lo..hi-1, SUPERSAMPLE per pixel."""
    offsets = (np.arange(SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE
    return ((np.arange(lo, hi, dtype=np.float64)[:, None] + offsets[None, :]).reshape(-1)) / size


def _block_mean(array: np.ndarray) -> np.ndarray:
    """Mean over SUPERSAMPLE x SUPERSAMPLE blocks, summed in a fixed order (same bytes anywhere)."""
    s = SUPERSAMPLE
    total = np.zeros_like(array[::s, ::s])
    for dy in range(s):
        for dx in range(s):
            total = total + array[dy::s, dx::s]
    return total / float(s * s)


def _draw_object(image: np.ndarray, obj: dict) -> None:
    size = image.shape[0]
    x, y, r = float(obj["x"]), float(obj["y"]), float(obj["r"])
    x0, x1 = max(0, int((x - EXTENT * r) * size) - 1), min(size, int((x + EXTENT * r) * size) + 2)
    y0, y1 = max(0, int((y - EXTENT * r) * size) - 1), min(size, int((y + EXTENT * r) * size) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    p = ((_sample_grid(x0, x1, size) - x) / r)[None, :]
    q = ((_sample_grid(y0, y1, size) - y) / r)[:, None]
    p, q = np.broadcast_arrays(p, q)
    mask = _inside(obj["shape"], p, q).astype(np.float64)
    colour = _material(obj["material"], np.array(COLOUR_RGB[obj["colour"]], dtype=np.float64), p, q, r)
    alpha = _block_mean(mask)[..., None]
    premultiplied = _block_mean(colour * mask[..., None])
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch * (1.0 - alpha) + premultiplied


def render_scene(meta: dict, image_size: int) -> np.ndarray:
    """The picture (image_size x image_size x 3 uint8 RGB) of a generated scene description."""
    image = _background(meta, image_size)
    for obj in meta["objects"]:
        _draw_object(image, obj)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
