"""Preparing the float graph for ORT's quantizer: its pre-processing (Linear -> Gemm),
named nodes, private copies of shared initializers that will be quantized, and the index
of the result.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnxruntime.quantization import quant_pre_process

from pqk.methods.quantize.files import _has_side_file, _save
from pqk.methods.quantize.graph import _Graph
from pqk.methods.quantize.keep import _weighted_nodes


def _name_unnamed_nodes(proto: onnx.ModelProto) -> None:
    # The quantizer selects and excludes nodes by name.
    taken = {n.name for n in proto.graph.node if n.name}
    for k, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_pqk_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _unshare_quantized_initializers(proto: onnx.ModelProto) -> int:
    """Give nodes that may be quantized private copies of the initializers they share;
    returns the count.

    Exporters and ORT's optimizer deduplicate equal tensors (in a fresh model every bias is
    zero), and ORT's quantizer rewrites an initializer for all its consumers: a bias shared by
    two Gemms would get one Gemm's int32 scale (input scale x weight scale) for both, and a
    float LayerNorm sharing it would read the int32 copy. A weight shared only by quantizable
    nodes (one Linear applied to both views) stays shared: its quantization is the same for each.
    LayerNorms count as quantizable: the keep-list ablation quantizes their gamma and beta.
    """
    graph = _Graph(proto)
    quantizable = _weighted_nodes(graph) + [n for n in graph.nodes if n.op_type == "LayerNormalization"]
    names = {n.name for n in quantizable}
    tensors = {t.name: t for t in proto.graph.initializer}
    copies = 0
    for node in quantizable:
        for index in (1, 2):
            name = node.input[index] if index < len(node.input) else ""
            users = graph.consumers.get(name, [])
            if name not in tensors or len(users) < 2:
                continue
            if index == 2 or any(u.name not in names for u in users):
                private = onnx.TensorProto()
                private.CopyFrom(tensors[name])
                private.name = f"{name}_pqk_{copies}"
                proto.graph.initializer.append(private)
                node.input[index] = private.name
                copies += 1
    if copies:
        _drop_unused_initializers(proto)
    return copies


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _prepare(fp32_onnx: Path, work: Path) -> tuple[Path, _Graph]:
    """The float graph ready for ORT's quantizer (saved under `work`) and its index.

    ORT's pre-processing fuses each Linear's MatMul + bias Add into a Gemm (with Reshapes for
    the token axis). That is what lets the QDQ graph run on INT8 kernels: ORT's CPU provider
    turns DQ -> Gemm (int32 bias) into QGemm, while DQ -> MatMul -> Add is first fused into a
    float Gemm at load time and then runs in float. Its other rewrites (Identity removal,
    constant folding) keep standard ONNX ops; symbolic shape inference is skipped because the
    exported shapes are static.
    """
    pre = work / "preprocessed.onnx"
    with _quiet_ort():
        quant_pre_process(
            str(fp32_onnx),
            str(pre),
            skip_symbolic_shape=True,
            save_as_external_data=_has_side_file(fp32_onnx),
            all_tensors_to_one_file=True,
            external_data_location=pre.name + ".data",
        )
    proto = onnx.load(str(pre))
    _name_unnamed_nodes(proto)
    _unshare_quantized_initializers(proto)
    prepared = work / "prepared.onnx"
    _save(proto, prepared)
    del proto
    # Reloaded without weight data: the index needs shapes only.
    return prepared, _Graph(onnx.load(str(prepared), load_external_data=False))


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    # ORT's quantization tools print progress (histograms) to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        yield
