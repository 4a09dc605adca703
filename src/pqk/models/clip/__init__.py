"""OpenAI CLIP (ViT image towers) with the official public surface, written from
../shared/design/clip-facts.md and checked against tensors of the official code.

>>> from pqk.models.clip import load_checkpoint, tokenize, preprocess_image
>>> model = load_checkpoint("ViT-B-16.pt")            # OpenAI, open_clip, Hugging Face or pqk file
>>> image = preprocess_image(pil_image, model.visual.input_resolution)[None]
>>> logits_per_image, logits_per_text = model(image, tokenize(["a photo of a cat", "a dog"]))
"""

from pqk.models.clip.checkpoint import (
    build_model,
    from_hf_state_dict,
    infer_config,
    load_checkpoint,
    read_state_dict,
    save_model,
    to_hf_state_dict,
)
from pqk.models.clip.model import CLIP, CLIPConfig, count_parameters
from pqk.models.clip.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    preprocess_image,
    to_unit_tensor,
)
from pqk.models.clip.tokenizer import SimpleTokenizer, tokenize

__all__ = [
    "CLIP",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPConfig",
    "SimpleTokenizer",
    "build_model",
    "count_parameters",
    "from_hf_state_dict",
    "infer_config",
    "load_checkpoint",
    "preprocess_image",
    "read_state_dict",
    "save_model",
    "to_hf_state_dict",
    "to_unit_tensor",
    "tokenize",
]
