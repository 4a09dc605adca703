"""Writing the QDQ graph: ORT's static quantizer run on the prepared graph with the plan and
the calibrated (or imposed) ranges, then the portable file (IR version, opsets, metadata).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from pqk.backends.onnx_export import lower_ir_version
from pqk.methods.quantize.files import _has_side_file, _save
from pqk.methods.quantize.graph import _Graph
from pqk.methods.quantize.keep import FLOAT_OUTPUT_OP_TYPES, _Plan
from pqk.methods.quantize.prepare import _quiet_ort
from pqk.methods.quantize.ranges import _calibrate, _impose_ranges
from pqk.methods.quantize.spec import CALIBRATION_METHODS, QuantSpec

# uint8 activations x int8 weights is the kernel ORT runs fast on x86 (VNNI/AMX); int8 x int8
# is a ~25x slower fallback here (shared/design/cpu-int8-notes.md).
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8


def _extra_options(spec: QuantSpec, op_types: Sequence[str]) -> dict[str, Any]:
    return {
        "ActivationSymmetric": spec.activation_symmetric,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": [t for t in FLOAT_OUTPUT_OP_TYPES if t in op_types],
        # A LayerNorm's gamma is 1-D: its channels are its only axis, not ORT's default axis 1
        # (which it rejects with a warning per node and then quantizes per tensor).
        "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": -1},
    }


def _run_quantizer(
    prepared: Path, raw_out: Path, plan: _Plan, graph: _Graph, spec: QuantSpec, calib: Sequence[Any],
    activation_ranges: Mapping[str, tuple[float, float]] | None = None, cache: Path | None = None,
) -> tuple[int, Path]:
    """Quantize `prepared` into `raw_out`; returns (imposed ranges, the calibration cache). A
    given `cache` (the ranges of the same graph at another input shape: tensor names do not
    depend on the shape) is used as it is, without calibrating."""
    op_types = plan.op_types(graph)
    imposed = 0
    with _quiet_ort():
        if cache is None:
            cache = _calibrate(prepared, graph, plan, spec, calib)
            if activation_ranges:
                imposed = _impose_ranges(cache, graph, plan, activation_ranges)
        quantize_static(
            model_input=str(prepared),
            model_output=str(raw_out),
            calibration_data_reader=None,
            calibration_cache_path=str(cache),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=spec.per_channel,
            # reduce_range is for CPUs without VNNI, where u8s8 products can saturate.
            reduce_range=False,
            activation_type=ACTIVATION_TYPE,
            weight_type=WEIGHT_TYPE,
            nodes_to_quantize=plan.nodes_to_quantize,
            nodes_to_exclude=plan.nodes_to_exclude,
            use_external_data_format=_has_side_file(prepared),
            calibrate_method=CALIBRATION_METHODS[spec.calibration.method],
            extra_options=_extra_options(spec, op_types),
        )
    return imposed, cache


def _drop_unused_opsets(proto: onnx.ModelProto) -> None:
    # ORT's optimizer declares a dozen of its own domains; a file for other runtimes should
    # only name the ones its nodes use.
    used = {n.domain for n in proto.graph.node} | {"", "ai.onnx"}
    keep = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _finish(raw_out: Path, staged: Path, fp32_meta: dict[str, str], quant_meta: dict[str, Any]) -> None:
    proto = onnx.load(str(raw_out))
    lower_ir_version(proto)
    _drop_unused_opsets(proto)
    meta = {**fp32_meta, **{p.key: p.value for p in proto.metadata_props}, "pqk_quant": json.dumps(quant_meta)}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    _save(proto, staged)
