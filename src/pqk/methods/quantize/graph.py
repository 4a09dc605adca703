"""Reading an ONNX graph: the producer/consumer index with static sizes and initializer
aliases that the keep-list patterns, the preparation and the inspection all walk.
"""

from __future__ import annotations

import math
from collections import defaultdict

import onnx


class _Graph:
    """Producer/consumer index of a graph, with the static sizes the patterns need."""

    def __init__(self, proto: onnx.ModelProto):
        graph = proto.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.aliases = _initializer_aliases(proto)
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.dims: dict[str, tuple[int, ...] | None] = {}
        for info in (*graph.value_info, *graph.input, *graph.output):
            self.dims[info.name] = _value_info_dims(info)
        for node in self.nodes:
            if node.op_type == "Constant":
                self.dims[node.output[0]] = _constant_dims(node)
        for name, tensor in self.initializers.items():
            self.dims[name] = tuple(tensor.dims)

    def is_weight(self, name: str) -> bool:
        return name in self.initializers or name in self.aliases

    def is_scalar(self, name: str) -> bool:
        dims = self.dims.get(name)
        return dims is not None and math.prod(dims) == 1


def _value_info_dims(info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor = info.type.tensor_type
    if not tensor.HasField("shape") or any(not d.HasField("dim_value") for d in tensor.shape.dim):
        return None
    return tuple(d.dim_value for d in tensor.shape.dim)


def _constant_dims(node: onnx.NodeProto) -> tuple[int, ...] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return tuple(attr.t.dims)
        if attr.name in ("value_float", "value_int"):
            return ()
    return None


def _with_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    # Scalar operands computed at run time (the legacy exporter's attention scale comes from
    # Shape -> Sqrt) only have a size after shape inference.
    if len(proto.graph.value_info):
        return proto
    return onnx.shape_inference.infer_shapes(proto)


def _initializer_aliases(proto: onnx.ModelProto) -> dict[str, str]:
    """Identity outputs that are just an initializer (through chains): output -> initializer.

    The legacy exporter deduplicates equal tensors into Identity nodes (a second use of one
    Linear's weight, equal zero biases). Graph outputs are left alone: they must keep their name.
    """
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Identity" or not node.input or node.output[0] in outputs:
            continue
        source = alias.get(node.input[0], node.input[0])
        if source in initializers:
            alias[node.output[0]] = source
    return alias
