"""OpenVINO as a runtime for pqk's ONNX artifacts (the QDQ INT8 file and FP32 exports).

OpenVINO reads the QDQ file that ONNX Runtime runs and executes its Linear layers on the
CPU's INT8 kernels (VNNI / AMX), fusing the Q/DQ pairs itself: the same integers, a
faster engine on x86 (shared/design/cpu-int8-notes.md: 3.9x eager FP32 vs ONNX Runtime's
2.8x on the full-size model). Nothing here needs torch. The file's Linears, Gemms wrapped in
Reshapes for ONNX Runtime, are compiled as MatMuls on the token tensor, the form OpenVINO fuses
with its bias (pqk.backends.openvino_form: the same integers, rewritten in memory).

Precision is always set explicitly: OpenVINO's CPU default (`INFERENCE_PRECISION_HINT`) is
bf16 on machines with bf16 instructions, so a "fp32" model would silently run in bf16.
- "f32": everything float32 that is not INT8 in the file (an FP32 export is the FP32 model);
- "bf16": the float parts (attention core, LayerNorm, the DPT head's convolutions left float)
  run in bf16, the file's INT8 layers stay INT8: OpenVINO's own INT8 configuration, and the
  runtime pqk deploys INT8 files with (forcing f32 costs INT8 models 15-30 % here).
"auto" (the default) picks bf16 for a file with quantized layers (OpenVINO turns Q/DQ pairs
into FakeQuantize ops) and f32 for a float file. The runner's label names the precision, so a
record says what ran.
"""

from __future__ import annotations

import os

import numpy as np

from pqk.backends.onnx_export import INPUT_NAMES, OUTPUT_NAMES, PairGraphRunner
from pqk.errors import InputError

PRECISIONS = ("f32", "bf16")
INT8_PRECISION = "bf16"  # what an INT8 QDQ file runs with (module docstring)
QUANTIZED_OPS = {"FakeQuantize"}  # what OpenVINO reads an ONNX QuantizeLinear/DequantizeLinear pair as


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _core():
    import openvino as ov

    return ov.Core()


def supported_precisions() -> tuple[str, ...]:
    """The inference precisions this CPU runs natively ("bf16" needs AVX-512 BF16 or AMX)."""
    try:
        caps = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 (an old OpenVINO without the property: assume f32 only)
        return ("f32",)
    return tuple(p for p in PRECISIONS if p == "f32" or p.upper() in {str(c).upper() for c in caps})


def int8_precision() -> str:
    """The precision an INT8 file runs with here: bf16 where the CPU has it, else f32."""
    return INT8_PRECISION if INT8_PRECISION in supported_precisions() else "f32"


def matmul_form_model(core, path: str | os.PathLike[str], model):
    """(the model at `path` with its Linears as MatMuls on the token tensor, how many were
    rewritten): pqk.backends.openvino_form, applied in memory; `model` itself when none is."""
    import io

    import onnx

    from pqk.backends.openvino_form import matmul_form

    proto = onnx.load(str(path))
    rewritten = matmul_form(proto)
    if not rewritten:
        return model, 0
    data = proto.SerializeToString()
    del proto
    return core.read_model(io.BytesIO(data)), rewritten


class OvPairRunner(PairGraphRunner):
    """OpenVINO (CPU) runner of a pqk pair graph: one compiled model, latency mode, one stream."""

    engine = "OpenVINO"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, precision: str = "auto",
                 linears_as_matmul: bool = True):
        super().__init__(path, threads)
        if precision not in (*PRECISIONS, "auto"):
            raise InputError(f"OpenVINO precision {precision!r} is not known; accepted: auto, {', '.join(PRECISIONS)}")
        if not openvino_available():
            raise InputError("OpenVINO is not installed: pip install openvino (do not install onnxruntime-openvino)")
        core = _core()
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"OpenVINO cannot read {self.path}: {first}") from exc
        self.quantized = any(op.get_type_name() in QUANTIZED_OPS for op in model.get_ops())
        self.rewritten_linears = 0
        if self.quantized and linears_as_matmul:
            model, self.rewritten_linears = matmul_form_model(core, self.path, model)
        if precision == "auto":
            precision = int8_precision() if self.quantized else "f32"
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        inputs = {p.get_any_name(): p for p in model.inputs}
        outputs = {name for p in model.outputs for name in p.get_names()}
        self._check_io(inputs, outputs)
        self.input_shapes = tuple(tuple(inputs[n].get_partial_shape().to_shape()) for n in INPUT_NAMES)  # type: ignore[assignment]
        self.metadata = {}
        self.precision = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]

    def _infer(self, imgs: list[np.ndarray]) -> list[np.ndarray]:
        self.request.infer(dict(zip(INPUT_NAMES, imgs)))
        # Copies: the request's buffers are overwritten by its next call.
        return [np.array(self.request.get_tensor(port).data, copy=True) for port in self._outputs]


    @property
    def label(self) -> str:
        """How a record and the side-by-side table name this runtime."""
        return f"openvino {'int8 (QDQ)' if self.quantized else 'fp32'}, {self.precision}"


def int8_layers(runner: OvPairRunner) -> dict[str, int]:
    """Weighted layers (FullyConnected, Convolution, MatMul) of the compiled model per runtime
    precision: the evidence that OpenVINO runs the file's layers on INT8 kernels (u8/i8)."""
    counts: dict[str, int] = {}
    for op in runner.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "Convolution", "MatMul"):
            precision = info["runtimePrecision"].astype(str)
            counts[precision] = counts.get(precision, 0) + 1
    return counts
