"""Image-text data of the CLIP family: a generated compositional set, bundled real photographs,
and users' folders, all as `ImageTextSet` (uint8 images, captions, zero-shot classes, VQA)."""

from pqk.data.captions.folder import (
    FOLDER_FORMAT,
    load_caption_folder,
    load_class_folders,
    load_folder,
    load_vqa_folder,
)
from pqk.data.captions.generated import (
    CLASS_NAMES,
    PROMPTS,
    draw_scene,
    generate_caption_set,
)
from pqk.data.captions.photos import real_photographs
from pqk.data.captions.preprocess import clip_resize_crop, load_image
from pqk.data.captions.render import render_scene
from pqk.data.captions.types import ImageTextSet, VQAItem, content_hash
from pqk.data.captions.vocabulary import (
    ANSWER_TYPES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    MATERIALS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_attributes,
    image_attributes,
    scene_attributes,
    vocabulary,
)

__all__ = [
    "ANSWER_TYPES", "BACKGROUNDS", "CLASS_NAMES", "COLOURS", "FOLDER_FORMAT", "HELD_OUT", "MATERIALS",
    "NUMBER_WORDS", "PROMPTS", "RELATIONS", "SHAPES", "SIZES", "ImageTextSet", "VQAItem", "caption_attributes",
    "clip_resize_crop", "content_hash", "draw_scene", "generate_caption_set", "image_attributes", "load_caption_folder",
    "load_class_folders", "load_folder", "load_image", "load_vqa_folder", "real_photographs", "render_scene",
    "scene_attributes", "vocabulary",
]
