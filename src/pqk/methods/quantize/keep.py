"""The quantization plan of an exported graph: which nodes are the keep-list kinds
(Softmax, the attention scale, LayerNorm), which carry weights, which MatMuls are
activation-only, and so which nodes ORT's quantizer may touch and which stay float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import onnx

from pqk.methods.quantize.graph import _Graph, _with_shapes
from pqk.methods.quantize.spec import _canonical_keep_list

# Only these carry weights worth INT8 kernels; everything else stays float unless a keep-list
# kind is dropped for an ablation.
WEIGHTED_OP_TYPES = ("MatMul", "Gemm", "Conv")
# A Linear's output stays float: ORT runs DQ -> Gemm as QGemm with float output, and a Q/DQ
# there would only add rounding (GELU, the residual Add read it in float anyway). A Conv needs
# its output Q: ORT's only INT8 Conv on the CPU is QLinearConv (DQ -> Conv -> Q).
FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm")
ACTIVATION_MATMUL = "activation_matmul"


def _layernorm_nodes(graph: _Graph) -> list[str]:
    # export_onnx emits opset >= 17, where the legacy exporter writes LayerNormalization as one
    # node rather than the ReduceMean/Sub/Pow/Sqrt/Div chain of older opsets.
    return [n.name for n in graph.nodes if n.op_type == "LayerNormalization"]


def _softmax_nodes(graph: _Graph) -> list[str]:
    return [n.name for n in graph.nodes if n.op_type == "Softmax"]


def _scale_operand(graph: _Graph, node: onnx.NodeProto) -> str | None:
    """The non-scalar input of a Mul/Div by a scalar, else None."""
    if node.op_type == "Mul" and len(node.input) == 2:
        a, b = node.input
        if graph.is_scalar(b):
            return a
        if graph.is_scalar(a):
            return b
    if node.op_type == "Div" and len(node.input) == 2 and graph.is_scalar(node.input[1]):
        return node.input[0]
    return None


# Ops that may sit between q·kᵀ and Softmax (mask, dtype casts) or between q / k and q·kᵀ
# (head reshapes); the walks pass through them looking for the scale.
_SCORE_PASS = ("Add", "Cast", "Reshape")
_OPERAND_PASS = ("Transpose", "Reshape", "Cast")
_MAX_WALK = 4


def _score_matmul(graph: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto | None, list[str]]:
    """Walk from Softmax up to q·kᵀ (a MatMul of two activations), collecting any scale
    applied to the product. (None, []) when Softmax is not fed by such a product."""
    name, scales = softmax.input[0], []
    for _ in range(_MAX_WALK):
        node = graph.producer.get(name)
        if node is None:
            break
        if node.op_type == "MatMul":
            # A Softmax over a Linear's output (a classifier) is no attention.
            if any(graph.is_weight(i) for i in node.input):
                break
            return node, scales
        operand = _scale_operand(graph, node)
        if operand is not None:
            scales.append(node.name)
            name = operand
        elif node.op_type in _SCORE_PASS:
            name = node.input[0]
        else:
            break
    return None, []


def _operand_scale(graph: _Graph, name: str) -> str | None:
    """A scalar Mul/Div on q or k before the product (the legacy exporter's SDPA lowering
    scales q and kᵀ each by sqrt(1/sqrt(d)))."""
    for _ in range(_MAX_WALK):
        node = graph.producer.get(name)
        if node is None:
            return None
        if _scale_operand(graph, node) is not None:
            return node.name
        if node.op_type not in _OPERAND_PASS:
            return None
        name = node.input[0]
    return None


def _attention_scale_nodes(graph: _Graph) -> list[str]:
    found: list[str] = []
    for softmax in (n for n in graph.nodes if n.op_type == "Softmax"):
        matmul, scales = _score_matmul(graph, softmax)
        if matmul is None:
            continue
        found.extend(scales)
        for operand in matmul.input:
            scale = _operand_scale(graph, operand)
            if scale is not None:
                found.append(scale)
    return list(dict.fromkeys(found))


_KIND_FINDERS: dict[str, Callable[[_Graph], list[str]]] = {
    "Softmax": _softmax_nodes,
    "attention_scale": _attention_scale_nodes,
    "LayerNorm": _layernorm_nodes,
}


def _activation_matmuls(graph: _Graph) -> list[str]:
    # q·kᵀ and attn·v: INT8 there makes ORT slower on this CPU (cpu-int8-notes), so float
    # unless the spec's `attention` mode asks for them (OpenVINO fuses them into INT8 attention).
    return [
        n.name for n in graph.nodes if n.op_type == "MatMul" and not any(graph.is_weight(i) for i in n.input)
    ]


def _score_matmuls(graph: _Graph) -> list[str]:
    """The q·kᵀ MatMul of every attention (the one that feeds a Softmax)."""
    found = (_score_matmul(graph, s)[0] for s in graph.nodes if s.op_type == "Softmax")
    return [m.name for m in found if m is not None]


ATTENTION_QK, ATTENTION_PV = "attention_qk", "attention_pv"


def _attention_split(graph: _Graph, mode: str) -> tuple[dict[str, list[str]], list[str]]:
    """(kinds to quantize, activation MatMuls kept float) for an attention mode (spec.ATTENTION_MODES)."""
    matmuls = _activation_matmuls(graph)
    if mode == "float":
        return {}, matmuls
    qk = set(_score_matmuls(graph))
    dropped = {ATTENTION_QK: [m for m in matmuls if m in qk]}
    if mode == "int8_qkv":
        dropped[ATTENTION_PV] = [m for m in matmuls if m not in qk]
    quantized = {n for names in dropped.values() for n in names}
    return dropped, [m for m in matmuls if m not in quantized]


def _weighted_nodes(graph: _Graph) -> list[onnx.NodeProto]:
    return [
        n for n in graph.nodes if n.op_type in WEIGHTED_OP_TYPES and len(n.input) > 1 and graph.is_weight(n.input[1])
    ]


@dataclass
class _Plan:
    """Which nodes ORT's quantizer may touch and which stay float, and why."""

    weighted: list[onnx.NodeProto]
    kept: dict[str, list[str]]  # keep-list kind -> nodes kept in float
    dropped: dict[str, list[str]]  # kind left off the keep-list -> nodes to quantize
    activation_matmuls: list[str]

    @property
    def nodes_to_quantize(self) -> list[str]:
        names = [n.name for n in self.weighted] + [n for names in self.dropped.values() for n in names]
        return list(dict.fromkeys(names))

    def op_types(self, graph: _Graph) -> list[str]:
        by_name = {n.name: n.op_type for n in graph.nodes}
        return sorted({by_name[n] for n in self.nodes_to_quantize})

    @property
    def nodes_to_exclude(self) -> list[str]:
        names = [n for names in self.kept.values() for n in names] + self.activation_matmuls
        return list(dict.fromkeys(names))

    def excluded_counts(self) -> dict[str, int]:
        counts = {kind: len(names) for kind, names in self.kept.items()}
        counts[ACTIVATION_MATMUL] = len(self.activation_matmuls)
        return counts


def _plan(graph: _Graph, keep_list: Sequence[str], attention: str = "float") -> _Plan:
    keep = _canonical_keep_list(keep_list)
    kinds = {kind: finder(graph) for kind, finder in _KIND_FINDERS.items()}
    attention_kinds, float_matmuls = _attention_split(graph, attention)
    return _Plan(
        weighted=_weighted_nodes(graph),
        kept={k: v for k, v in kinds.items() if k in keep},
        dropped={**{k: v for k, v in kinds.items() if k not in keep}, **attention_kinds},
        activation_matmuls=float_matmuls,
    )


FLOAT_MODULES = "float_modules"


def _keep_modules_float(plan: _Plan, modules: Sequence[str]) -> _Plan:
    """The plan with the weighted nodes of `modules` moved to the kept-in-float side."""
    if not modules:
        return plan
    from pqk.backends.torch_int8 import node_module_path

    wanted = set(modules)
    kept = [n for n in plan.weighted if node_module_path(n.name, wanted) is not None]
    if not kept:
        return plan
    names = {n.name for n in kept}
    return replace(plan, weighted=[n for n in plan.weighted if n.name not in names],
                   kept={**plan.kept, FLOAT_MODULES: [n.name for n in kept]})


def keep_list_node_names(onnx_model: onnx.ModelProto, keep_list: Sequence[str]) -> list[str]:
    """Names of the nodes to keep in float for `keep_list` (operator kinds, see KEEP_KINDS),
    plus the activation-only attention MatMuls, which are always kept in float.

    Softmax -> Softmax nodes; LayerNorm -> LayerNormalization nodes; attention_scale -> the
    scalar Mul/Div that scales q·kᵀ, whether applied to the product or to q and kᵀ.
    A graph past 2 GiB must come loaded with `load_external_data=False` (shape inference
    serializes it).
    """
    return _plan(_Graph(_with_shapes(onnx_model)), keep_list).nodes_to_exclude
