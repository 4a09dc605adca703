"""The quantization spec: what to quantize and how (configs/quant.yaml), validated on
construction, with the keep-list operator kinds, the accepted modes and calibration methods,
the QAT defaults and the calibration seed floor.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationMethod

from pqk.errors import ConfigError
from pqk.yaml_io import read_yaml, reject_unknown_keys

# QAT defaults (configs/quant.yaml repeats them): 12 epochs at the workload's 512x384, fake
# quantization for the last third, the FP32 model as a pointmap target.
DEFAULT_QAT: dict[str, Any] = {
    "teacher_weight": 0.5,
    "fake_quant_from": 0.667,
    "train": {"epochs": 12, "steps_per_epoch": 25, "batch_size": 2, "lr": 2e-5, "warmup_steps": 10,
              "patience": None, "width": 512, "height": 384, "n_scenes": 24},
}

KEEP_KINDS = ("Softmax", "attention_scale", "LayerNorm")
# The attention core's two activation-only MatMuls: "float" keeps both float (INT8 there is
# slower in ONNX Runtime here); "int8_qk" quantizes q and k of q·kᵀ (SageAttention's split:
# softmax and P·V stay float, bf16 in OpenVINO), which OpenVINO runs as one fused INT8
# attention kernel; "int8_qkv" quantizes P·V's inputs too (INT-FlashAttention's all-INT8 core).
ATTENTION_MODES = ("float", "int8_qk", "int8_qkv")
# weights mode -> per-channel scales
WEIGHT_MODES = {"per_channel_symmetric": True, "per_tensor_symmetric": False}
# activations mode -> symmetric range (uint8 either way: see qdq.ACTIVATION_TYPE)
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
    attention: str = "float"  # ATTENTION_MODES
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
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention: unknown mode {self.attention!r}; accepted: {', '.join(ATTENTION_MODES)}")
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
        if self.attention != "float":
            keep += f"+attention:{self.attention}"
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
