"""Checkpoint formats that need more than a key rename, read and written as plain data.

- TorchScript archives (the OpenAI release files): `read_torchscript_tensors` unpickles
  `data.pkl` with an allow-list of globals (tensor rebuild, OrderedDict, storage types); every
  TorchScript class becomes an inert record of its attributes, and the archive's code files are
  read as text only for their `__parameters__` / `__buffers__` lists. Nothing from the file is
  executed.
- Hugging Face `CLIPModel` keys (clip-facts.md section 8): `to_hf_state_dict` /
  `from_hf_state_dict` (q/k/v split and joined, projections transposed, position_ids dropped).
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pqk.errors import CheckpointError

# --- TorchScript archives, read as data -----------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS_HEADER = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n?)*)", re.MULTILINE)


class _ScriptObject:
    """Stands for a TorchScript class: keeps the attributes pickle hands it and runs nothing."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl` with an allow-list of globals; storages from the zip."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and (name == "restore_type_tag" or name.startswith("build_")):
            return lambda value, *_: value  # typed-container tags: the value itself is enough
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        key = str(pid[2])
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=pid[1]) if raw else torch.empty(0, dtype=pid[1])
        return self.storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)  # bounds are checked by torch


def _declared_state(archive: zipfile.ZipFile, prefix: str) -> dict[str, list[str]]:
    """Class qualname -> its parameter then buffer names, from the `__parameters__` and
    `__buffers__` lines of the archive's code files (read as text, literal lists only)."""
    declared: dict[str, list[str]] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        for match in _CLASS_HEADER.finditer(archive.read(name).decode("utf-8", errors="replace")):
            names: list[str] = []
            for attr in ("__parameters__", "__buffers__"):
                line = re.search(rf"^  {attr} = (\[.*\])$", match.group(2), re.MULTILINE)
                names += ast.literal_eval(line.group(1)) if line else []
            declared[f"{module}.{match.group(1)}"] = names
    return declared


def _collect(obj: _ScriptObject, declared: dict[str, list[str]], prefix: str, out: dict) -> None:
    """Dotted names of parameters and buffers, in nn.Module.state_dict order."""
    state = obj.state if hasattr(obj, "state") else {}
    names = declared.get(obj.qualname)
    if names is None:  # no code file for the class: every tensor attribute
        names = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    for name in names:
        if isinstance(state.get(name), torch.Tensor):
            out[prefix + name] = state[name]
    for name, value in state.items():
        if isinstance(value, _ScriptObject):
            _collect(value, declared, f"{prefix}{name}.", out)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a TorchScript archive (what `torch.jit.load(path).state_dict()` gives),
    without executing anything from the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CheckpointError(f"{path} is a zip archive without one data.pkl; not a TorchScript file")
            prefix = pkl[0][: -len("/data.pkl")]
            unpickler = _ArchiveUnpickler(archive, prefix, archive.read(pkl[0]))
            root = unpickler.load()
            declared = _declared_state(archive, prefix)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} was refused: {exc}; only tensors are read from TorchScript archives") from None
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError, TypeError, UnicodeDecodeError,
            SyntaxError) as exc:
        raise CheckpointError(f"{path} is not a readable TorchScript archive ({type(exc).__name__})") from None
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path} is a TorchScript archive without a module in it")
    out: dict[str, torch.Tensor] = {}
    _collect(root, declared, "", out)
    return out


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 2)[1:2] == ["code"] or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --- Hugging Face CLIPModel layout ---------------------------------------------------------

_HF_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_HF_TOWERS = {"transformer.resblocks.": "text_model.encoder.layers.",
              "visual.transformer.resblocks.": "vision_model.encoder.layers."}
_HF_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
             "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_OFFICIAL_BLOCK_KEY = re.compile(r"^((?:visual\.)?transformer\.resblocks\.)(\d+)\.(.+)$")
_HF_BLOCK_KEY = re.compile(r"^((?:text|vision)_model\.encoder\.layers\.)(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official CLIP keys -> Hugging Face `CLIPModel` keys (q/k/v split, projections transposed)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _OFFICIAL_BLOCK_KEY.match(key):
            base = f"{_HF_TOWERS[m.group(1)]}{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            old = next((o for o in _HF_BLOCK if rest.startswith(o)), None)
            if old is None:
                raise CheckpointError(f"no Hugging Face name for CLIP key {key}")
            out[base + _HF_BLOCK[old] + rest[len(old):]] = value
        else:
            raise CheckpointError(f"no Hugging Face name for CLIP key {key}")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `CLIPModel` keys -> official keys; `position_ids` dropped, unknown keys kept
    unchanged (the strict load names them)."""
    top = {v: k for k, v in _HF_TOP.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # in_proj key -> {'q': ..., 'k': ..., 'v': ...}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif (m := _HF_BLOCK_KEY.match(key)) and (a := _HF_QKV.match(m.group(3))):
            base = f"{towers[m.group(1)]}{m.group(2)}.attn.in_proj_{a.group(2)}"
            qkv.setdefault(base, {})[a.group(1)] = value
        elif m and (old := next((h for h in block if m.group(3).startswith(h)), None)):
            out[f"{towers[m.group(1)]}{m.group(2)}.{block[old]}{m.group(3)[len(old):]}"] = value
        else:
            out[key] = value
    for base, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Hugging Face weights hold only {sorted(parts)} of q/k/v for {base}")
        out[base] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
