"""The form OpenVINO reads pqk's QDQ files in: each Linear as a MatMul on the token tensor.

pqk's QDQ file is written for ONNX Runtime, whose CPU provider runs a Linear on INT8 kernels
only as `DQ -> Gemm` (pqk.methods.quantize.prepare). A Gemm is 2-D, so ORT's pre-processing
wraps each Linear in Reshapes: `x (B, N, ...) -> Reshape (B·N, K) -> Q -> DQ -> Gemm -> Reshape`.
OpenVINO keeps those Reshapes in its compiled graph and, with a Reshape between the MatMul and
the bias, cannot fuse the bias into its INT8 FullyConnected: on the embedded teacher its
compiled graph held 85 more Reshapes and 59 more element-wise kernels (bias additions) than the
same model quantized by NNCF, whose graph has no Gemm.

`matmul_form` rewrites each such Linear as `x -> [Reshape (B, N, K)] -> Q -> DQ -> MatMul -> Add`,
with the same QuantizeLinear scale and zero point, the same weights and bias: quantization is
element-wise, so quantizing the 3-D tensor gives the integers of the 2-D one, and the rewrite
changes the float summation order only. The Reshape that followed the Gemm stays (its target
shape is explicit, so it reads the 3-D tensor as it read the 2-D one). The file on disk is not
touched: `OvPairRunner` applies this in memory to the model it compiles.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain_gemm(node: onnx.NodeProto) -> bool:
    a = _attrs(node)
    return (node.op_type == "Gemm" and not a.get("transA", 0) and not a.get("transB", 0)
            and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0)


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    return shapes


def matmul_form(proto: onnx.ModelProto) -> int:
    """Rewrite `proto` in place (module docstring); returns how many Linears were rewritten."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT64}
    gemms = [n for n in graph.node if _plain_gemm(n)]
    if not gemms:
        return 0
    shapes = _static_shapes(proto)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    extra_inits = []
    for gemm in gemms:
        dq = producer.get(gemm.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        flat = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if flat is None or flat.op_type != "Reshape" or len(consumers[q.output[0]]) != 1 or len(consumers[dq.output[0]]) != 1:
            continue
        # Every reader of the Gemm's output must be a Reshape to an explicit shape (no 0 = "copy").
        readers = consumers[gemm.output[0]]
        if not readers or any(r.op_type != "Reshape" or r.input[1] not in constants or (constants[r.input[1]] == 0).any()
                              for r in readers):
            continue
        source = shapes.get(flat.input[0])
        if source is None or len(source) < 3:
            continue
        tag = gemm.name or gemm.output[0]
        nodes = []
        tokens = flat.input[0]
        if len(source) > 3:  # e.g. (B, N, heads, head_dim) -> (B, N, heads·head_dim)
            shape_name = f"{tag}/pqk_ov_shape"
            extra_inits.append(numpy_helper.from_array(np.array([source[0], source[1], int(np.prod(source[2:]))],
                                                                dtype=np.int64), shape_name))
            tokens = f"{tag}/pqk_ov_tokens"
            nodes.append(helper.make_node("Reshape", [flat.input[0], shape_name], [tokens], name=f"{tag}/pqk_ov_Reshape"))
        nodes.append(helper.make_node("QuantizeLinear", [tokens, *q.input[1:]], [f"{tag}/pqk_ov_q"], name=f"{tag}/pqk_ov_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}/pqk_ov_q", *dq.input[1:]], [f"{tag}/pqk_ov_dq"],
                                      name=f"{tag}/pqk_ov_DQ"))
        has_bias = len(gemm.input) > 2 and gemm.input[2]
        mm_out = f"{tag}/pqk_ov_mm" if has_bias else gemm.output[0]
        nodes.append(helper.make_node("MatMul", [f"{tag}/pqk_ov_dq", gemm.input[1]], [mm_out], name=f"{tag}/pqk_ov_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, gemm.input[2]], [gemm.output[0]], name=f"{tag}/pqk_ov_Add"))
        replaced[id(gemm)] = nodes
        dropped.update({id(q), id(dq)})
        if len(consumers[flat.output[0]]) == 1:
            dropped.add(id(flat))
    if not replaced:
        return 0
    # The new nodes take the Gemm's place in the (topologically sorted) node list: everything
    # they read (the token tensor, weights, scales) is produced before it.
    order = []
    for n in graph.node:
        if id(n) in replaced:
            order.extend(replaced[id(n)])
        elif id(n) not in dropped:
            order.append(n)
    graph.initializer.extend(extra_inits)
    del graph.node[:]
    graph.node.extend(order)
    return len(replaced)
