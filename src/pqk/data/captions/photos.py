"""Real photographs bundled inside installed packages, with hand-written captions.

TINY on purpose: 10 photographs. It is a sanity check that a model trained on generated scenes
does something sensible on real photos (and that a released CLIP scores them well), not a
benchmark. Nothing is downloaded: the files are read from the installed wheels of scikit-image
(``skimage/data``: astronaut, chelsea, coffee, rocket, camera, coins, the Middlebury motorcycle's
left view), scikit-learn (``sklearn/datasets/images``: china, flower) and matplotlib
(``mpl-data/sample_data/grace_hopper.jpg``), without importing those packages. Each image's
source and licence are in its ``meta``. Left out: scikit-image's textures (brick, grass,
gravel), binary or synthetic images (horse, logo, text, page, chessboard), microscopy and
medical images (cell, ihc, retina, microaneurysms), the motion-blurred clock, moon and the
Hubble deep field.

Captions were written by looking at the pictures, and hold for the square centre crop.
Preprocessing is CLIP's (``preprocess.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from pqk.data.captions.preprocess import load_image
from pqk.data.captions.types import ImageTextSet, VQAItem
from pqk.errors import InputError

CLASS_NAMES = ["person", "cat", "coffee cup", "rocket", "coins", "motorcycle", "temple", "flower"]
PROMPTS = ["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a good photo of the {}."]
_OTHER_COLOURS = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow"]
_NUMBERS = ["zero", "one", "two", "three", "four"]

# name, package and file inside it, zero-shot class, captions, questions [(question, answer)], source, licence
PHOTOS: list[dict] = [
    {"name": "astronaut", "package": "skimage", "file": "data/astronaut.png", "class": "person",
     "captions": ["a portrait of a smiling astronaut in an orange spacesuit.",
                  "a woman astronaut with short blond hair beside an american flag and a model space shuttle.",
                  "an official nasa portrait of astronaut eileen collins with a helmet in front of her."],
     "questions": [("is there a person?", "yes"), ("is there a cat?", "no"), ("is there a flag?", "yes"),
                   ("what colour is the suit?", "orange")],
     "source": "NASA Great Images (Eileen Collins), via scikit-image",
     "licence": "public domain (NASA; scikit-image: no known copyright restrictions)"},
    {"name": "chelsea", "package": "skimage", "file": "data/chelsea.png", "class": "cat",
     "captions": ["a close-up of a tabby cat's face with green eyes.",
                  "a brown striped cat looking at the camera.",
                  "the face of a cat with a pink nose and long white whiskers."],
     "questions": [("is there a cat?", "yes"), ("is there a dog?", "no"), ("how many cats are there?", "one")],
     "source": "Chelsea the cat, by Stefan van der Walt, via scikit-image",
     "licence": "CC0 (Stefan van der Walt)"},
    {"name": "coffee", "package": "skimage", "file": "data/coffee.png", "class": "coffee cup",
     "captions": ["a cup of espresso on a red saucer with a spoon.",
                  "a red and white coffee cup on a wooden table.",
                  "a small cup of coffee with crema, seen from above."],
     "questions": [("is there a cup?", "yes"), ("is there a spoon?", "yes"), ("is the cup empty?", "no"),
                   ("is there a person?", "no"), ("what colour is the saucer?", "red")],
     "source": "Rachel Michetti, courtesy of Pikolo Espresso Bar, via scikit-image",
     "licence": "CC0 (Rachel Michetti)"},
    {"name": "rocket", "package": "skimage", "file": "data/rocket.jpg", "class": "rocket",
     "captions": ["a rocket standing on the launch pad at dusk.",
                  "a white rocket between tall launch towers, with bright lights below.",
                  "a falcon 9 rocket ready for launch under a deep blue evening sky."],
     "questions": [("is there a rocket?", "yes"), ("is there a person?", "no"), ("is the rocket white?", "yes"),
                   ("is there a cat?", "no")],
     "source": "SpaceX: Falcon 9 with DSCOVR at Cape Canaveral, via scikit-image",
     "licence": "public domain (released by SpaceX)"},
    {"name": "camera", "package": "skimage", "file": "data/camera.png", "class": "person",
     "captions": ["a black and white photo of a man looking through a camera on a tripod.",
                  "a man in a dark coat filming with a video camera on a tripod in a field.",
                  "a photographer on a grassy field with buildings in the distance."],
     "questions": [("is there a person?", "yes"), ("is there a tripod?", "yes"),
                   ("is the photo in colour?", "no"), ("is there a cat?", "no")],
     "source": "Lav Varshney, via scikit-image",
     "licence": "CC0 (Lav Varshney)"},
    {"name": "coins", "package": "skimage", "file": "data/coins.png", "class": "coins",
     "captions": ["a black and white photo of ancient greek coins arranged in rows.",
                  "four rows of old coins showing heads and figures on a dark background.",
                  "a collection of ancient coins from pompeii on a dark background."],
     "questions": [("are there coins?", "yes"), ("is the photo in colour?", "no"), ("is there a person?", "no")],
     "source": "Brooklyn Museum Collection, via scikit-image",
     "licence": "no known copyright restrictions (scikit-image)"},
    {"name": "motorcycle", "package": "skimage", "file": "data/motorcycle_left.png", "class": "motorcycle",
     "captions": ["a red motorcycle parked in a garage.",
                  "a red and black motorbike in front of shelves full of boxes.",
                  "a parked motorcycle on a concrete floor in a cluttered workshop."],
     "questions": [("is there a motorcycle?", "yes"), ("is there a person?", "no"),
                   ("is the motorcycle blue?", "no"), ("what colour is the motorcycle?", "red")],
     "source": "Middlebury 2014 stereo dataset, Motorcycle (left view, downsampled 4x), "
               "Scharstein et al., GCPR 2014, via scikit-image",
     "licence": "not stated by scikit-image; cite Scharstein et al. (GCPR 2014)"},
    {"name": "china", "package": "sklearn", "file": "datasets/images/china.jpg", "class": "temple",
     "captions": ["a chinese pagoda with a green and red roof above the trees.",
                  "a tall temple tower overlooking a lake on a hazy day.",
                  "a traditional chinese tower with painted eaves, trees in front and a lake behind."],
     "questions": [("is there a building?", "yes"), ("is there water?", "yes"), ("is there a car?", "no")],
     "source": "Flickr, danielbuechele (photo 6061409035), via scikit-learn",
     "licence": "CC BY 2.0 (danielbuechele)"},
    {"name": "flower", "package": "sklearn", "file": "datasets/images/flower.jpg", "class": "flower",
     "captions": ["a close-up of an orange dahlia flower.",
                  "a round peach-coloured flower in front of dark green leaves.",
                  "a ball-shaped dahlia blossom against a blurry green background."],
     "questions": [("is there a flower?", "yes"), ("is there a person?", "no"), ("is the flower blue?", "no"),
                   ("what colour is the flower?", "orange")],
     "source": "Flickr, vultilion (photo 6056698931), via scikit-learn",
     "licence": "CC BY 2.0 (scikit-learn's README credits danielbuechele; the photo page is vultilion's)"},
    {"name": "grace_hopper", "package": "matplotlib", "file": "mpl-data/sample_data/grace_hopper.jpg",
     "class": "person",
     "captions": ["a portrait of grace hopper in a dark navy uniform and cap.",
                  "an elderly woman with glasses in a naval uniform in front of an american flag.",
                  "an official navy portrait of a woman with ribbons on her jacket."],
     "questions": [("is there a person?", "yes"), ("is the person wearing glasses?", "yes"),
                   ("is there a dog?", "no")],
     "source": "official U.S. Navy portrait of Rear Admiral Grace Hopper, via matplotlib's sample data",
     "licence": "public domain (U.S. Navy photograph; matplotlib does not state a licence)"},
]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the real-photograph set reads images bundled with {package}, which is not installed; "
                         f"install it (pip install {'scikit-learn' if package == 'sklearn' else package}) "
                         "or freeze the workload with real_photos: false")
    return Path(next(iter(spec.submodule_search_locations)))


def photo_path(entry: dict) -> Path:
    return _package_dir(entry["package"]) / entry["file"]


def _choices(question: str, answer: str) -> tuple[str, list[str]]:
    if answer in ("yes", "no"):
        return "yes/no", ["yes", "no"]
    if answer in _NUMBERS:
        return "number", list(_NUMBERS)
    return "other", list(_OTHER_COLOURS)


def real_photographs(image_size: int = 64) -> ImageTextSet:
    """The 10 bundled photographs (CLIP preprocessing at image_size), 3 captions each, a
    zero-shot class each (CLASS_NAMES, prompt ensemble PROMPTS) and 3-5 questions each
    (mostly yes/no: 16 yes, 16 no)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise InputError(f"real_photographs: image_size must be a whole number >= 8; got {image_size!r}")
    images, captions, labels, vqa, meta = [], [], [], [], []
    for index, entry in enumerate(PHOTOS):
        path = photo_path(entry)
        images.append(load_image(path, image_size, where=f"bundled photograph {entry['name']}: "))
        captions.append(list(entry["captions"]))
        labels.append(CLASS_NAMES.index(entry["class"]))
        for question, answer in entry["questions"]:
            kind, choices = _choices(question, answer)
            vqa.append(VQAItem(index, question, answer, kind, choices))
        meta.append({"name": entry["name"], "file": f"{entry['package']}/{entry['file']}",
                     "source": entry["source"], "licence": entry["licence"]})
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageTextSet(name="photos", images=pixels, captions=captions, class_names=list(CLASS_NAMES),
                        labels=labels, prompts=list(PROMPTS), vqa=vqa, meta=meta)
