"""Q-only (protocol stage P2), first slice: the quantization spec, the calibration set and
post-training quantization of an exported DUSt3R pair graph to a QDQ ONNX file.

ONNX Runtime's quantization tools do the arithmetic (calibration, scales, Q/DQ insertion);
this module owns what they cannot know: which nodes of a DUSt3R graph are the operator kinds
of the keep-list, which MatMuls carry weights, and the one calibration set every quantization
experiment reuses.

The QDQ file is the portable artifact (ONNX Runtime, TensorRT and OpenVINO all read it): it
holds standard ONNX ops only. Each Linear is a Gemm in it (ORT's pre-processing fuses MatMul +
bias Add) because that is the form ONNX Runtime's CPU provider runs on INT8 kernels; see
`_prepare` and `ort_cpu_kernels`.

The package, one job a module, layered bottom-up: `spec` (the spec), `calibration` (the
calibration set), `graph` (the graph index), `keep` (the quantization plan: keep-list kinds
and weighted nodes), `files` (ONNX files on disk), `prepare` (the float graph for ORT's
quantizer), `ranges` (activation ranges), `qdq` (writing the QDQ file), `inspection` (what a
QDQ file quantizes and runs on) and `ptq` (the entry points). Everything callers import from
`pqk.methods.quantize` is re-exported here.
"""

from __future__ import annotations

# Besides __all__, the flat module's other public names stay importable from here
# (pqk.pipeline.budget reads DEFAULT_QAT): hence the noqa on the imports.
from pqk.methods.quantize.calibration import (
    PairCalibrationReader,
    calibration_pairs,
    calibration_seeds,
)
from pqk.methods.quantize.files import onnx_file_bytes
from pqk.methods.quantize.inspection import (  # noqa: F401
    ORT_INT8_KERNELS,
    inspect_qdq,
    ort_cpu_kernels,
)
from pqk.methods.quantize.keep import (  # noqa: F401
    ACTIVATION_MATMUL,
    FLOAT_MODULES,
    FLOAT_OUTPUT_OP_TYPES,
    WEIGHTED_OP_TYPES,
    keep_list_node_names,
)
from pqk.methods.quantize.ptq import quantize, quantize_ptq
from pqk.methods.quantize.qdq import ACTIVATION_TYPE, WEIGHT_TYPE  # noqa: F401
from pqk.methods.quantize.ranges import CALIBRATION_CHUNK, ENTROPY_BINS, PERCENTILE_BINS  # noqa: F401
from pqk.methods.quantize.spec import (  # noqa: F401
    ACTIVATION_MODES,
    CALIBRATION_METHODS,
    CALIBRATION_SEED_MIN,
    DEFAULT_QAT,
    KEEP_KINDS,
    SUPPORTED_BITS,
    WEIGHT_MODES,
    CalibrationSpec,
    QuantSpec,
    load_quant_spec,
)

__all__ = [
    "CALIBRATION_METHODS",
    "CALIBRATION_SEED_MIN",
    "KEEP_KINDS",
    "CalibrationSpec",
    "PairCalibrationReader",
    "QuantSpec",
    "calibration_pairs",
    "calibration_seeds",
    "inspect_qdq",
    "keep_list_node_names",
    "load_quant_spec",
    "onnx_file_bytes",
    "ort_cpu_kernels",
    "quantize",
    "quantize_ptq",
]
