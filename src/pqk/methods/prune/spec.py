"""The pruning spec: `PruneSpec` (configs/prune.yaml) and its calibration settings, the
validation every spec passes on construction, and the names derived from ρ (`rho_tag`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pqk.errors import ConfigError
from pqk.yaml_io import read_yaml, reject_unknown_keys

IMPORTANCES = ("l1", "taylor")
ALLOCATIONS = ("sensitivity", "uniform")
SENSITIVITY_METRICS = ("delta1", "absrel", "rmse", "loss")
# Seeds of the pruning calibration scenes. Taken below: evaluation workloads start at 42, the
# teacher trains from 1,000,000 and validates from 2,000,000, quantization calibrates from
# 3,000,000 (pqk.methods.quantize.CALIBRATION_SEED_MIN).
PRUNE_CALIB_SEED_MIN = 4_000_000
_LOWER_IS_BETTER = {"delta1": False, "absrel": True, "rmse": True, "loss": True}


@dataclass
class PruneCalibSpec:
    """Held-out generated pairs for importance (Taylor) and the sensitivity trials."""

    n_pairs: int = 8
    n_scenes: int = 4
    width: int = 512
    height: int = 384
    views: int = 8
    window: int = 4
    seed_base: int = PRUNE_CALIB_SEED_MIN
    batch_size: int = 4


@dataclass
class PruneSpec:
    """What to prune and how; mirrors configs/prune.yaml. Validated on construction."""

    rho: float = 0.3
    allocation: str = "sensitivity"
    importance: str = "l1"
    heads: bool = True  # prune whole attention heads (self and cross)
    ffn: bool = True  # prune FFN hidden channels
    embed: bool = False  # residual width: not supported (see _check_spec)
    min_heads: int = 1  # heads every attention module keeps
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    sensitivity_metric: str = "delta1"
    # Least drop a step is assumed to cost, per share of the unit removed: measured on a few
    # calibration pairs, a "gain" is noise, and removal is never free.
    sensitivity_floor: float = 0.01
    calibration: PruneCalibSpec = field(default_factory=PruneCalibSpec)
    finetune: dict = field(default_factory=dict)  # TrainSpec fields (pqk.train.trainer)
    seed: int = 42

    def __post_init__(self) -> None:
        if isinstance(self.calibration, Mapping):
            reject_unknown_keys("calibration", self.calibration, set(PruneCalibSpec.__dataclass_fields__))
            self.calibration = PruneCalibSpec(**dict(self.calibration))
        _check_spec(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a pruning spec must be a mapping; got {type(data).__name__}")
        reject_unknown_keys("pruning spec", data, set(cls.__dataclass_fields__))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_ratio(self) -> float:
        return max(self.sensitivity_ratios)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_rho(rho: Any) -> float:
    if not _is_number(rho) or not 0 < float(rho) < 1:
        raise ConfigError(f"rho {rho!r} is outside (0, 1); accepted: a fraction of the prunable parameters, e.g. 0.1 or 0.3")
    return float(rho)


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ConfigError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return value


def _check_spec(spec: PruneSpec) -> None:
    spec.rho = check_rho(spec.rho)
    check_choice("allocation", spec.allocation, ALLOCATIONS)
    check_choice("importance", spec.importance, IMPORTANCES)
    check_choice("sensitivity_metric", spec.sensitivity_metric, SENSITIVITY_METRICS)
    for name in ("heads", "ffn", "embed"):
        if not isinstance(getattr(spec, name), bool):
            raise ConfigError(f"{name} must be true or false; got {getattr(spec, name)!r}")
    if spec.embed:
        # A pruned residual width would change every LayerNorm's statistics and, with the config
        # deriving head_dim from embed_dim / num_heads, only multiples of head_dim are expressible.
        raise ConfigError("embed: true (pruning the embedding width) is not supported; accepted: false")
    if not (spec.heads or spec.ffn):
        raise ConfigError("heads and ffn are both false: nothing to prune; accepted: at least one true")
    if not _is_int(spec.min_heads) or spec.min_heads < 1:
        raise ConfigError(f"min_heads must be an integer >= 1; got {spec.min_heads!r}")
    ratios = spec.sensitivity_ratios
    if (isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios
            or not all(_is_number(r) and 0 < float(r) < 1 for r in ratios)):
        raise ConfigError(f"sensitivity_ratios must be a non-empty list of fractions in (0, 1); got {ratios!r}")
    spec.sensitivity_ratios = sorted({float(r) for r in ratios})
    if not _is_number(spec.sensitivity_floor) or not 0 <= float(spec.sensitivity_floor) < 1:
        raise ConfigError(f"sensitivity_floor must be a number in [0, 1); got {spec.sensitivity_floor!r}")
    if spec.allocation == "sensitivity" and spec.rho > spec.max_ratio:
        raise ConfigError(
            f"rho {spec.rho} exceeds the largest sensitivity ratio {spec.max_ratio}; accepted: rho <= "
            f"max(sensitivity_ratios), or allocation uniform"
        )
    c = spec.calibration
    for name in ("n_pairs", "n_scenes", "width", "height", "views", "window", "batch_size"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"calibration.{name} must be a positive integer; got {value!r}")
    if not _is_int(c.seed_base) or c.seed_base < PRUNE_CALIB_SEED_MIN:
        raise ConfigError(
            f"calibration.seed_base must be an integer >= {PRUNE_CALIB_SEED_MIN:,} (lower seeds are the "
            f"evaluation, training, validation and quantization scenes); got {c.seed_base!r}"
        )
    if not isinstance(spec.finetune, Mapping):
        raise ConfigError(f"finetune must be a mapping of training settings; got {spec.finetune!r}")
    if spec.finetune:
        train_spec(spec)  # fail at load time, not after the sensitivity trials


def train_spec(spec: PruneSpec):
    """The fine-tuning `TrainSpec` (pqk.train.trainer) of `spec.finetune`, seeded like the spec."""
    from pqk.train.trainer import TrainSpec

    return TrainSpec.from_dict({"seed": spec.seed, **dict(spec.finetune)})


def load_prune_spec(path: str | Path) -> PruneSpec:
    """Read and validate a pruning spec (configs/prune.yaml); missing keys take defaults."""
    data = read_yaml(Path(path), "pruning config", invalid=ConfigError)
    return PruneSpec.from_dict({} if data is None else data)


def rho_tag(rho: float) -> str:
    """0.1 -> 'r010', 0.3 -> 'r030' (the protocol's file and exp_id names)."""
    return f"r{round(rho * 100):03d}"
