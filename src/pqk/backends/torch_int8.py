"""PyTorch/oneDNN INT8 runtime for a QDQ ONNX model: the same integers, a faster CPU engine.

`ptq_int8.onnx` (pqk.methods.quantize) is the portable artifact. On this CPU, PyTorch's
oneDNN INT8 GEMM (AMX/VNNI) with attention in bf16 is the fastest runtime measured
(shared/design/cpu-int8-notes.md: 3.3x vs eager fp32 per ViT-L block, ONNX Runtime QDQ 2.4x).
`int8_model_from_qdq` therefore reads the QDQ file and rebuilds the float PyTorch model with
every quantized Linear replaced by `Int8Linear` holding exactly the file's int8 weights,
per-channel weight scales and calibrated activation scale / zero point. Quality and latency
measured on it are those of that quantized model, run by another engine.

Differences from ONNX Runtime, by design: a Linear's output is returned in float (ONNX
Runtime may re-quantize it before the next float op), the 16x16 patch-embedding Conv stays
float, and with `bf16_attention` the activation-only part of attention (q·kᵀ, softmax, ·v)
runs in bf16 (kept out of INT8 by the keep-list; bf16 is what makes it stop being the
bottleneck once the Linears are INT8), and so do a DPT head's convolutions (ONNX Runtime runs
them from the file's int8 Conv weights; here they stay float weights computed in bf16).
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from pqk.errors import InputError

_DQ = "DequantizeLinear"
# "/model/enc_blocks.0/attn/qkv/MatMul/MatMulAddFusion" -> "enc_blocks.0/attn/qkv"
_NODE_MODULE = re.compile(r"^/(?:model/)?(?P<path>.+?)/(?:MatMul|Gemm)(?:_\d+)?(?:/.*)?$")


def node_module_path(node_name: str, known) -> str | None:
    """The module path a weighted MatMul/Gemm node was exported from, or None.

    The exporter names nodes by module scope and suffixes "_1", "_2"... to the scope of a
    module called more than once (DUSt3R's decoder_embed runs once per view), so a suffixed
    segment is read as its module when the suffixed name is not a module itself."""
    match = _NODE_MODULE.match(node_name)
    if match is None:
        return None
    path = match.group("path").replace("/", ".")
    if path in known:
        return path
    base = re.sub(r"_\d+(?=\.|$)", "", path)
    return base if base in known else None


def merged_range(calls: list[tuple[float, int]]) -> tuple[float, int]:
    """One uint8 (scale, zero point) covering the ranges of several calls of one module."""
    low = min(-zp * scale for scale, zp in calls)
    high = max((255 - zp) * scale for scale, zp in calls)
    if len(calls) == 1:
        return calls[0]
    scale = (high - low) / 255.0
    return scale, int(round(-low / scale))


def onednn_int8_available() -> bool:
    """Whether this PyTorch build has the oneDNN INT8 linear kernels (x86 CPU builds do)."""
    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


class Int8Linear(nn.Module):
    """y = dequant(quant_u8(x) @ int8 weightᵀ) + bias, by oneDNN, float output.

    Activations: uint8, one calibrated scale and zero point. Weights: int8, symmetric, one
    scale per output channel (zero points 0). `input_threshold` > 0 keeps a TEAL-sparsified
    Linear's mask (pqk.methods.teal), applied to the float input before quantizing: entries
    with |x| <= t, or with `structured`, the channels whose mean |x| over an item's tokens is <= t."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float, input_zero_point: int, input_threshold: float = 0.0, structured: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self.input_threshold = float(input_threshold)
        self.structured = bool(structured)
        # Kept for inspection and state_dict; the packed copy is what runs.
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.long))
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self._packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.float() / self.input_scale) + self.input_zero_point
        return q.clamp_(0, 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        t = self.input_threshold
        if t > 0:  # the same mask as the float model's SparseInputLinear (and the QDQ graph)
            x = x * ((x.abs().mean(dim=-2, keepdim=True) if self.structured else x.abs()) > t)
        qx = self._quantize(x.reshape(-1, self.in_features))
        y = torch.ops.onednn.qlinear_pointwise(
            qx, self.input_scale, self.input_zero_point, self._packed, self.weight_scale,
            self.weight_zero_point, self.bias, 1.0, 0, torch.float32, "none", [], "",
        )
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        sparse = f", input_threshold={self.input_threshold:.4g}" if self.input_threshold > 0 else ""
        return f"in={self.in_features}, out={self.out_features}, x_scale={self.input_scale:.3g}, x_zp={self.input_zero_point}{sparse}"


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _constant(name: str, inits: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in inits:
        return inits[name]
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _dequantize_params(node: onnx.NodeProto, inits, producers) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(integer tensor if constant, scale, zero point) of a DequantizeLinear node."""
    value = _constant(node.input[0], inits, producers)
    scale = _constant(node.input[1], inits, producers)
    zero = _constant(node.input[2], inits, producers) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=np.int8)
    return value, scale, zero


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def qdq_linear_params(qdq_path: str | Path, module_names=None) -> dict[str, dict]:
    """Per Linear quantized in a QDQ file (keyed by module path): its int8 weight as (out, in),
    per-output-channel scales, bias and the input's scale / zero point. A module called more
    than once (one node per call) gets one range covering all its calls; `calls` keeps each.
    `module_names` resolves the exporter's "_1" scope suffixes (default: taken literally)."""
    proto = onnx.load(str(qdq_path))
    graph = proto.graph
    inits = _initializers(graph)
    producers = {out: n for n in graph.node for out in n.output}
    found: dict[str, dict] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if module_names is None:
            match = _NODE_MODULE.match(node.name)
            path = None if match is None else match.group("path").replace("/", ".")
        else:
            path = node_module_path(node.name, module_names)
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if path is None or x_dq is None or w_dq is None or x_dq.op_type != _DQ or w_dq.op_type != _DQ:
            continue
        weight, w_scale, w_zero = _dequantize_params(w_dq, inits, producers)
        _, x_scale, x_zero = _dequantize_params(x_dq, inits, producers)
        if weight is None or x_scale is None or x_scale.size != 1 or weight.dtype != np.int8:
            continue
        if np.any(w_zero != 0):
            continue  # oneDNN's INT8 GEMM wants symmetric weights
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
        w_out_in = weight if trans_b else weight.T  # MatMul weights are stored (in, out)
        scale = np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (w_out_in.shape[0],))
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            b_name = node.input[2]
            b_dq = producers.get(b_name)
            if b_dq is not None and b_dq.op_type == _DQ:
                b_val, b_scale, b_zero = _dequantize_params(b_dq, inits, producers)
                bias = (b_val.astype(np.float64) - b_zero) * b_scale
            else:
                bias = _constant(b_name, inits, producers)
        call = (float(np.asarray(x_scale).reshape(())), int(np.asarray(x_zero).reshape(())))
        if path in found:
            found[path]["calls"].append(call)
            found[path]["nodes"].append(node.name)
            continue
        found[path] = {
            "nodes": [node.name],
            "weight_int8": np.ascontiguousarray(w_out_in),
            "weight_scale": scale.copy(),
            "bias": None if bias is None else np.asarray(bias, np.float32),
            "calls": [call],
        }
    for entry in found.values():
        entry["input_scale"], entry["input_zero_point"] = merged_range(entry["calls"])
    return found


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` of `root` by `module`."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def int8_model_from_qdq(
    model: nn.Module, qdq_path: str | Path, bf16_attention: bool = True, float_modules=(), params: dict | None = None,
) -> tuple[nn.Module, dict]:
    """A copy of the float `model` running the QDQ file's INT8 Linears on oneDNN.

    Returns (int8 model, report). Linears absent from the file (or not quantized in it) stay
    float and are listed in the report; a Linear whose float bias is missing from the Gemm
    keeps the model's own bias (MatMul + Add exports). `float_modules` stay float even if
    quantized in the file (sensitivity probes); `params` reuses an already parsed file."""
    if not onednn_int8_available():
        raise InputError("this PyTorch build has no oneDNN INT8 kernels (torch.ops.onednn.qlinear_pointwise)")
    qdq_path = Path(qdq_path)
    if not qdq_path.is_file():
        raise InputError(f"QDQ ONNX model not found: {qdq_path}")
    if params is None:
        params = qdq_linear_params(qdq_path, {n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    float_modules = set(float_modules)
    out = copy.deepcopy(model).eval()
    converted, kept = [], []
    for name, module in list(out.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        entry = params.get(name)
        if name in float_modules or entry is None or tuple(entry["weight_int8"].shape) != tuple(module.weight.shape):
            kept.append(name)
            continue
        bias = entry["bias"]
        bias_t = torch.from_numpy(bias) if bias is not None else (None if module.bias is None else module.bias.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_module(out, name, Int8Linear(
                torch.from_numpy(entry["weight_int8"]), torch.from_numpy(entry["weight_scale"]), bias_t,
                entry["input_scale"], entry["input_zero_point"],
                # a TEAL SparseInputLinear's mask goes with it (plain Linears have none)
                getattr(module, "input_threshold", 0.0), getattr(module, "structured", False),
            ))
        converted.append(name)
    if not converted:
        raise InputError(f"{qdq_path} has no quantized Linear layer that matches this model's modules")
    bf16_heads = 0
    if bf16_attention:
        set_attention_dtype(out, torch.bfloat16)
        bf16_heads = bf16_dpt_heads(out)
    report = {
        "runtime": "torch oneDNN int8" + (" + bf16 attention" if bf16_attention else "")
        + (" + bf16 DPT heads" if bf16_heads else ""),
        "int8_linears": len(converted),
        "merged_calls": sorted(k for k in converted if len(params[k]["calls"]) > 1),
        "float_linears": kept,
        "source": str(qdq_path),
    }
    return out, report


class Bf16Autocast(nn.Module):
    """Runs a float sub-network (the DPT head's convolutions) under bf16 autocast, float32 out."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.inner(*args, **kwargs)
        return out.float() if torch.is_tensor(out) else out


def bf16_dpt_heads(model: nn.Module) -> int:
    """Wrap each DPT head's adapter (all convolutions, no Linear to quantize) in bf16 autocast;
    its output is cast back before the float post-processing (exp of depth and confidence)."""
    count = 0
    for name in ("downstream_head1", "downstream_head2"):
        head = getattr(model, name, None)
        if head is not None and hasattr(head, "dpt") and not isinstance(head.dpt, Bf16Autocast):
            head.dpt = Bf16Autocast(head.dpt)
            count += 1
    return count


def set_attention_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every attention core (q·kᵀ, softmax, ·v) of `model` in `dtype` (None = as inputs)."""
    from pqk.models.dust3r.model import Attention, CrossAttention

    for module in model.modules():
        if isinstance(module, (Attention, CrossAttention)):
            module.core_dtype = dtype
