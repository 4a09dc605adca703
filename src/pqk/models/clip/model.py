"""CLIP (Radford et al., 2021) with a ViT image tower, as released by OpenAI.

Written from ../shared/design/clip-facts.md (sections 1-3). Parameter names and the
state_dict order equal the official ones, so OpenAI, open_clip and Hugging Face weights load
strictly after at most a key mapping (checkpoint.py). Differences from the official code
that do not change the numbers:
- blocks run batch-first (N, T, W); the official code runs sequence-first;
- attention is written out (fused q/k/v projection, per-head SDPA, out_proj) instead of
  `nn.MultiheadAttention`, with the same parameter names, so hooks, pruning and quantization
  see plain tensors and `nn.Linear`s;
- the LayerNorm computes in at least float32 (the official one casts to float32 exactly,
  which fails for a float64 model);
- inputs are checked: a wrong image size or text length is one line (InputError), not a
  shape traceback.
The ResNet image tower (`vision_layers` a 4-tuple) is out of scope.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pqk.errors import ConfigError, InputError

HEAD_DIM_VISION = 64  # the official constructor gives the image tower vision_width // 64 heads


@dataclass(frozen=True)
class CLIPConfig:
    """The ten official constructor arguments of `CLIP`, validated."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, (tuple, list)):
            raise ConfigError("vision_layers is a tuple: that is the ResNet image tower, which pqk's CLIP does not "
                              "implement (ViT only)")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CLIP {f.name} must be a positive integer, got {value!r}")
        if self.vision_width % HEAD_DIM_VISION:
            raise ConfigError(f"CLIP vision_width {self.vision_width} must be a multiple of 64: the image tower "
                              "always gets vision_width // 64 heads of 64 channels")
        if self.transformer_width % self.transformer_heads:
            raise ConfigError(f"CLIP transformer_width {self.transformer_width} is not divisible by "
                              f"transformer_heads {self.transformer_heads}")
        if self.image_resolution < self.vision_patch_size:
            raise ConfigError(f"CLIP image_resolution {self.image_resolution} is smaller than the patch size "
                              f"{self.vision_patch_size}")

    @property
    def vision_heads(self) -> int:
        return self.vision_width // HEAD_DIM_VISION

    @property
    def grid(self) -> int:
        """Patches per side; pixels beyond grid * patch are dropped by the strided conv, as official."""
        return self.image_resolution // self.vision_patch_size

    def constructor_args(self) -> dict[str, int]:
        """The official keyword arguments, in the official order."""
        return asdict(self)

    @classmethod
    def from_dict(cls, args: dict) -> CLIPConfig:
        """From a dict of constructor arguments; unknown or missing names are one ConfigError line."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(args) - set(names))
        missing = [n for n in names if n not in args]
        if unknown or missing:
            raise ConfigError(f"CLIP constructor arguments: unknown {unknown or 'none'}, missing {missing or 'none'}")
        return cls(**{n: args[n] for n in names})


# --- building blocks ------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """eps 1e-5, computed in at least float32 and cast back (fp16/bf16 runs keep a precise norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): what every OpenAI checkpoint was trained with (erf GELU is 1-2 % off)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names.

    `in_proj_weight` (3W x W) stacks the q, k, v rows in that order; head h uses columns
    h*d .. (h+1)*d - 1 of each projection (d = W / heads)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.embed_dim = width
        self.num_heads = heads
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)  # additive float mask: 0 or -inf
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # softmax(q k^T / sqrt(d) + mask) v
        return self.out_proj(out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block; registration order (attn, ln_1, mlp, ln_2) gives the official key order."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, T, W). With `record`, block i's output is stored as record[f"block{i}"] (0-based)."""
        for i, block in enumerate(self.resblocks):
            x = block(x, attn_mask)
            if record is not None:
                record[f"block{i}"] = x
        return x


class VisionTransformer(nn.Module):
    """Patchify, class token, positional table, ln_pre, blocks, ln_post(class token), @ proj."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        grid = input_resolution // patch_size
        # Own parameters first, then children: the official state_dict order.
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))  # used as x @ proj (not a Linear weight)

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, W), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if record is not None:
            record["embeddings"] = x
        x = self.ln_pre(x)
        if record is not None:
            record["ln_pre"] = x
        x = self.transformer(x, record=record)
        x = self.ln_post(x[:, 0, :])
        if record is not None:
            record["pooled_ln_post"] = x
        return x @ self.proj


# features, or (features, hidden states) with return_hidden=True
Features = torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]


# --- CLIP -----------------------------------------------------------------------------------


class CLIP(nn.Module):
    """OpenAI CLIP with a ViT image tower; the constructor takes the official arguments.

    >>> model = CLIP(**config.constructor_args())          # or CLIP.from_config(config)
    >>> logits_per_image, logits_per_text = model(images, tokenize(["a photo of a cat"]))
    """

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        cfg = CLIPConfig(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                         context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
        self.config = cfg
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        cfg.vision_heads, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))  # x @ text_projection
        self.logit_scale = nn.Parameter(torch.empty(()))  # log of the inverse temperature, 0-d
        # Additive causal mask (0 on/below the diagonal, -inf above); rebuilt, never saved.
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_parameters()

    @classmethod
    def from_config(cls, config: CLIPConfig) -> CLIP:
        return cls(**config.constructor_args())

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        """The official initialisation scale (normal with these stds, zero biases, ln(1/0.07))."""
        vis, txt = self.visual, self.transformer
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        scale = vis.transformer.width ** -0.5
        for p in (vis.class_embedding, vis.positional_embedding, vis.proj):
            nn.init.normal_(p, std=scale)
        for tower in (vis.transformer, txt):
            proj_std = tower.width ** -0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tower.width ** -0.5)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=txt.width ** -0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype, as official: that of the patch conv."""
        return self.visual.conv1.weight.dtype

    @staticmethod
    def tap_layers(depth: int) -> list[int]:
        """Blocks read by pyramid distillation: [d//4, d//2, 3d//4, d], 1-based block numbers.

        They index `hidden` from `encode_*(..., return_hidden=True)` directly: hidden[k] is the
        output of block k and hidden[0] the input of block 1 (only reached when depth < 4).
        ViT-B/16 (12 blocks): [3, 6, 9, 12]; ViT-L/14 image tower (24): [6, 12, 18, 24]."""
        if depth < 1:
            raise ConfigError(f"tap_layers needs a depth of at least 1, got {depth}")
        return [depth // 4, depth // 2, 3 * depth // 4, depth]

    # --- input checks (one line for the user, not a shape traceback) --------------------------

    def _check_image(self, image: torch.Tensor) -> None:
        r = self.config.image_resolution
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputError(f"image must be a (N, 3, {r}, {r}) tensor, got {shape}")
        if tuple(image.shape[-2:]) != (r, r):
            raise InputError(f"image is {image.shape[-2]}x{image.shape[-1]} pixels; this CLIP takes {r}x{r} "
                             f"(use preprocess_image(img, {r}))")
        if not image.is_floating_point():
            raise InputError(f"image has dtype {image.dtype}; pass the normalised float tensor from "
                             "preprocess_image")

    def _check_text(self, text: torch.Tensor) -> None:
        L = self.config.context_length
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.is_floating_point() or text.is_complex():
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise InputError(f"text must be an (N, {L}) integer tensor of token ids (tokenize(...)), got {shape}")
        if text.shape[1] != L:
            raise InputError(f"text has {text.shape[1]} positions; this CLIP takes exactly {L} "
                             f"(tokenize(texts, context_length={L}))")
        symbolic = torch.jit.is_tracing() or torch.compiler.is_compiling()  # no data-dependent checks there
        if text.numel() and text.device.type != "meta" and not symbolic:
            lo, hi = int(text.min()), int(text.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise InputError(f"text holds token id {lo if lo < 0 else hi}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")

    # --- towers ---------------------------------------------------------------------------

    def _image(self, image: torch.Tensor, record: dict | None) -> torch.Tensor:
        self._check_image(image)
        return self.visual(image, record)

    def _text(self, text: torch.Tensor, record: dict | None) -> torch.Tensor:
        self._check_text(text)
        x = self.token_embedding(text).to(self.dtype)
        x = x + self.positional_embedding.to(x.dtype)
        if record is not None:
            record["embeddings"] = x
        x = self.transformer(x, self.attn_mask, record)  # no padding mask: causal only, as official
        x = self.ln_final(x)
        # Pool at argmax(ids), first maximum: the first EOT for real tokenizer output.
        index = text.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), index]
        if record is not None:
            record["pool_index"] = index
            record["pooled_ln_final"] = x
        return x @ self.text_projection

    @staticmethod
    def _hidden(record: dict, first: str, depth: int) -> list[torch.Tensor]:
        return [record[first]] + [record[f"block{i}"] for i in range(depth)]

    def encode_image(self, image: torch.Tensor, return_hidden: bool = False) -> Features:
        """(N, 3, R, R) normalised images -> (N, embed_dim) features, NOT normalised.

        With return_hidden=True: (features, hidden), hidden a list of depth + 1 tensors
        (N, T, vision_width), batch-first: hidden[0] = output of ln_pre (the input of block 1),
        hidden[k] = output of block k. Use `tap_layers(depth)` to pick the pyramid levels."""
        if not return_hidden:
            return self._image(image, None)
        record: dict[str, torch.Tensor] = {}
        features = self._image(image, record)
        return features, self._hidden(record, "ln_pre", self.visual.transformer.layers)

    def encode_text(self, text: torch.Tensor, return_hidden: bool = False) -> Features:
        """(N, context_length) token ids -> (N, embed_dim) features, NOT normalised.

        With return_hidden=True: (features, hidden), hidden a list of depth + 1 tensors
        (N, context_length, transformer_width): hidden[0] = token + positional embedding (the
        input of block 1; the text tower has no LayerNorm before its blocks), hidden[k] = output
        of block k (every position; pad positions are computed too, as official)."""
        if not return_hidden:
            return self._text(text, None)
        record: dict[str, torch.Tensor] = {}
        features = self._text(text, record)
        return features, self._hidden(record, "embeddings", self.transformer.layers)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(logit_scale) * cosine similarities: (logits_per_image, logits_per_text = its transpose).
        No epsilon in the normalisation and no clamp of the scale, as official."""
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (N_img, N_txt), logits_per_text (N_txt, N_img))."""
        return self.logits(self.encode_image(image), self.encode_text(text))

    def named_states(self, image: torch.Tensor | None = None,
                     text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every intermediate under the names of the conformance io files: vision.embeddings,
        vision.ln_pre, vision.block<i> (0-based), vision.pooled_ln_post, encode_image,
        text.embeddings, text.block<i>, text.pool_index, text.pooled_ln_final, encode_text, and
        logits_per_image / logits_per_text when both inputs are given."""
        out: dict[str, torch.Tensor] = {}
        for prefix, name, run, value in (("vision", "encode_image", self._image, image),
                                         ("text", "encode_text", self._text, text)):
            if value is None:
                continue
            record: dict[str, torch.Tensor] = {}
            out[name] = run(value, record)
            out.update({f"{prefix}.{k}": v for k, v in record.items()})
        if image is not None and text is not None:
            out["logits_per_image"], out["logits_per_text"] = self.logits(out["encode_image"], out["encode_text"])
        return out


def tower_of(key: str) -> str:
    """'vision', 'text' or 'logit_scale' for a state_dict key (the official key tables' split)."""
    if key == "logit_scale":
        return "logit_scale"
    return "vision" if key.startswith("visual.") else "text"


def count_parameters(model: nn.Module, tower: str | None = None) -> int:
    """Parameters of the whole model, or of one tower ('vision', 'text', 'logit_scale'); the text
    tower includes token_embedding, positional_embedding and text_projection."""
    if tower not in (None, "vision", "text", "logit_scale"):
        raise InputError(f"tower must be 'vision', 'text' or 'logit_scale', got {tower!r}")
    return sum(p.numel() for name, p in model.named_parameters() if tower is None or tower_of(name) == tower)
