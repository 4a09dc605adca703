"""Inspecting a QDQ file: what its graph really quantizes (integer weights, per-channel
scales, quantized and float nodes) and which integer kernels ONNX Runtime's CPU provider
runs it on.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx

from pqk.methods.quantize.graph import _Graph

# What ONNX Runtime's CPU provider turns QDQ patterns into (its integer kernels), besides
# every QLinear* op (QLinearMatMul, QLinearConv, QLinearSoftmax, ...).
ORT_INT8_KERNELS = (
    "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention",
)
_FLOAT_WEIGHTED = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv")


def ort_cpu_kernels(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """How ONNX Runtime's CPU provider will run a QDQ file, read from the graph it optimizes:
    `int8`: integer kernel -> count; `float_weighted`: layers still computing in float on
    dequantized weights (no INT8 kernel matched their pattern). Also proves the file loads."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="pqk-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # its notes on the optimized graph are not the user's business
        # Level 2 holds the QDQ fusions; level 3 only adds layout changes for this very CPU.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        graph = _Graph(onnx.load(str(optimized), load_external_data=False))
    dq_outputs = {o for n in graph.nodes if n.op_type == "DequantizeLinear" for o in n.output}
    int8: dict[str, int] = defaultdict(int)
    float_weighted = 0
    for node in graph.nodes:
        if node.op_type in ORT_INT8_KERNELS or node.op_type.startswith("QLinear"):
            int8[node.op_type] += 1
        elif node.op_type in _FLOAT_WEIGHTED and any(i in dq_outputs for i in node.input[1:]):
            float_weighted += 1
    return {"int8": dict(sorted(int8.items())), "float_weighted": float_weighted}


_INTEGER_TYPES = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
}


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None


def _channel_axis(consumer: onnx.NodeProto, index: int, ndim: int) -> int | None:
    """Axis of the consumer's input `index` that runs over its output channels (None when
    the input has no such axis)."""
    op = consumer.op_type
    if index == 1 and op == "MatMul":
        return ndim - 1
    if index == 1 and op == "Conv":
        return 0
    if index == 1 and op == "Gemm":
        return 0 if _attr(consumer, "transB") else 1
    if index in (1, 2) and op == "LayerNormalization":
        return ndim - 1
    if index == 2 and op in ("Conv", "Gemm"):
        return 0
    return None


_ROLES = {1: "weight", 2: "bias"}


def _weight_entry(graph: _Graph, dq: onnx.NodeProto) -> dict[str, Any]:
    weight = graph.initializers[dq.input[0]]
    dims = tuple(weight.dims)
    scale_dims = graph.dims.get(dq.input[1]) or ()
    scale_len = math.prod(scale_dims) if scale_dims else 1
    axis = _attr(dq, "axis")
    consumer = next(iter(graph.consumers.get(dq.output[0], [])), None)
    index = list(consumer.input).index(dq.output[0]) if consumer is not None else -1
    out_axis = _channel_axis(consumer, index, len(dims)) if consumer is not None else None
    norm_axis = None if axis is None else axis % max(len(dims), 1)
    per_channel = (
        len(scale_dims) == 1 and scale_len > 1 and out_axis is not None
        and norm_axis == out_axis and scale_len == dims[out_axis]
    )
    return {
        "dtype": _INTEGER_TYPES[weight.data_type],
        "shape": list(dims),
        "scale_len": scale_len,
        "axis": axis,
        "per_channel": bool(per_channel),
        "role": _ROLES.get(index, "other"),
        "consumer": None if consumer is None else consumer.name,
        "consumer_op": None if consumer is None else consumer.op_type,
    }


def inspect_qdq(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a QDQ graph really quantizes.

    `weights`: integer initializers behind a DequantizeLinear, each with dtype, shape, role
    (weight or bias of its consumer; biases are int32), scale length, axis and whether its
    scale is per output channel of the node consuming it. `quantized`: op type -> nodes with an input coming from
    a DequantizeLinear (they can run on integer kernels). `float`: op type -> the other
    nodes (Q/DQ themselves left out).
    """
    graph = _Graph(onnx.load(str(onnx_path), load_external_data=False))
    weights: dict[str, dict[str, Any]] = {}
    dq_outputs: set[str] = set()
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear":
            continue
        dq_outputs.add(node.output[0])
        source = graph.initializers.get(node.input[0])
        if source is not None and source.data_type in _INTEGER_TYPES:
            weights[node.input[0]] = _weight_entry(graph, node)
    quantized: dict[str, list[str]] = defaultdict(list)
    floating: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        target = quantized if any(i in dq_outputs for i in node.input) else floating
        target[node.op_type].append(node.name)
    return {"weights": weights, "quantized": dict(quantized), "float": dict(floating)}
