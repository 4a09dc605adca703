"""What pqk needs of any model of the CLIP family, whichever its text tower: the official CLIP
(`CLIP`, byte-level BPE, 77 or fewer positions) or the LiT teacher (`LiTCLIP`, locked MiniLM,
WordPiece). Loading and saving either (pruned ones included: their MLPs are narrower than the
config says, and the saved tensors' shapes say by how much), its tokenizer, its resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pqk.errors import CheckpointError, ConfigError

Tokenizer = Callable[[list[str]], torch.Tensor]


def image_resolution(model: nn.Module) -> int:
    return int(model.visual.input_resolution)


def tokenizer_spec(model: nn.Module) -> str:
    """A string naming the model's tokenizer and length, e.g. `clip-bpe:77`, `minilm:32`."""
    from pqk.models.clip.lit import LiTCLIP

    if isinstance(model, LiTCLIP):
        return f"minilm:{model.config.context_length}"
    if getattr(model, "vocab_size", None) != 49408:
        raise ConfigError(f"this CLIP's vocabulary has {getattr(model, 'vocab_size', '?')} ids, not the BPE "
                          "vocabulary's 49408: pqk cannot tokenize text for it")
    return f"clip-bpe:{model.context_length}"


def tokenizer_from_spec(spec: str) -> Tokenizer:
    kind, _, length = spec.partition(":")
    context = int(length)
    if kind == "clip-bpe":
        from pqk.models.clip.tokenizer import tokenize

        return lambda texts: tokenize(list(texts), context_length=context).long()
    if kind == "minilm":
        from pqk.models.minilm import MiniLMTokenizer, minilm_files

        tokenizer = MiniLMTokenizer(minilm_files() / "tokenizer.json")
        return lambda texts: tokenizer(list(texts), context_length=context)
    raise ConfigError(f"unknown tokenizer {spec!r}; known: clip-bpe:<length>, minilm:<length>")


def text_tokenizer(model: nn.Module) -> Tokenizer:
    """texts -> the (N, L) int64 ids `model.encode_text` takes."""
    if hasattr(model, "tokenize"):
        return lambda texts: model.tokenize(list(texts)).long()
    return tokenizer_from_spec(tokenizer_spec(model))


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Narrow the MLP layers of `model` to the widths saved in `state_dict` (a pruned model
    keeps its config; the tensors carry the pruned widths)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in state_dict:
            continue
        out_features, in_features = state_dict[f"{name}.weight"].shape
        if (out_features, in_features) == (module.out_features, module.in_features):
            continue
        parent_name, _, child = name.rpartition(".")
        if not parent_name.endswith("mlp"):
            raise CheckpointError(f"{name}.weight has shape {(out_features, in_features)}, the model "
                                  f"{(module.out_features, module.in_features)}: only MLP widths may differ")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, nn.Linear(in_features, out_features, bias=module.bias is not None))


def load_family_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """Any CLIP-family file pqk reads: a pqk LiT teacher, a pqk CLIP (pruned or not), or an
    official / open_clip / Hugging Face CLIP checkpoint."""
    from pqk.models.clip import CLIP, load_checkpoint, read_state_dict
    from pqk.models.clip.lit import KIND, load_lit

    path = Path(path)
    state_dict, meta = read_state_dict(path)
    if meta.get("pqk_kind") == KIND:
        model = load_lit(state_dict, meta, path)
    elif meta.get("pqk_family") == "clip" and "pqk_config" in meta:
        model = CLIP(**json.loads(meta["pqk_config"]))
        resize_to_state_dict(model, state_dict)
        from pqk.models.clip.checkpoint import load_state_dict_strict

        load_state_dict_strict(model, state_dict, path)
    else:
        model = load_checkpoint(path)
    return model.to(device).eval()


def save_family_model(model: nn.Module, path: str | Path, history: list | None = None) -> Path:
    """Save a CLIP-family model as pqk safetensors (a LiT model without its locked text tower)."""
    from pqk.models.clip import save_model
    from pqk.models.clip.lit import LiTCLIP, lit_metadata

    if not isinstance(model, LiTCLIP):
        return save_model(model, path, history=history)
    from pqk.models.clip.checkpoint import write_safetensors

    meta = {**lit_metadata(model), "pqk_history": json.dumps(history or [])}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trained_state_dict().items()}
    return write_safetensors(tensors, Path(path), meta)
