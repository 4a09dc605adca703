"""A generated compositional image-text set: simple shapes on plain backgrounds, with captions,
zero-shot classes and VQA items read off each scene's description. Offline, fast, exact.

A scene is 1-4 objects on a grey, white or black background (plain, vertical gradient, or light
noise). An object has a shape (6), a colour (8), a size (small/large) and a material (matte,
shiny, striped); a scene may hold several objects of one kind ("two green triangles"). Spatial
relations (left of / right of / above / below) are read from centres and stated only when clear
(see ``describe.relation``).

Zero-shot classes are colour + shape of the largest object (48 classes, "red circle", ...).
Shape alone would be 6 classes; colour + shape is what the held-out compositions vary, so the
test split's zero-shot accuracy on held-out classes measures whether a model composes words it
saw separately. The largest object is unambiguous: it is large and at least 1.25 times the
radius of every object of another kind. Prompts are several templates; zero-shot averages the
text embeddings of every prompt of a class.

Held-out compositions (``HELD_OUT``, 8 of the 48 colour-shape pairs): the "train" split never
draws them (nor names them in a question); "test" does, and marks the images holding one with
``meta[i]["held_out"] = True`` (``"held_out_label"`` when it is the class). Each image has its
own random stream, seeded by (seed, split, index): train and test never share a scene, image i
is the same whatever n, and the description is the same at every image size.
"""

from __future__ import annotations

import numpy as np
import torch

from pqk.data.captions.describe import make_captions, make_questions, scene_relations
from pqk.data.captions.render import EXTENT, render_scene
from pqk.data.captions.types import ImageTextSet, VQAItem
from pqk.data.captions.vocabulary import (
    BACKGROUND_STYLES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    MATERIALS,
    SHAPES,
)
from pqk.errors import InputError

SPLITS = {"train": 0, "test": 1}
CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
PROMPTS: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a {} on a plain background.",
    "a rendering of a {}.",
    "the largest shape is a {}.",
]
_N_OBJECTS = (1, 2, 3, 4)
_N_OBJECTS_P = (0.2, 0.3, 0.3, 0.2)
_GROUP_P = 0.35  # chance that a scene of >= 2 objects holds several of one kind
_MAIN_R = (0.15, 0.19)  # radii in units of the image side
_LARGE_R = (0.11, 0.145)
_SMALL_R = (0.07, 0.095)
_SPACING = 0.03
_TRIES = 100
_HELD = set(HELD_OUT)


def _draw_kind(rng: np.random.Generator, split: str, taken: set[tuple[str, str]]) -> tuple[str, str, str]:
    while True:
        colour, shape = COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        if (colour, shape) in taken or (split == "train" and (colour, shape) in _HELD):
            continue
        taken.add((colour, shape))
        return colour, shape, MATERIALS[int(rng.integers(len(MATERIALS)))]


def _place(rng: np.random.Generator, r: float, placed: list[dict]) -> tuple[float, float] | None:
    margin = EXTENT * r + 0.01
    for _ in range(_TRIES):
        x, y = rng.uniform(margin, 1.0 - margin, size=2)
        if all((x - o["x"]) ** 2 + (y - o["y"]) ** 2 >= (EXTENT * (r + o["r"]) + _SPACING) ** 2 for o in placed):
            return float(x), float(y)
    return None


def draw_scene(seed: int, split: str, index: int) -> tuple[dict, np.random.Generator]:
    """The description of scene `index` of (seed, split) (objects, background, relations), and
    its random stream, which the caption and question draws continue."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n_objects = int(rng.choice(_N_OBJECTS, p=_N_OBJECTS_P))
    taken: set[tuple[str, str]] = set()
    main = _draw_kind(rng, split, taken)
    main_r = float(rng.uniform(*_MAIN_R))
    group = int(rng.integers(2, min(3, n_objects) + 1)) if n_objects >= 2 and rng.random() < _GROUP_P else 1
    group_is_main = group > 1 and rng.random() < 0.5
    # (colour, shape, material, size name, radius range) of each object, the main kind first.
    wanted = [(*main, "large", (main_r, main_r))]
    wanted += [(*main, "large", _MAIN_R)] * (group - 1 if group_is_main else 0)
    remaining = n_objects - len(wanted)
    while remaining > 0:
        kind = _draw_kind(rng, split, taken)
        large = rng.random() < 0.5
        size, radii = ("large", (_LARGE_R[0], min(_LARGE_R[1], main_r / 1.25))) if large else ("small", _SMALL_R)
        copies = group if (group > 1 and not group_is_main and remaining >= group) else 1
        wanted += [(*kind, size, radii)] * copies
        group = 1 if copies > 1 else group
        remaining -= copies
    objects: list[dict] = []
    for colour, shape, material, size, radii in wanted:
        r = round(float(rng.uniform(*radii)), 4)
        at = _place(rng, r, objects)
        if at is None:
            continue  # no room: the scene has one object fewer (never the main one, placed first)
        objects.append({"shape": shape, "colour": colour, "size": size, "material": material,
                        "x": round(at[0], 4), "y": round(at[1], 4), "r": r})
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    style = BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    tone = int(rng.integers(-12, 13))
    gradient = round(float(rng.uniform(20.0, 45.0) * (1 if rng.random() < 0.5 else -1)), 3)
    noise_seed = int(rng.integers(2**62))
    held = [(o["colour"], o["shape"]) in _HELD for o in objects]
    return {
        "index": index, "split": split, "seed": seed,
        "background": background, "background_style": style, "tone": tone, "gradient": gradient,
        "noise_seed": noise_seed, "objects": objects, "relations": scene_relations(objects),
        "label": f"{objects[0]['colour']} {objects[0]['shape']}",
        "held_out": any(held), "held_out_label": held[0],
    }, rng


def _check(n: int, seed: int, split: str, image_size: int) -> None:
    for name, value, low in (("n", n, 0), ("seed", seed, 0), ("image_size", image_size, 8)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"generate_caption_set: {name} must be a whole number >= {low}; got {value!r}")
    if split not in SPLITS:
        raise InputError(f"generate_caption_set: split {split!r} is not known; accepted: {', '.join(SPLITS)}")


def generate_caption_set(n: int, seed: int, split: str = "train", image_size: int = 64) -> ImageTextSet:
    """`n` generated scenes of (seed, split) at image_size x image_size, with 3 captions each,
    4-5 VQA items each, and a zero-shot label each (see the module docstring)."""
    _check(n, seed, split, image_size)
    images = np.empty((int(n), int(image_size), int(image_size), 3), dtype=np.uint8)
    captions, labels, vqa, meta = [], [], [], []
    for index in range(int(n)):
        scene, rng = draw_scene(int(seed), split, index)
        images[index] = render_scene(scene, int(image_size))
        captions.append(make_captions(scene, rng))
        for question, answer, kind, choices in make_questions(scene, rng, split):
            vqa.append(VQAItem(index, question, answer, kind, choices))
        labels.append(CLASS_NAMES.index(scene["label"]))
        meta.append(scene)
    return ImageTextSet(
        name=f"generated-{split}-s{seed}-n{n}",
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        captions=captions,
        class_names=list(CLASS_NAMES),
        labels=labels,
        prompts=list(PROMPTS),
        vqa=vqa,
        meta=meta,
    )
