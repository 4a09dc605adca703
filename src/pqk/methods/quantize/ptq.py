"""Post-training quantization, the entry points: a float pair graph to a checked, atomically
written QDQ file with its summary (`quantize_ptq`), and a model exported then quantized in
one call (`quantize`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.nn as nn

from pqk.backends.onnx_export import PairShapes, export_onnx, shape_variant_path
from pqk.errors import InputError
from pqk.methods.quantize.files import _replace, onnx_file_bytes
from pqk.methods.quantize.inspection import inspect_qdq, ort_cpu_kernels
from pqk.methods.quantize.keep import _keep_modules_float, _Plan, _plan
from pqk.methods.quantize.prepare import _prepare
from pqk.methods.quantize.qdq import _finish, _run_quantizer
from pqk.methods.quantize.ranges import _check_calibration_data
from pqk.methods.quantize.spec import QuantSpec


def quantize_ptq(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    spec: QuantSpec,
    calib: Sequence[tuple[np.ndarray, np.ndarray]],
    activation_ranges: Mapping[str, tuple[float, float]] | None = None,
    float_modules: Sequence[str] = (),
    variants: Sequence[tuple[Path, Path]] = (),
) -> dict[str, Any]:
    """Static PTQ of a float pair graph to a QDQ file: int8 weights (per-channel symmetric by
    default), uint8 activations calibrated on `calib`, keep-list kinds and activation-only
    MatMuls left in float. Written atomically; returns a summary (quantized nodes by op type,
    excluded nodes by reason, sizes). `activation_ranges` (module path -> (min, max)) imposes
    the input range of those Linears instead of the calibrated one (QAT export);
    `float_modules` (Linear module paths) stay float (the accuracy-driven keep-list).

    `variants`: (float graph of the same model at another input shape, its QDQ path) pairs,
    quantized with the same plan and the same activation ranges as the main file, so the
    files are one quantized model at several static shapes (`ShapeRoutedRunner` runs them)."""
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise InputError(f"ONNX model not found: {fp32_onnx}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        prepared, graph = _prepare(fp32_onnx, tmp)
        notes = _check_calibration_data(graph, calib, spec)
        plan = _keep_modules_float(_plan(graph, spec.keep_list, spec.attention), float_modules)
        raw_out = tmp / "quantized_raw.onnx"
        imposed, cache = _run_quantizer(prepared, raw_out, plan, graph, spec, calib, activation_ranges)
        quant_meta = {**spec.to_dict(), "calibration_pairs": len(calib)}
        staged = tmp / out_path.name
        _finish(raw_out, staged, _metadata(fp32_onnx), quant_meta)
        kernels = ort_cpu_kernels(staged)
        _replace(staged, out_path)
        written = [_quantize_variant(fp32_v, out_v, tmp / f"variant{k}", graph, plan, spec, cache, quant_meta)
                   for k, (fp32_v, out_v) in enumerate(variants)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = _summary(fp32_onnx, out_path, spec, plan, len(calib), kernels, notes)
    if activation_ranges:
        summary["imposed_activation_ranges"] = imposed
    if written:
        summary["shape_variants"] = written
    return summary


def _metadata(onnx_path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def _quantize_variant(
    fp32_onnx: Path, out_path: Path, work: Path, main_graph: Any, plan: _Plan, spec: QuantSpec, cache: Path,
    quant_meta: dict[str, Any],
) -> str:
    """The main file's model at another static shape: the same nodes quantized with the same
    ranges (the exporter names nodes and tensors by module path, not by shape)."""
    if not fp32_onnx.is_file():
        raise InputError(f"ONNX model not found: {fp32_onnx}")
    work.mkdir()
    prepared, graph = _prepare(fp32_onnx, work)
    if [n.name for n in graph.nodes] != [n.name for n in main_graph.nodes]:
        raise InputError(f"{fp32_onnx.name} is not the main file's graph at another shape (its nodes differ)")
    raw_out = work / "quantized_raw.onnx"
    _run_quantizer(prepared, raw_out, plan, graph, spec, [], cache=cache)
    staged = work / out_path.name
    _finish(raw_out, staged, _metadata(fp32_onnx), quant_meta)
    _replace(staged, out_path)
    shutil.rmtree(work, ignore_errors=True)
    return out_path.name


def _summary(
    fp32_onnx: Path,
    out_path: Path,
    spec: QuantSpec,
    plan: _Plan,
    n_calib: int,
    kernels: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    report = inspect_qdq(out_path)
    if kernels["float_weighted"]:
        notes = [*notes, f"ONNX Runtime (CPU) runs {kernels['float_weighted']} quantized layers in float: "
                 "no INT8 kernel matched them"]
    weights = [w for w in report["weights"].values() if w["role"] == "weight" and w["dtype"] == "int8"]
    size_fp32, size_int8 = onnx_file_bytes(fp32_onnx), onnx_file_bytes(out_path)
    return {
        "quantized_nodes": {op: len(names) for op, names in sorted(report["quantized"].items())},
        "int8_weights": len(weights),
        "per_channel_weights": sum(w["per_channel"] for w in weights),
        "excluded_nodes": plan.excluded_counts(),
        "quantized_kinds": {kind: len(names) for kind, names in plan.dropped.items()},
        "keep_list": list(spec.keep_list),
        "calibration": {
            "pairs": n_calib,
            "asked": spec.calibration.size,
            "method": spec.calibration.method,
            "seed_base": spec.calibration_seed_base,
        },
        "ort_cpu_kernels": kernels,
        "size_fp32_bytes": size_fp32,
        "size_int8_bytes": size_int8,
        "size_ratio": size_int8 / size_fp32 if size_fp32 else float("nan"),
        "notes": notes,
    }


def quantize(
    model: nn.Module,
    spec: QuantSpec,
    calib: Sequence[tuple[np.ndarray, np.ndarray]],
    work_dir: str | os.PathLike[str],
    height: int,
    width: int,
    float_modules: Sequence[str] = (),
    name: str = "ptq_int8.onnx",
    other_shapes: Sequence[PairShapes] = (),
) -> dict[str, Any]:
    """The one call: export `model` to `work_dir/model_fp32.onnx` (static height x width) and
    post-training-quantize it to `work_dir/ptq_int8.onnx` (`float_modules`: Linears kept float).
    `other_shapes` ((H1, W1), (H2, W2)) get their own static files beside both
    (`shape_variant_path`), quantized with the same ranges."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, work_dir / "model_fp32.onnx", height, width)
    int8 = work_dir / name
    variants = export_variants(model, fp32, int8, other_shapes)
    summary = quantize_ptq(fp32, int8, spec, calib, float_modules=float_modules, variants=variants)
    return {"onnx_fp32": fp32, "onnx_int8": int8, "summary": summary, "record_fields": spec.to_record_fields()}


def export_variants(
    model: nn.Module, fp32: Path, int8: Path, other_shapes: Sequence[PairShapes],
) -> list[tuple[Path, Path]]:
    """`model` exported at each of `other_shapes` beside `fp32`, paired with where its QDQ file
    goes beside `int8` (what `quantize_ptq(variants=...)` takes)."""
    pairs = []
    for shapes in other_shapes:
        (h1, w1), (h2, w2) = shapes
        variant = export_onnx(model, shape_variant_path(fp32, shapes), h1, w1, height2=h2, width2=w2)
        pairs.append((variant, shape_variant_path(int8, shapes)))
    return pairs
