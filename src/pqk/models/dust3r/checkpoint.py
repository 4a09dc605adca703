"""Reading and writing DUSt3R weights.

Three layouts load through `load_checkpoint(path)`:
- official `.pth`: {'args': Namespace(model="AsymmetricCroCo3DStereo(...)"), 'model': state_dict};
  read with `weights_only=True` (only `argparse.Namespace` allowed beyond tensors and
  containers) and the constructor string parsed as data;
- Hugging Face: a folder (or its `config.json` / `model.safetensors`) with the kwargs in
  `config.json` and deduplicated weights (the DPT alias keys are absent);
- pqk's own: `.pth` written by `save_model` (official layout plus a 'pqk' entry, so the
  official loader reads it too) or `.safetensors` with the config in its metadata.
Matching is strict: one line names the first missing/unexpected keys.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pqk.errors import CheckpointError, PqkError
from pqk.models.dust3r.config import (
    OFFICIAL_CLASS_NAME,
    Dust3rConfig,
    config_from_kwargs,
    official_loader_rewrite,
    parse_constructor_string,
)
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo

PQK_FORMAT = 1
_ALIAS = re.compile(r"^(.*\.scratch\.)layer_rn\.(\d)\.weight$")
_CANONICAL = re.compile(r"^(.*\.scratch\.)layer(\d)_rn\.weight$")


def build_model(**constructor_kwargs: Any) -> AsymmetricCroCo3DStereo:
    """Build a DUSt3R from the official constructor kwargs ('inf'/'-inf' strings accepted)."""
    return AsymmetricCroCo3DStereo(config_from_kwargs(**constructor_kwargs))


def constructor_string(config: Dust3rConfig) -> str:
    """The official `args.model` string for this config (block widths are pqk-only and left out)."""
    kwargs = {k: v for k, v in config.__dict__.items() if k != "block_widths"}
    return f"{OFFICIAL_CLASS_NAME}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


# --- state_dict matching ------------------------------------------------------------------


def _fill_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every DPT conv both of its names; a deduplicated file keeps only one."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if m := _ALIAS.match(key):
            twin = f"{m.group(1)}layer{int(m.group(2)) + 1}_rn.weight"
        elif m := _CANONICAL.match(key):
            twin = f"{m.group(1)}layer_rn.{int(m.group(2)) - 1}.weight"
        else:
            continue
        if twin not in out:
            out[twin] = value
        elif out[twin].shape != value.shape or not torch.equal(out[twin], value):
            raise CheckpointError(f"alias keys {key} and {twin} hold different values; the file is inconsistent")
    return out


def _short_list(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load with exact key and shape matching, or raise CheckpointError with one line."""
    state_dict = _fill_aliases(state_dict)
    expected = model.state_dict()
    has_dec2 = any(k.startswith("dec_blocks2.") for k in state_dict)
    wanted = [k for k in expected if has_dec2 or not k.startswith("dec_blocks2.")]
    missing = [k for k in wanted if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        raise CheckpointError(f"{source} does not match the DUSt3R it describes; " + "; ".join(parts))
    for key in wanted:
        if tuple(state_dict[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)}, the model expects {tuple(expected[key].shape)}"
            )
        tensor = state_dict[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values; a usable DUSt3R has none "
                                  "(a diverged training run?)")
    model.load_state_dict(state_dict, strict=True)


# --- reading ------------------------------------------------------------------------------


def _read_pth(path: Path) -> tuple[dict, dict, list]:
    refused = (
        f"{path} was refused: it holds pickled objects other than tensors, containers and "
        "argparse.Namespace (read with torch.load(weights_only=True))"
    )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the refusal below says enough
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(refused) from None
    except Exception as exc:  # torch reports corrupt archives with several exception types
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(refused) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path} is not a DUSt3R checkpoint: expected a dict with 'model' (state_dict) and 'args'")
    pqk = ckpt.get("pqk")
    if isinstance(pqk, dict) and "config" in pqk:
        return pqk["config"], ckpt["model"], list(pqk.get("history", []))
    args = ckpt.get("args")
    model_str = getattr(args, "model", None) if args is not None else None
    if not isinstance(model_str, str):
        raise CheckpointError(f"{path} is not a DUSt3R checkpoint: no constructor string in args.model")
    kwargs = official_loader_rewrite(parse_constructor_string(model_str))
    return kwargs, ckpt["model"], []


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from pqk.io.files import read_safetensors

    return read_safetensors(path)


def _read_hf_folder(folder: Path) -> tuple[dict, dict]:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{folder} is not a DUSt3R checkpoint folder: expected config.json and model.safetensors"
        )
    state_dict, _ = _read_safetensors(weights_path)
    return _read_config_json(config_path), state_dict


def _read_config_json(config_path: Path) -> dict:
    try:
        kwargs = json.loads(config_path.read_text())  # Python's json reads Infinity
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{config_path} does not hold DUSt3R constructor arguments (expected a JSON object)")
    return kwargs


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], list]:
    """(constructor kwargs, state_dict, pqk history) from any supported layout."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        kwargs, sd = _read_hf_folder(path)
        return kwargs, sd, []
    if path.name == "config.json":
        kwargs, sd = _read_hf_folder(path.parent)
        return kwargs, sd, []
    if path.suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(path)
        if "pqk_config" in metadata:
            try:
                config, history = json.loads(metadata["pqk_config"]), json.loads(metadata.get("pqk_history", "[]"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: its pqk config metadata is not valid JSON ({exc.msg}); the file is damaged") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{path}: its pqk config metadata is not a JSON object of constructor arguments")
            return config, state_dict, history if isinstance(history, list) else []
        if (path.parent / "config.json").is_file():
            return _read_config_json(path.parent / "config.json"), state_dict, []
        raise CheckpointError(
            f"{path} has no DUSt3R config: expected pqk metadata or a config.json beside it"
        )
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _read_pth(path)
    raise CheckpointError(
        f"checkpoint {path} has an unknown format; accepted: an official .pth, a Hugging Face folder "
        "(config.json + model.safetensors), or a pqk .pth/.safetensors"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AsymmetricCroCo3DStereo:
    """Build the DUSt3R a checkpoint describes and load its weights strictly; eval mode."""
    kwargs, state_dict, history = read_checkpoint(path)
    try:
        model = build_model(**kwargs)
    except PqkError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise CheckpointError(f"{path}: bad constructor arguments ({exc})") from None
    load_state_dict_strict(model, state_dict, str(path))
    model.pqk_history = history
    return model.to(device).eval()


# --- writing ------------------------------------------------------------------------------


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the DPT alias names (safetensors refuses shared tensors)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not _ALIAS.match(k)}


def save_model(model: AsymmetricCroCo3DStereo, path: str | Path, history: list | None = None) -> Path:
    """Save weights + config atomically; `.pth` (official layout + 'pqk') or `.safetensors`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_kwargs()
    history = list(history if history is not None else getattr(model, "pqk_history", []))
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        metadata = {"pqk_format": str(PQK_FORMAT), "pqk_config": json.dumps(config), "pqk_history": json.dumps(history)}
        save_file(_unique_state_dict(model), str(tmp), metadata=metadata)
    elif path.suffix == ".pth":
        ckpt = {
            "args": argparse.Namespace(model=constructor_string(model.config)),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "pqk": {"format": PQK_FORMAT, "config": config, "history": history},
        }
        torch.save(ckpt, tmp)
    else:
        raise CheckpointError(f"cannot save to {path}: use a .pth or .safetensors file name")
    _chmod_like_new_file(tmp)
    tmp.replace(path)
    return path


def _chmod_like_new_file(path: Path) -> None:
    """safetensors writes owner-only files; give the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
