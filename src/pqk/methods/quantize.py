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
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.nn as nn
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.quantization.calibrate import (
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    save_tensors_data,
)

from pqk.backends.onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAMES,
    export_onnx,
    lower_ir_version,
)
from pqk.data.images import normalize_array
from pqk.data.scenes import generate_scene
from pqk.errors import ConfigError, InputError
from pqk.yaml_io import read_yaml, reject_unknown_keys

# --- the spec -------------------------------------------------------------------------------

# QAT defaults (configs/quant.yaml repeats them): 12 epochs at the workload's 512x384, fake
# quantization for the last third, the FP32 model as a pointmap target.
DEFAULT_QAT: dict[str, Any] = {
    "teacher_weight": 0.5,
    "fake_quant_from": 0.667,
    "train": {"epochs": 12, "steps_per_epoch": 25, "batch_size": 2, "lr": 2e-5, "warmup_steps": 10,
              "patience": None, "width": 512, "height": 384, "n_scenes": 24},
}

KEEP_KINDS = ("Softmax", "attention_scale", "LayerNorm")
# weights mode -> per-channel scales
WEIGHT_MODES = {"per_channel_symmetric": True, "per_tensor_symmetric": False}
# activations mode -> symmetric range (uint8 either way: see ACTIVATION_TYPE)
ACTIVATION_MODES = {"per_tensor": False, "per_tensor_symmetric": True}
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
SUPPORTED_BITS = (8, 8)

# Seeds below this are taken: evaluation workloads start at 42, the teacher trains on
# scenes from 1,000,000 (pqk.train.teacher.TRAIN_SEED_BASE) and validates from 2,000,000.
CALIBRATION_SEED_MIN = 3_000_000

# uint8 activations x int8 weights is the kernel ORT runs fast on x86 (VNNI/AMX); int8 x int8
# is a ~25x slower fallback here (shared/design/cpu-int8-notes.md).
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
# Only these carry weights worth INT8 kernels; everything else stays float unless a keep-list
# kind is dropped for an ablation.
WEIGHTED_OP_TYPES = ("MatMul", "Gemm", "Conv")
# A Linear's output stays float: ORT runs DQ -> Gemm as QGemm with float output, and a Q/DQ
# there would only add rounding (GELU, the residual Add read it in float anyway). A Conv needs
# its output Q: ORT's only INT8 Conv on the CPU is QLinearConv (DQ -> Conv -> Q).
FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm")
ACTIVATION_MATMUL = "activation_matmul"
CALIBRATION_CHUNK = 4  # pairs per calibration pass
PERCENTILE_BINS = 2048
ENTROPY_BINS = 2048


@dataclass
class CalibrationSpec:
    size: int = 512
    method: str = "minmax"
    percentile: float = 99.999


@dataclass
class QuantSpec:
    """What to quantize and how; mirrors configs/quant.yaml. Validated on construction."""

    bits_w: int = 8
    bits_a: int = 8
    weights: str = "per_channel_symmetric"
    activations: str = "per_tensor"
    keep_list: list[str] = field(default_factory=lambda: list(KEEP_KINDS))
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    calibration_seed_base: int = CALIBRATION_SEED_MIN
    # QAT, used when PTQ misses the gate: see pqk.methods.qat.QatSpec.from_dict.
    qat: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_QAT))

    def __post_init__(self) -> None:
        if isinstance(self.calibration, Mapping):
            self.calibration = _calibration_from_dict(self.calibration)
        _check_bits(self.bits_w, self.bits_a)
        _check_choice("weights", self.weights, WEIGHT_MODES)
        _check_choice("activations", self.activations, ACTIVATION_MODES)
        self.keep_list = _canonical_keep_list(self.keep_list)
        _check_calibration(self.calibration)
        _check_seed_base(self.calibration_seed_base)
        if not isinstance(self.qat, Mapping):
            raise ConfigError(f"qat must be a mapping (teacher_weight, fake_quant_from, train); got {self.qat!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a quantization spec must be a mapping; got {type(data).__name__}")
        reject_unknown_keys("quantization spec", data, {f for f in cls.__dataclass_fields__})
        return cls(**dict(data))

    @property
    def per_channel(self) -> bool:
        return WEIGHT_MODES[self.weights]

    @property
    def activation_symmetric(self) -> bool:
        return ACTIVATION_MODES[self.activations]

    def with_keep_list(self, keep_list: Sequence[str]) -> QuantSpec:
        """The same spec with another keep-list (the keep-list ablation)."""
        return replace(self, keep_list=list(keep_list))

    def to_record_fields(self) -> dict[str, Any]:
        # "none" rather than "" so an INT8 run with nothing kept is told apart from an FP32 row.
        keep = "+".join(self.keep_list) if self.keep_list else "none"
        return {"bits_w": self.bits_w, "bits_a": self.bits_a, "keep_list": keep}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_bits(bits_w: Any, bits_a: Any) -> None:
    for name, value, supported in (("bits_w", bits_w, SUPPORTED_BITS[0]), ("bits_a", bits_a, SUPPORTED_BITS[1])):
        if not _is_int(value) or value != supported:
            raise ConfigError(f"{name}: {value!r} is not supported; only 8-bit weights and activations (W8A8)")


def _check_choice(name: str, value: Any, choices: Mapping[str, Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown mode {value!r}; accepted: {', '.join(choices)}")


def _canonical_keep_list(keep_list: Any) -> list[str]:
    if isinstance(keep_list, str) or not isinstance(keep_list, Sequence):
        raise ConfigError(f"keep_list must be a list of operator kinds; got {keep_list!r}")
    by_lower = {k.lower(): k for k in KEEP_KINDS}
    out: list[str] = []
    for kind in keep_list:
        canonical = by_lower.get(str(kind).lower()) if isinstance(kind, str) else None
        if canonical is None:
            raise ConfigError(f"keep_list: unknown operator kind {kind!r}; accepted: {', '.join(KEEP_KINDS)}")
        if canonical not in out:
            out.append(canonical)
    return out


def _calibration_from_dict(data: Mapping[str, Any]) -> CalibrationSpec:
    reject_unknown_keys("calibration", data, set(CalibrationSpec.__dataclass_fields__))
    return CalibrationSpec(**dict(data))


def _check_calibration(calib: Any) -> None:
    if not isinstance(calib, CalibrationSpec):
        raise ConfigError(f"calibration must be a mapping; got {calib!r}")
    if not _is_int(calib.size) or calib.size < 1:
        raise ConfigError(f"calibration.size must be a positive integer; got {calib.size!r}")
    if calib.method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration.method: unknown method {calib.method!r}; accepted: {', '.join(CALIBRATION_METHODS)}"
        )
    p = calib.percentile
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ConfigError(f"calibration.percentile must be in (0, 100]; got {p!r}")


def _check_seed_base(base: Any) -> None:
    if not _is_int(base) or base < CALIBRATION_SEED_MIN:
        raise ConfigError(
            f"calibration_seed_base must be an integer >= {CALIBRATION_SEED_MIN:,} (lower seeds are the "
            f"evaluation workloads' and the teacher's training and validation scenes); got {base!r}"
        )



def load_quant_spec(path: str | os.PathLike[str]) -> QuantSpec:
    """Read and validate a quantization spec (configs/quant.yaml); missing keys take defaults."""
    data = read_yaml(Path(path), "quantization config", invalid=ConfigError)
    return QuantSpec.from_dict({} if data is None else data)


# --- the calibration set --------------------------------------------------------------------


def _check_n_views(n_views: Any) -> int:
    if not _is_int(n_views) or n_views < 2:
        raise InputError(f"n_views must be an integer >= 2 (pairs need two views); got {n_views!r}")
    return int(n_views)


def calibration_seeds(spec: QuantSpec, n_views: int = 8) -> list[int]:
    """The generated-scene seeds `calibration_pairs` draws from, in order."""
    per_scene = _check_n_views(n_views) - 1
    n_scenes = math.ceil(spec.calibration.size / per_scene)
    return [spec.calibration_seed_base + k for k in range(n_scenes)]


def _neighbour_pairs(n_views: int) -> list[tuple[int, int]]:
    # Both orientations, alternating: evaluation pairs are symmetrised, so the network sees
    # each view as view 1 and as view 2.
    return [(i, i + 1) if i % 2 == 0 else (i + 1, i) for i in range(n_views - 1)]


def _network_input(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(normalize_array(img).unsqueeze(0).numpy(), dtype=np.float32)


def calibration_pairs(
    spec: QuantSpec, width: int, height: int, n_views: int = 8
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`spec.calibration.size` image pairs for `img1`, `img2` (float32 (1, 3, H, W) in [-1, 1]).

    Neighbouring views of generated scenes whose seeds start at `spec.calibration_seed_base`,
    far from every evaluation and training seed; the same arguments give the same arrays.
    Scenes are rendered one at a time and a view shared by two pairs is one array.
    """
    n_views = _check_n_views(n_views)
    size = spec.calibration.size
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for seed in calibration_seeds(spec, n_views):
        scene = generate_scene(seed, n_views=n_views, width=width, height=height)
        imgs = [_network_input(view.img) for view in scene.views]
        for i, j in _neighbour_pairs(n_views):
            pairs.append((imgs[i], imgs[j]))
            if len(pairs) == size:
                return pairs
    return pairs


class PairCalibrationReader(CalibrationDataReader):
    """Feeds calibration pairs to ONNX Runtime's calibrators as {img1, img2}.

    Supports `set_range` so calibration can run in chunks (histogram calibrators keep every
    activation of a chunk in memory).
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.pairs = list(pairs)
        self._stop = len(self.pairs)
        self._next = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._stop = int(start_index), min(int(end_index), len(self.pairs))

    def rewind(self) -> None:
        self.set_range(0, len(self.pairs))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._stop:
            return None
        pair = self.pairs[self._next]
        self._next += 1
        return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(INPUT_NAMES, pair)}


# --- reading the graph ----------------------------------------------------------------------


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


# --- the keep-list kinds in an exported graph ------------------------------------------------


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
    # q·kᵀ and attn·v: INT8 there makes ORT slower on this CPU (cpu-int8-notes), so never.
    return [
        n.name for n in graph.nodes if n.op_type == "MatMul" and not any(graph.is_weight(i) for i in n.input)
    ]


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


def _plan(graph: _Graph, keep_list: Sequence[str]) -> _Plan:
    keep = _canonical_keep_list(keep_list)
    kinds = {kind: finder(graph) for kind, finder in _KIND_FINDERS.items()}
    return _Plan(
        weighted=_weighted_nodes(graph),
        kept={k: v for k, v in kinds.items() if k in keep},
        dropped={k: v for k, v in kinds.items() if k not in keep},
        activation_matmuls=_activation_matmuls(graph),
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


# --- preparing the float graph --------------------------------------------------------------


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


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def _save(proto: onnx.ModelProto, path: Path) -> None:
    # Protobuf cannot serialize past 2 GiB: large graphs keep weights in `<name>.data`.
    external = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=path.name + ".data"
    )


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


# --- PTQ ------------------------------------------------------------------------------------


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


def _has_side_file(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


def _extra_options(spec: QuantSpec, op_types: Sequence[str]) -> dict[str, Any]:
    return {
        "ActivationSymmetric": spec.activation_symmetric,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": [t for t in FLOAT_OUTPUT_OP_TYPES if t in op_types],
        # A LayerNorm's gamma is 1-D: its channels are its only axis, not ORT's default axis 1
        # (which it rejects with a warning per node and then quantizes per tensor).
        "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": -1},
    }


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    # ORT's quantization tools print progress (histograms) to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _run_quantizer(
    prepared: Path, raw_out: Path, plan: _Plan, graph: _Graph, spec: QuantSpec, calib: Sequence[Any],
    activation_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> int:
    op_types = plan.op_types(graph)
    imposed = 0
    with _quiet_ort():
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
    return imposed


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


# What ONNX Runtime's CPU provider turns QDQ patterns into (its integer kernels), besides
# every QLinear* op (QLinearMatMul, QLinearConv, QLinearSoftmax, ...).
ORT_INT8_KERNELS = (
    "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention",
)
_FLOAT_WEIGHTED = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv")


def ort_cpu_kernels(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """How ONNX Runtime's CPU provider will run a QDQ file, read from the graph it optimizes:
    `int8`: integer kernel -> count; `float_weighted`: layers still computing in float on
    dequantized weights (no INT8 kernel matched their pattern). Also proves the file loads."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="pqk-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # its notes on the optimized graph are not the user's business
        # Level 2 holds the QDQ fusions; level 3 only adds layout changes for this very CPU.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        graph = _Graph(onnx.load(str(optimized), load_external_data=False))
    dq_outputs = {o for n in graph.nodes if n.op_type == "DequantizeLinear" for o in n.output}
    int8: dict[str, int] = defaultdict(int)
    float_weighted = 0
    for node in graph.nodes:
        if node.op_type in ORT_INT8_KERNELS or node.op_type.startswith("QLinear"):
            int8[node.op_type] += 1
        elif node.op_type in _FLOAT_WEIGHTED and any(i in dq_outputs for i in node.input[1:]):
            float_weighted += 1
    return {"int8": dict(sorted(int8.items())), "float_weighted": float_weighted}


def onnx_file_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of an ONNX file with its `<name>.data` weights file, if any."""
    path = Path(path)
    side = path.parent / (path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def _replace(staged: Path, out_path: Path) -> None:
    # Weights first so the graph never points at missing or stale data (as export_onnx).
    side, stale = staged.parent / (staged.name + ".data"), out_path.parent / (out_path.name + ".data")
    external = side.exists()
    if external:
        os.replace(side, stale)
    os.replace(staged, out_path)
    if not external and stale.exists():
        stale.unlink()  # left by an earlier large model written to the same name


def quantize_ptq(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    spec: QuantSpec,
    calib: Sequence[tuple[np.ndarray, np.ndarray]],
    activation_ranges: Mapping[str, tuple[float, float]] | None = None,
    float_modules: Sequence[str] = (),
) -> dict[str, Any]:
    """Static PTQ of a float pair graph to a QDQ file: int8 weights (per-channel symmetric by
    default), uint8 activations calibrated on `calib`, keep-list kinds and activation-only
    MatMuls left in float. Written atomically; returns a summary (quantized nodes by op type,
    excluded nodes by reason, sizes). `activation_ranges` (module path -> (min, max)) imposes
    the input range of those Linears instead of the calibrated one (QAT export);
    `float_modules` (Linear module paths) stay float (the accuracy-driven keep-list)."""
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise InputError(f"ONNX model not found: {fp32_onnx}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        prepared, graph = _prepare(fp32_onnx, tmp)
        notes = _check_calibration_data(graph, calib, spec)
        plan = _keep_modules_float(_plan(graph, spec.keep_list), float_modules)
        raw_out = tmp / "quantized_raw.onnx"
        imposed = _run_quantizer(prepared, raw_out, plan, graph, spec, calib, activation_ranges)
        fp32_meta = {p.key: p.value for p in onnx.load(str(fp32_onnx), load_external_data=False).metadata_props}
        staged = tmp / out_path.name
        _finish(raw_out, staged, fp32_meta, {**spec.to_dict(), "calibration_pairs": len(calib)})
        kernels = ort_cpu_kernels(staged)
        _replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = _summary(fp32_onnx, out_path, spec, plan, len(calib), kernels, notes)
    if activation_ranges:
        summary["imposed_activation_ranges"] = imposed
    return summary


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
) -> dict[str, Any]:
    """The one call: export `model` to `work_dir/model_fp32.onnx` (static height x width) and
    post-training-quantize it to `work_dir/ptq_int8.onnx` (`float_modules`: Linears kept float)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, work_dir / "model_fp32.onnx", height, width)
    int8 = work_dir / name
    summary = quantize_ptq(fp32, int8, spec, calib, float_modules=float_modules)
    return {"onnx_fp32": fp32, "onnx_int8": int8, "summary": summary, "record_fields": spec.to_record_fields()}


# --- inspecting a QDQ graph -----------------------------------------------------------------

_INTEGER_TYPES = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
}


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None


def _channel_axis(consumer: onnx.NodeProto, index: int, ndim: int) -> int | None:
    """Axis of the consumer's input `index` that runs over its output channels (None when
    the input has no such axis)."""
    op = consumer.op_type
    if index == 1 and op == "MatMul":
        return ndim - 1
    if index == 1 and op == "Conv":
        return 0
    if index == 1 and op == "Gemm":
        return 0 if _attr(consumer, "transB") else 1
    if index in (1, 2) and op == "LayerNormalization":
        return ndim - 1
    if index == 2 and op in ("Conv", "Gemm"):
        return 0
    return None


_ROLES = {1: "weight", 2: "bias"}


def _weight_entry(graph: _Graph, dq: onnx.NodeProto) -> dict[str, Any]:
    weight = graph.initializers[dq.input[0]]
    dims = tuple(weight.dims)
    scale_dims = graph.dims.get(dq.input[1]) or ()
    scale_len = math.prod(scale_dims) if scale_dims else 1
    axis = _attr(dq, "axis")
    consumer = next(iter(graph.consumers.get(dq.output[0], [])), None)
    index = list(consumer.input).index(dq.output[0]) if consumer is not None else -1
    out_axis = _channel_axis(consumer, index, len(dims)) if consumer is not None else None
    norm_axis = None if axis is None else axis % max(len(dims), 1)
    per_channel = (
        len(scale_dims) == 1 and scale_len > 1 and out_axis is not None
        and norm_axis == out_axis and scale_len == dims[out_axis]
    )
    return {
        "dtype": _INTEGER_TYPES[weight.data_type],
        "shape": list(dims),
        "scale_len": scale_len,
        "axis": axis,
        "per_channel": bool(per_channel),
        "role": _ROLES.get(index, "other"),
        "consumer": None if consumer is None else consumer.name,
        "consumer_op": None if consumer is None else consumer.op_type,
    }


def inspect_qdq(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a QDQ graph really quantizes.

    `weights`: integer initializers behind a DequantizeLinear, each with dtype, shape, role
    (weight or bias of its consumer; biases are int32), scale length, axis and whether its
    scale is per output channel of the node consuming it. `quantized`: op type -> nodes with an input coming from
    a DequantizeLinear (they can run on integer kernels). `float`: op type -> the other
    nodes (Q/DQ themselves left out).
    """
    graph = _Graph(onnx.load(str(onnx_path), load_external_data=False))
    weights: dict[str, dict[str, Any]] = {}
    dq_outputs: set[str] = set()
    for node in graph.nodes:
        if node.op_type != "DequantizeLinear":
            continue
        dq_outputs.add(node.output[0])
        source = graph.initializers.get(node.input[0])
        if source is not None and source.data_type in _INTEGER_TYPES:
            weights[node.input[0]] = _weight_entry(graph, node)
    quantized: dict[str, list[str]] = defaultdict(list)
    floating: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        target = quantized if any(i in dq_outputs for i in node.input) else floating
        target[node.op_type].append(node.name)
    return {"weights": weights, "quantized": dict(quantized), "float": dict(floating)}


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
