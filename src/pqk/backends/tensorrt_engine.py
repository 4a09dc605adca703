"""Q-3: a TensorRT engine from the QDQ file, when TensorRT is installed (optional extra).

TensorRT reads the explicit Q/DQ nodes of `ptq_int8.onnx` as the quantization (no calibrator of
its own), so the engine holds the same integers as the ONNX Runtime and oneDNN runtimes. The
shape is static (1x3xHxW per view), as exported. Without `tensorrt` (every CPU machine, CI),
`build_engine` returns None and the reason, which the step writes into the record's notes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ENGINE_NAME = "quantized_model.trt"


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def build_engine(qdq_onnx: str | Path, out_path: str | Path, workspace_gb: float = 4.0) -> tuple[Path | None, str]:
    """(engine path, note). Builds an INT8 (+FP16 fallback) engine from explicit Q/DQ."""
    if not tensorrt_available():
        return None, "no TensorRT here: engine (Q-3) not built; the CPU runtimes measured instead"
    import tensorrt as trt  # optional dependency

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(qdq_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return None, f"TensorRT could not parse {Path(qdq_onnx).name}: {errors[:300]}"
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)  # keep-list ops (Softmax, LayerNorm) in half rather than float
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return None, "TensorRT failed to build the engine (see its log)"
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out_path)
    return out_path, f"TensorRT {trt.__version__} engine built: {out_path.name} (not measured by evaluate yet)"
