"""Rotate applied to a DUSt3R: which Linears are touched and how, and the saved form.

The layers are the Linears of the encoder and decoder blocks (qkv, proj, fc1, fc2 and the
cross-attention's projq/projk/projv/proj); the patch embedding, decoder_embed and the heads
stay float. Hadamard (QuaRot-style):

- folded (free at run time): the value path. Attention output is linear in V per head, so
  rotating each head's values by H_h (H_hᵀ into the v rows of qkv / projv, and their bias)
  and un-rotating in proj's input columns (Wp[:, head] H_h) leaves the float output exactly
  as it was, while proj now reads rotated — flattened — attention outputs.
- online: every Linear fed by a LayerNorm (qkv, projq, projk, projv, fc1) or by GELU (fc2).
  Neither commutes with a rotation, so x is rotated at run time (x H, a `KroneckerTransform`)
  and the Linear holds W' = W H, so that (x H) W'ᵀ = x H Hᵀ Wᵀ = x Wᵀ.

FlatQuant-style: every block Linear gets its own learned online transform (no fold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pqk.backends.torch_int8 import set_module
from pqk.errors import InputError
from pqk.methods.rotate.flatquant import fit_affine
from pqk.methods.rotate.transforms import (
    FLOAT_BITS, KroneckerTransform, TransformedLinear, hadamard_like, kron_factors,
)

BLOCK_STACKS = ("enc_blocks", "dec_blocks", "dec_blocks2")
# Linears whose input comes from a LayerNorm or GELU: rotated online.
ONLINE_LEAVES = ("qkv", "projq", "projk", "projv", "fc1", "fc2")
LAYOUT_FORMAT = 1


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The plain Linears of the encoder and decoder blocks, by module path (not the ones
    already inside a TransformedLinear)."""
    if not any(isinstance(getattr(model, s, None), nn.ModuleList) for s in BLOCK_STACKS):
        raise InputError(f"rotate needs a DUSt3R model (encoder and decoder blocks); got {type(model).__name__}")
    wrapped = {name for name, m in model.named_modules() if isinstance(m, TransformedLinear)}
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and name.split(".", 1)[0] in BLOCK_STACKS and name.rpartition(".")[0] not in wrapped}


@torch.no_grad()
def fold_value_rotations(model: nn.Module) -> list[str]:
    """Rotate each attention head's values by H_h and undo it in proj (see the module
    docstring); returns the proj layers whose input is now rotated."""
    from pqk.models.dust3r.model import Attention, CrossAttention

    folded = []
    for name, attn in model.named_modules():
        if name.split(".", 1)[0] not in BLOCK_STACKS or not isinstance(attn, (Attention, CrossAttention)):
            continue
        nh, hd = attn.num_heads, attn.head_dim
        inner = nh * hd
        # qkv stacks q, k, v rows; projv is v alone.
        values, first = (attn.qkv, 2 * inner) if isinstance(attn, Attention) else (attn.projv, 0)
        h = hadamard_like(hd)
        rows = slice(first, first + inner)
        w = values.weight.double()
        w[rows] = (h.T @ w[rows].reshape(nh, hd, -1)).reshape(inner, -1)  # H_hᵀ W_v,h per head
        values.weight.copy_(w)
        if values.bias is not None:
            b = values.bias.double()
            b[rows] = (b[rows].reshape(nh, hd) @ h).reshape(inner)  # b_h H_h (a row vector)
            values.bias.copy_(b)
        wp = attn.proj.weight.double()
        attn.proj.weight.copy_((wp.reshape(-1, nh, hd) @ h).reshape(wp.shape))  # Wp[:, head] H_h
        folded.append(f"{name}.proj")
    return folded


def apply_hadamard(model: nn.Module) -> dict[str, list[str]]:
    """Fold the value-path rotations and wrap the LayerNorm/GELU-fed Linears with an online
    Hadamard-like rotation (in place). Returns the folded and online layer names."""
    linears = block_linears(model)
    folded = fold_value_rotations(model)
    online = []
    for name, linear in linears.items():
        if name.rsplit(".", 1)[-1] in ONLINE_LEAVES:
            n1, n2 = kron_factors(linear.in_features)
            set_module(model, name, TransformedLinear.build(linear, hadamard_like(n1), hadamard_like(n2)))
            online.append(name)
    return {"folded": folded, "online": online}


def apply_flatquant(model: nn.Module, inputs: dict[str, torch.Tensor], bits_w: int, bits_a: int, *, init: str,
                    steps: int, lr: float, log: Callable[[str], None] = print) -> dict[str, list]:
    """Fit and install a learned affine transform on every block Linear (in place), each on
    its captured input rows `inputs[name]`. Returns per layer [plain, before, after] losses
    and the start taken."""
    losses = {}
    for name, linear in block_linears(model).items():
        fit = fit_affine(inputs[name], linear.weight, bits_w, bits_a, init=init, steps=steps, lr=lr)
        set_module(model, name, TransformedLinear.build(linear, fit.left, fit.right, fit.scale))
        losses[name] = [fit.loss_plain, fit.loss_before, fit.loss_after, fit.init]
    log(f"rotate flatquant: {len(losses)} layers fitted")
    return losses


def set_fake_quant_bits(model: nn.Module, bits_w: int, bits_a: int) -> int:
    """Fake-quantize every block Linear at W`bits_w`A`bits_a` (32: float), wrapping the
    ones still plain (in place). Returns how many layers are quantized."""
    if bits_w < FLOAT_BITS or bits_a < FLOAT_BITS:
        for name, linear in block_linears(model).items():
            set_module(model, name, TransformedLinear(linear))
    count = 0
    for module in model.modules():
        if isinstance(module, TransformedLinear):
            module.bits_w, module.bits_a = bits_w, bits_a
            count += bits_w < FLOAT_BITS or bits_a < FLOAT_BITS
    return count


# --- saved form -----------------------------------------------------------------------------


def layout(model: nn.Module) -> dict[str, Any]:
    """Per TransformedLinear: None (quantization only) or its transform's shape."""
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformedLinear):
            t = module.transform
            out[name] = None if t is None else {"left": t.left.shape[0], "right": t.right.shape[0],
                                                "scaled": t.inv_scale is not None}
    return out


def install_layout(model: nn.Module, layers: dict[str, Any], bits_w: int, bits_a: int) -> None:
    """Give a plain model the modules `layout` described (identity placeholders that the saved
    state_dict then fills)."""
    for name, desc in layers.items():
        linear = model.get_submodule(name)
        transform = None
        if desc is not None:
            n1, n2 = int(desc["left"]), int(desc["right"])
            transform = KroneckerTransform(torch.eye(n1), torch.eye(n2), torch.ones(n1 * n2) if desc["scaled"] else None)
        set_module(model, name, TransformedLinear(linear, transform, bits_w, bits_a))


def layout_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_rotated(model: nn.Module, path: Path, info: dict[str, Any]) -> Path:
    """The whole transformed state_dict as safetensors at `path` and, beside it (.json), what
    rebuilds the modules: the DUSt3R config, the bits and each transformed layer's shape."""
    from safetensors.torch import save_file

    from pqk.io.files import write_json
    from pqk.models.dust3r.checkpoint import _unique_state_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": LAYOUT_FORMAT, "dust3r_kwargs": model.config.to_kwargs(), **info, "layers": layout(model)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_unique_state_dict(model), str(tmp))
    tmp.replace(path)
    write_json(layout_path(path), doc)  # to_kwargs writes DUSt3R's ±inf as strings: plain JSON
    return path


def load_rotated(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model `save_rotated` wrote, rebuilt module for module; eval mode."""
    from safetensors.torch import load_file

    from pqk.models.dust3r import build_model
    from pqk.models.dust3r.checkpoint import load_state_dict_strict

    path = Path(path)
    if not path.is_file() or not layout_path(path).is_file():
        raise InputError(f"rotated model not found: {path} (with {layout_path(path).name} beside it)")
    doc = json.loads(layout_path(path).read_text())
    model = build_model(**doc["dust3r_kwargs"])
    install_layout(model, doc["layers"], int(doc["bits_w"]), int(doc["bits_a"]))
    load_state_dict_strict(model, load_file(str(path)), str(path))
    return model.to(device).eval()
