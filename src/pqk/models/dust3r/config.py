"""The DUSt3R constructor arguments as data.

`Dust3rConfig` holds exactly the keyword arguments of the official
`AsymmetricCroCo3DStereo(...)` constructor that change the network, so a config
read from an official checkpoint, a Hugging Face `config.json` or one of our own
files means the same thing everywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pqk.errors import ConfigError

OFFICIAL_CLASS_NAME = "AsymmetricCroCo3DStereo"
PATCH_EMBED_CLASSES = ("PatchEmbedDust3R", "ManyAR_PatchEmbed")
HEAD_TYPES = ("linear", "dpt")
# Keys of `block_widths` (a pruned model's per-block widths; heads keep the original head dim).
BLOCK_WIDTH_KEYS = (
    "enc_heads", "enc_mlp_hidden",
    "dec1_heads", "dec1_cross_heads", "dec1_mlp_hidden",
    "dec2_heads", "dec2_cross_heads", "dec2_mlp_hidden",
)


@dataclass
class Dust3rConfig:
    """Official constructor kwargs (same names, same meaning).

    Defaults follow the official constructor except `pos_embed`: CroCo defaults to
    'cosine' but every DUSt3R checkpoint uses 'RoPE100', the only one pqk builds.
    """

    output_mode: str = "pts3d"
    head_type: str = "linear"
    depth_mode: tuple = ("exp", -math.inf, math.inf)
    conf_mode: tuple = ("exp", 1, math.inf)
    freeze: str = "none"
    landscape_only: bool = True
    patch_embed_cls: str = "PatchEmbedDust3R"
    img_size: tuple = (224, 224)
    patch_size: int = 16
    mask_ratio: float = 0.9
    enc_embed_dim: int = 768
    enc_depth: int = 12
    enc_num_heads: int = 12
    dec_embed_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: float = 4
    norm_im2_in_dec: bool = True
    pos_embed: str = "RoPE100"
    # Not official: per-block widths of a pruned model (None = uniform, as official).
    # Each list has one entry per block; heads keep the original head dim.
    block_widths: dict = field(default_factory=dict)

    @property
    def enc_head_dim(self) -> int:
        return self.enc_embed_dim // self.enc_num_heads

    @property
    def dec_head_dim(self) -> int:
        return self.dec_embed_dim // self.dec_num_heads

    @property
    def rope_base(self) -> float:
        return float(self.pos_embed[len("RoPE"):])

    @property
    def dpt_hooks(self) -> list[int]:
        depth = self.dec_depth
        return [0, depth * 2 // 4, depth * 3 // 4, depth]

    def to_kwargs(self) -> dict[str, Any]:
        """JSON-ready constructor kwargs (infinities as the strings 'inf'/'-inf')."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "block_widths" and not value:
                continue
            out[f.name] = _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _parse_number(value: Any) -> Any:
    """'inf'/'-inf' strings (conformance config.json) become floats; the rest is kept."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity", "-inf", "-infinity"):
        return float(value.replace("infinity", "inf"))
    return value


def config_from_kwargs(**kwargs: Any) -> Dust3rConfig:
    """Validate official constructor kwargs and return a `Dust3rConfig`."""
    known = {f.name for f in dataclasses.fields(Dust3rConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(
            f"unknown DUSt3R constructor argument {unknown[0]!r}; accepted: {', '.join(sorted(known))}"
        )
    values = {k: v for k, v in kwargs.items()}
    for name in ("depth_mode", "conf_mode"):
        if name in values:
            values[name] = tuple(_parse_number(v) for v in values[name])
    if "img_size" in values:
        size = values["img_size"]
        values["img_size"] = (size, size) if isinstance(size, int) else tuple(size)
    cfg = Dust3rConfig(**values)
    _validate(cfg)
    return cfg


# Refused up front rather than attempted: the full-size DUSt3R has 571 M parameters, so 5 billion
# (20 GB of fp32 weights, beyond this project's machines) can only be a typo in a config.
MAX_PARAMETERS = 5_000_000_000


def _approx_parameters(cfg: Dust3rConfig) -> int:
    """Parameters of the blocks, near enough to refuse an absurd config: a ViT block is ~12 d²
    (attention 4 d², MLP 8 d²), a decoder block ~16 d² (cross-attention too), two decoders."""
    enc = cfg.enc_depth * 12 * cfg.enc_embed_dim ** 2
    dec = 2 * cfg.dec_depth * 16 * cfg.dec_embed_dim ** 2
    return int(enc + dec)


def _validate(cfg: Dust3rConfig) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.output_mode != "pts3d":
        bad(f"output_mode {cfg.output_mode!r} is not supported; accepted: 'pts3d'")
    if cfg.head_type not in HEAD_TYPES:
        bad(f"head_type {cfg.head_type!r} is not supported; accepted: {', '.join(HEAD_TYPES)}")
    if cfg.patch_embed_cls not in PATCH_EMBED_CLASSES:
        bad(f"patch_embed_cls {cfg.patch_embed_cls!r} is not supported; accepted: {', '.join(PATCH_EMBED_CLASSES)}")
    if not (isinstance(cfg.pos_embed, str) and cfg.pos_embed.startswith("RoPE")):
        bad(f"pos_embed {cfg.pos_embed!r} is not supported; accepted: 'RoPE<base>', e.g. 'RoPE100'")
    try:
        cfg.rope_base
    except ValueError:
        bad(f"pos_embed {cfg.pos_embed!r}: the RoPE base must be a number, e.g. 'RoPE100'")
    mode, vmin, vmax = (tuple(cfg.depth_mode) + (None, None))[:3]
    if mode != "exp" or vmin != -math.inf or vmax != math.inf:
        bad(f"depth_mode {cfg.depth_mode!r} is not supported; accepted: ('exp', -inf, inf)")
    if len(cfg.conf_mode) != 3 or cfg.conf_mode[0] != "exp":
        bad(f"conf_mode {cfg.conf_mode!r} is not supported; accepted: ('exp', vmin, vmax)")
    for dim, heads, name in (
        (cfg.enc_embed_dim, cfg.enc_num_heads, "enc"),
        (cfg.dec_embed_dim, cfg.dec_num_heads, "dec"),
    ):
        if heads <= 0 or dim % heads:
            bad(f"{name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}")
        if (dim // heads) % 4:
            bad(f"{name} head dim {dim // heads} must be divisible by 4 for 2D RoPE")
    approx = _approx_parameters(cfg)
    if approx > MAX_PARAMETERS:
        bad(f"this config would build ~{approx / 1e9:.1f} billion parameters ({approx * 4 / 1e9:.0f} GB of fp32 weights), "
            f"above pqk's limit of {MAX_PARAMETERS / 1e9:.0f} billion; check its widths and depths")
    if cfg.head_type == "dpt" and cfg.dec_depth <= 9:
        bad(f"head_type 'dpt' needs dec_depth > 9 (got {cfg.dec_depth}), as in the official DPT head")
    for s in cfg.img_size:
        if s % cfg.patch_size:
            bad(f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
    for key, widths in cfg.block_widths.items():
        if key not in BLOCK_WIDTH_KEYS:
            bad(f"block_widths key {key!r} is not known; accepted: {', '.join(BLOCK_WIDTH_KEYS)}")
        if any(int(w) <= 0 for w in widths):
            bad(f"block_widths[{key!r}] must be positive integers, got {widths}")
        depth = cfg.enc_depth if key.startswith("enc") else cfg.dec_depth
        if len(widths) != depth:
            bad(f"block_widths[{key!r}] has {len(widths)} entries, expected {depth}")


# --- the constructor string stored in official .pth files ------------------------------

_NAMED_CONSTANTS = {"inf": math.inf, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    """Evaluate a literal expression node; names other than inf/True/False/None are refused."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.Name):
        # The official loader's rewrite targets: class names given bare instead of quoted.
        if node.id in PATCH_EMBED_CLASSES:
            return node.id
    raise ConfigError(f"constructor argument {ast.unparse(node)!r} is not a literal value")


def parse_constructor_string(text: str) -> dict[str, Any]:
    """Parse `AsymmetricCroCo3DStereo(k=v, ...)` as data (no eval) into kwargs."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"model constructor string is not valid Python syntax: {text[:80]!r}") from exc
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ConfigError(f"model constructor string is not a call: {text[:80]!r}")
    if call.func.id != OFFICIAL_CLASS_NAME:
        raise ConfigError(f"checkpoint is not a DUSt3R: its model is {call.func.id!r}, expected {OFFICIAL_CLASS_NAME!r}")
    if call.args:
        raise ConfigError("model constructor string has positional arguments; expected keywords only")
    return {kw.arg: _literal(kw.value) for kw in call.keywords}


def official_loader_rewrite(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the official `load_model` does before building: the training-only patch
    embedding becomes the inference one, and portrait outputs stay portrait."""
    out = dict(kwargs)
    if out.get("patch_embed_cls") == "ManyAR_PatchEmbed":
        out["patch_embed_cls"] = "PatchEmbedDust3R"
    out["landscape_only"] = False
    return out
