"""Reading and writing CLIP weights (clip-facts.md sections 4, 7, 8).

`load_checkpoint(path)` accepts:
- OpenAI release files: TorchScript zip archives. Their tensors are read WITHOUT running any
  code from the file: `data.pkl` is unpickled with an allow-list (tensor rebuild, OrderedDict,
  storage types); every TorchScript class becomes an inert record of its attributes, and the
  archive's code files are read as text only for their `__parameters__` / `__buffers__` lists.
  A plain `torch.save(state_dict)` .pt/.pth is read with `torch.load(weights_only=True)`.
- open_clip `.bin` / `.safetensors`: `module.` prefix, a {'state_dict': ...} wrapper, a 1-d
  logit_scale, `position_ids` buffers and the `CustomTextCLIP` `text.` prefix are undone.
- Hugging Face `CLIPModel` safetensors (a file, or a folder with model.safetensors and
  config.json): keys mapped back (q/k/v joined, projections transposed).
- pqk's own safetensors (`save_model`): the configuration is in the metadata.
Without a stated configuration it is inferred as the official `build_model` does, text heads
= width // 64 included. Matching is strict and every failure is one CheckpointError line.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from pqk.errors import CheckpointError, ConfigError, InputError
from pqk.io.files import ensure_writable_dir, write_failure
from pqk.models.clip.formats import (
    from_hf_state_dict,
    is_torchscript,
    read_torchscript_tensors,
    to_hf_state_dict,
)
from pqk.models.clip.model import CLIP, CLIPConfig, count_parameters

PQK_FORMAT = 1
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in the released archives
DUST3R_PREFIXES = ("enc_blocks.", "dec_blocks.", "patch_embed.", "downstream_head1.", "decoder_embed.")


def _short(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --- configuration ----------------------------------------------------------------------------


def _looks_like_dust3r(keys: list[str]) -> bool:
    return any(k.startswith(DUST3R_PREFIXES) for k in keys)


_INFERENCE_KEYS = ("positional_embedding", "text_projection", "visual.conv1.weight", "visual.positional_embedding",
                   "token_embedding.weight", "ln_final.weight")


def infer_config(state_dict: dict[str, torch.Tensor], transformer_heads: int | None = None,
                 source: str = "state_dict") -> CLIPConfig:
    """The configuration by the official `build_model` rules (clip-facts.md section 4); text heads
    are transformer_width // 64 unless given."""
    sd = state_dict
    if "visual.proj" not in sd and any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise CheckpointError(f"{source} is a CLIP with the ResNet image tower, which pqk does not implement "
                              "(ViT only)")
    missing = [k for k in _INFERENCE_KEYS if k not in sd]
    if missing:
        raise CheckpointError(_not_clip_message(source, list(sd), missing=missing))
    try:
        conv = sd["visual.conv1.weight"]
        width = sd["ln_final.weight"].shape[0]
        args = {
            "embed_dim": sd["text_projection"].shape[1],
            "image_resolution": conv.shape[-1] * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5),
            "vision_layers": sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd),
            "vision_width": conv.shape[0],
            "vision_patch_size": conv.shape[-1],
            "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "transformer_width": width,
            "transformer_heads": transformer_heads if transformer_heads is not None else width // 64,
            "transformer_layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        }
    except (IndexError, ValueError):
        raise CheckpointError(f"{source}: its embedding and projection tensors do not have CLIP's shapes") from None
    if transformer_heads is None and args["transformer_heads"] < 1:
        raise CheckpointError(f"{source}: the official rule transformer_heads = width // 64 gives 0 heads for text "
                              f"width {width}; this file does not state its head count (a pqk file does)")
    try:
        return CLIPConfig(**{k: v if isinstance(v, int) else int(v) for k, v in args.items()})
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: text head count {transformer_heads!r} is not an integer") from None


def _not_clip_message(source: str, keys: list[str], missing: list[str], unexpected: list[str] | None = None) -> str:
    if _looks_like_dust3r(keys):
        return f"checkpoint {source} looks like a DUSt3R checkpoint (family dust3r), not CLIP"
    if unexpected is None:
        unexpected = [k for k in keys if not _CLIP_KEY.match(k)]
    keys_missing = f"{len(missing)} key{'' if len(missing) == 1 else 's'} missing"
    return (f"checkpoint {source} is not a CLIP checkpoint in any known layout: {keys_missing} ({_short(missing)}), "
            f"{len(unexpected)} unexpected ({_short(unexpected)})")


_CLIP_KEY = re.compile(
    r"^(positional_embedding|text_projection|logit_scale|token_embedding\.weight|ln_final\.(weight|bias)"
    r"|visual\.(class_embedding|positional_embedding|proj|conv1\.weight|ln_(pre|post)\.(weight|bias))"
    r"|(visual\.)?transformer\.resblocks\.\d+\.(attn\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
    r"|ln_[12]\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias)))$"
)


def official_fp16_keys(keys: list[str]) -> list[str]:
    """Keys the official `convert_weights` stores in fp16: conv/linear weights and biases, the fused
    in-projection, out_proj, visual.proj, text_projection. LayerNorms, embeddings, class token and
    logit_scale stay fp32."""
    return [k for k in keys if k in ("visual.conv1.weight", "visual.proj", "text_projection")
            or ".attn." in k or ".mlp." in k]


def load_state_dict_strict(model: CLIP, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Exact key and shape matching, finite values, or one CheckpointError line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(_not_clip_message(source, list(state_dict), missing=missing, unexpected=unexpected))
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the CLIP it describes expects "
                                  f"{tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")
    model.load_state_dict(state_dict, strict=True)


def build_model(state_dict: dict[str, torch.Tensor], fp16_like_official: bool = False) -> CLIP:
    """The official `build_model`: infer the configuration from the weights, strict load, eval mode.

    pqk keeps every tensor in float32. The official function first casts the model to fp16
    (`convert_weights`) and then loads, which silently rounds the conv/linear/projection weights
    of a float32 state_dict (5e-4 relative on the logits of tiny_vit_b). Released OpenAI files
    already hold those tensors in fp16, so for them both give the same numbers.
    `fp16_like_official=True` reproduces the rounding (values rounded through fp16, model kept
    fp32, as `clip.load(device="cpu")` does). The three int entries of the released archives
    (`input_resolution`, `context_length`, `vocab_size`) are dropped."""
    sd, _ = normalize_state_dict(state_dict, "state_dict")
    model = CLIP.from_config(infer_config(sd))
    if fp16_like_official:
        sd = {k: v.half().to(v.dtype) if k in set(official_fp16_keys(list(sd))) else v for k, v in sd.items()}
    load_state_dict_strict(model, sd, "state_dict")
    return model.eval()


# --- reading ------------------------------------------------------------------------------------


def normalize_state_dict(state_dict: dict, source: str = "state_dict") -> tuple[dict[str, torch.Tensor], dict]:
    """Official key names from any known layout. Returns (state_dict, info): info['mapped'] lists
    what was undone, info['extras'] holds the int entries of the released archives."""
    bad = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source} is not a CLIP checkpoint: entry {bad!r} is a "
                              f"{type(state_dict[bad]).__name__}, not a tensor")
    sd, mapped = dict(state_dict), []
    if sd and all(k.startswith("module.") for k in sd):
        sd, mapped = {k[len("module."):]: v for k, v in sd.items()}, mapped + ["module. prefix"]
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd, mapped = from_hf_state_dict(sd), mapped + ["Hugging Face keys"]
    if any(k.startswith("text.") for k in sd):  # open_clip CustomTextCLIP puts the text tower there
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
        mapped.append("text. prefix")
    # Never state: HF/open_clip position_ids, and the causal mask a TorchScript archive may carry.
    sd = {k: v for k, v in sd.items() if not (k.endswith("position_ids") or k.split(".")[-1] == "attn_mask")}
    extras = {k: int(sd.pop(k).reshape(-1)[0]) for k in EXTRA_KEYS if k in sd and sd[k].numel() == 1}
    if "logit_scale" in sd and tuple(sd["logit_scale"].shape) == (1,):
        sd["logit_scale"] = sd["logit_scale"].reshape(())
        mapped.append("1-d logit_scale")
    return sd, {"mapped": mapped, "extras": extras}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from pqk.io.files import read_safetensors

    return read_safetensors(path)


def _read_torch(path: Path) -> dict:
    """torch.load(weights_only=True); a {'state_dict': ...} or {'model': ...} wrapper is opened."""
    import argparse

    try:  # argparse.Namespace only so that a DUSt3R .pth gets its own message, not "refused"
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch reports damaged files with several exception types
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found:
            raise CheckpointError(f"{path} was refused: it holds {found.group(1)}, not only tensors and containers "
                                  "(read with torch.load(weights_only=True))") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a CLIP checkpoint: it holds a {type(obj).__name__}, not a state_dict")
    return obj


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _weights_in_folder(folder: Path) -> Path:
    names = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds no CLIP weights: expected one of {', '.join(names)}")


def _hf_config(config_path: Path, sd: dict[str, torch.Tensor], source: str) -> dict | None:
    """Constructor arguments of a Hugging Face CLIPModel: the weights' shapes plus the text head
    count of config.json (None without a config.json: then width // 64 is assumed)."""
    if not config_path.is_file():
        return None
    try:
        cfg = json.loads(config_path.read_text())
        text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{config_path} is not a JSON object of a Hugging Face CLIP config") from None
    for tower, c in (("text", text), ("vision", vision)):
        if c.get("hidden_act", "quick_gelu") != "quick_gelu" or c.get("layer_norm_eps", 1e-5) != 1e-5:
            raise CheckpointError(f"{source}: its {tower} tower uses hidden_act {c.get('hidden_act')!r}, "
                                  f"layer_norm_eps {c.get('layer_norm_eps', 1e-5)}; pqk's CLIP is OpenAI's "
                                  "(quick_gelu, 1e-5)")
    config = infer_config(sd, transformer_heads=text.get("num_attention_heads"), source=source)
    if vision.get("num_attention_heads", config.vision_heads) != config.vision_heads:
        raise CheckpointError(f"{source}: {vision['num_attention_heads']} vision heads; the OpenAI image tower has "
                              f"vision_width // 64 = {config.vision_heads}")
    return config.constructor_args()


def _pqk_fields(metadata: dict[str, str], path: Path) -> tuple[dict | None, list]:
    try:
        config = json.loads(metadata["pqk_config"]) if "pqk_config" in metadata else None
        history = json.loads(metadata.get("pqk_history", "[]"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its pqk metadata is not valid JSON ({exc.msg}); the file is damaged") from None
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: its pqk_config metadata is not a JSON object of constructor arguments")
    return config, history if isinstance(history, list) else []


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict with official key names, meta) from any supported file or folder; nothing is
    checked against a model yet. meta holds the file's safetensors metadata strings (pqk_family,
    pqk_config, ...) and: layout ('pqk', 'safetensors', 'torchscript', 'pytorch'), config (the
    constructor arguments when the file states them, else None), history (pqk runs), mapped
    (the layout changes undone) and extras (the released archives' int entries)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    weights = _weights_in_folder(path) if path.is_dir() else path
    metadata: dict[str, str] = {}
    try:
        if _is_safetensors(weights):
            sd, metadata = _read_safetensors(weights)
            layout = "safetensors"
        elif zipfile.is_zipfile(weights) and is_torchscript(weights):
            sd, layout = read_torchscript_tensors(weights), "torchscript"
        else:
            sd, layout = _read_torch(weights), "pytorch"
    except OSError as exc:
        raise CheckpointError(f"checkpoint {weights} cannot be read ({exc.strerror or type(exc).__name__})") from None
    meta = {**metadata, "layout": layout, "config": None, "history": [], "mapped": [], "extras": {}}
    if "pqk_family" in metadata or "pqk_kind" in metadata:  # pqk writes official key names
        meta["layout"] = "pqk"
        meta["config"], meta["history"] = _pqk_fields(metadata, path)
        return sd, meta
    if _looks_like_dust3r(list(sd)):
        raise CheckpointError(_not_clip_message(str(path), list(sd), missing=[]))
    hf = any(k.startswith(("text_model.", "vision_model.")) for k in sd)
    sd, info = normalize_state_dict(sd, str(path))
    meta.update(info)
    if hf:
        meta["config"] = _hf_config(weights.parent / "config.json", sd, str(path))
    return sd, meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> CLIP:
    """The CLIP a checkpoint describes, strictly loaded, float32, in eval mode on `device`.
    float16 tensors of released files are widened exactly, as `clip.load(device="cpu")` does."""
    sd, meta = read_state_dict(path)
    if meta["layout"] == "pqk":
        family = meta.get("pqk_family") or meta.get("pqk_kind")
        if family != "clip":
            raise CheckpointError(f"checkpoint {path} is a pqk {family} file, not a CLIP "
                                  "(pqk.models.clip.family.load_family_model reads every CLIP-family file)")
        if meta["config"] is None:
            raise CheckpointError(f"{path}: a pqk CLIP file without its pqk_config metadata; the file is damaged")
    try:
        config = CLIPConfig.from_dict(meta["config"]) if meta["config"] else infer_config(sd, source=str(path))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = CLIP.from_config(config)
    load_state_dict_strict(model, sd, str(path))
    model.pqk_history = meta["history"]
    return model.to(device).eval()


# --- writing ------------------------------------------------------------------------------------


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Atomically: a temporary sibling, then a rename (a file is whole or absent). One line on failure."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"cannot save to {path}: pqk writes CLIP weights as .safetensors")
    ensure_writable_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes owner-only files
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc if isinstance(exc, OSError) else OSError(str(exc))) from None
    return path


def save_model(model: CLIP, path: str | Path, history: list | None = None) -> Path:
    """pqk safetensors: official key names, metadata pqk_family='clip', pqk_config (the ten
    constructor arguments as JSON), pqk_history (JSON list). The official and open_clip loaders
    can read the tensors; load_checkpoint reads the configuration back without inferring it."""
    from pqk.io.files import json_safe

    if not isinstance(model, CLIP):
        raise InputError(f"save_model takes a pqk CLIP, got {type(model).__name__}")
    history = list(history if history is not None else getattr(model, "pqk_history", []))
    metadata = {"pqk_family": "clip", "pqk_format": str(PQK_FORMAT),
                "pqk_config": json.dumps(model.config.constructor_args()),
                "pqk_history": json.dumps(json_safe(history))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return write_safetensors(tensors, Path(path), metadata)


__all__ = ["build_model", "count_parameters", "from_hf_state_dict", "infer_config", "load_checkpoint",
           "load_state_dict_strict", "normalize_state_dict", "official_fp16_keys", "read_state_dict",
           "read_torchscript_tensors", "save_model", "to_hf_state_dict", "write_safetensors"]
