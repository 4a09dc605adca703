"""Activation ranges: checking the calibration data against the exported graph, running
ONNX Runtime's calibrators in chunks over the tensors the plan quantizes, and imposing
QAT's own ranges on the resulting calibration cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import (
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    save_tensors_data,
)

from pqk.backends.onnx_export import INPUT_NAMES
from pqk.errors import InputError
from pqk.methods.quantize.calibration import PairCalibrationReader
from pqk.methods.quantize.files import _has_side_file
from pqk.methods.quantize.graph import _Graph
from pqk.methods.quantize.keep import FLOAT_OUTPUT_OP_TYPES, _Plan
from pqk.methods.quantize.spec import QuantSpec

CALIBRATION_CHUNK = 4  # pairs per calibration pass
PERCENTILE_BINS = 2048
ENTROPY_BINS = 2048


def _check_calibration_data(graph: _Graph, calib: Sequence[Any], spec: QuantSpec) -> list[str]:
    """Reject calibration data that would calibrate silently wrong ranges; note a short set."""
    if len(calib) == 0:
        raise InputError("no calibration data: PTQ needs at least one image pair")
    want = tuple(graph.dims.get(name) for name in INPUT_NAMES)
    for k, pair in enumerate(calib):
        got = tuple(tuple(np.shape(a)) for a in pair)
        if got != want:
            raise InputError(f"calibration pair {k} has shapes {got}; the model was exported for {want}")
    first = np.asarray(calib[0][0])
    # Raw 0..255 pixels run without error and calibrate every range wrong.
    if not np.issubdtype(first.dtype, np.floating) or first.min() < -1.01 or first.max() > 1.01:
        raise InputError("calibration images must be float and normalized to [-1, 1] (see calibration_pairs)")
    notes = []
    if len(calib) < spec.calibration.size:
        note = f"calibration used {len(calib)} pairs, fewer than the {spec.calibration.size} the spec asks for"
        warnings.warn(note, stacklevel=3)
        notes.append(note)
    return notes


_CALIBRATORS = {"minmax": MinMaxCalibrater, "percentile": PercentileCalibrater, "entropy": EntropyCalibrater}


def _calibrator_kwargs(spec: QuantSpec) -> dict[str, Any]:
    # ORT's percentile calibrator defaults to a symmetric range; follow the spec instead.
    kwargs: dict[str, Any] = {"symmetric": spec.activation_symmetric}
    if spec.calibration.method == "percentile":
        kwargs.update(num_bins=PERCENTILE_BINS, percentile=float(spec.calibration.percentile))
    elif spec.calibration.method == "entropy":
        # ORT's defaults (128 bins, 128 quantized bins) leave the KL search a single candidate,
        # the min-max range; TensorRT's recipe uses 2048 bins, and uint8 has 256 levels.
        kwargs.update(num_bins=ENTROPY_BINS, num_quantized_bins=256)
    return kwargs


def _calibration_tensors(graph: _Graph, plan: _Plan) -> set[str]:
    """The activations the quantizer will put Q/DQ on, so the ones that need a range."""
    by_name = {n.name: n for n in graph.nodes}
    tensors: set[str] = set()
    for name in plan.nodes_to_quantize:
        node = by_name[name]
        tensors.update(i for i in node.input if i and not graph.is_weight(i))
        if node.op_type not in FLOAT_OUTPUT_OP_TYPES:
            tensors.update(o for o in node.output if o)
    return tensors


def _make_calibrator(prepared: Path, op_types: Sequence[str], tensors: set[str], spec: QuantSpec) -> Any:
    base = _CALIBRATORS[spec.calibration.method]

    class Selective(base):  # type: ignore[valid-type,misc]
        # ORT would collect every input and output of every node of `op_types`, attention maps
        # included: histogram calibrators hold all of them in memory and bin each one.
        def select_tensors_to_calibrate(self, model: onnx.ModelProto) -> tuple[set[str], dict]:
            found, infos = super().select_tensors_to_calibrate(model)
            return found & tensors, infos

    calibrator = Selective(
        prepared,
        list(op_types),
        augmented_model_path=str(prepared.parent / "augmented.onnx"),
        use_external_data_format=_has_side_file(prepared),
        **_calibrator_kwargs(spec),
    )
    calibrator.augment_graph()
    calibrator.execution_providers = ["CPUExecutionProvider"]
    calibrator.create_inference_session()
    return calibrator


def _calibrate(
    prepared: Path, graph: _Graph, plan: _Plan, spec: QuantSpec, calib: Sequence[Any]
) -> Path:
    """Activation ranges of `prepared` over `calib`, saved as an ORT calibration cache."""
    calibrator = _make_calibrator(prepared, plan.op_types(graph), _calibration_tensors(graph, plan), spec)
    reader = PairCalibrationReader(calib)
    # Histogram calibrators keep every calibrated tensor of a pass in memory: small passes keep
    # that bounded whatever the calibration size.
    for start in range(0, len(calib), CALIBRATION_CHUNK):
        reader.set_range(start, start + CALIBRATION_CHUNK)
        calibrator.collect_data(reader)
    cache = prepared.parent / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _impose_ranges(cache: Path, graph: _Graph, plan: _Plan, ranges: Mapping[str, tuple[float, float]]) -> int:
    """Replace the calibrated range of each Linear's input by `ranges[module path]` (QAT's own
    scales); returns how many were imposed."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data

    from pqk.backends.torch_int8 import node_module_path

    data = load_tensors_data(cache)
    by_name = {n.name: n for n in graph.nodes}
    imposed = 0
    for name in plan.nodes_to_quantize:
        node = by_name.get(name)
        key = node_module_path(name, ranges)
        if node is None or key is None or node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.input[0] in data:
            low, high = ranges[key]
            data[node.input[0]] = TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
            imposed += 1
    save_tensors_data(data, cache)
    return imposed
