"""The distillation settings: one run's `DistillSpec` and the P1 grid of runs
(configs/distill.yaml, `DistillGrid`) with its loader `load_distill_config`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pqk.errors import ConfigError
from pqk.train.trainer import TrainSpec


@dataclass
class DistillSpec:
    """One distillation run. `beta_schedule`: [[start fraction, β], ...], piecewise constant
    over training progress (β before the first start). `task_only` is the control: L_task
    alone, no teacher forward at all (β, γ ignored)."""

    T: float = 3.0
    alpha: float = 1.0
    beta: float = 0.5
    beta_schedule: list = field(default_factory=list)
    gamma: float = 0.0
    ratio: float = 0.3
    task_only: bool = False
    # The KL's maps standardised each by the teacher's own spatial mean/std (True), or the
    # unstandardised form at a matched temperature (False; see `channel_kl`).
    kl_standardize: bool = True
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainSpec.from_dict(self.train)
        for name in ("T",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} = {v!r} is not accepted; expected a temperature > 0")
        if not isinstance(self.kl_standardize, bool):
            raise ConfigError(f"kl_standardize = {self.kl_standardize!r} is not accepted; expected true or false")
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"{name} = {v!r} is not accepted; expected a number >= 0")
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio = {self.ratio!r} is not accepted; expected a number in [0, 1)")
        sched = []
        for item in self.beta_schedule or []:
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, (int, float)) for x in item)
            if not ok or not 0.0 <= item[0] <= 1.0 or item[1] < 0:
                raise ConfigError(f"beta_schedule entry {item!r} is not accepted; expected [start fraction 0..1, beta >= 0]")
            sched.append([float(item[0]), float(item[1])])
        self.beta_schedule = sorted(sched)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillSpec":
        from pqk.yaml_io import dataclass_from_mapping

        return dataclass_from_mapping(cls, data, "distillation")

    def beta_at(self, progress: float) -> float:
        beta = self.beta
        for start, value in self.beta_schedule:
            if progress >= start:
                beta = value
        return beta

    def scaled(self, budget: float) -> "DistillSpec":
        return replace(self, train=self.train.scaled(budget))

    def keyparams(self) -> str:
        """The exp_id part: T3B05, T3B05_sched, T3B05G01; 'taskonly' for the control."""
        if self.task_only:
            return "taskonly"
        key = f"T{self.T:g}B{_digits(self.beta)}"
        if self.gamma > 0:
            key += f"G{_digits(self.gamma)}"
        if self.beta_schedule:
            key += "_sched"
        return key

    def record_fields(self) -> dict[str, float | None]:
        if self.task_only:
            return {"T": None, "beta": 0.0, "gamma": 0.0}
        return {"T": float(self.T), "beta": float(self.beta), "gamma": float(self.gamma)}

    def to_json(self) -> dict:
        return asdict(self)


def _digits(x: float) -> str:
    # 0.5 -> "05", 0.1 -> "01", 1.0 -> "1", 0.25 -> "025"
    s = f"{x:g}"
    return s.replace(".", "") if s.startswith("0.") else s.replace(".", "p")


# --- the P1 grid (configs/distill.yaml) -----------------------------------------------------

BEST_STUDENT_FILE = "student_fp32_best.safetensors"


@dataclass
class DistillGrid:
    """configs/distill.yaml: the runs (name -> spec, file order), the selections (K-4: the best
    of named runs by the main metric, δ1), and the budget used with the embedded teacher."""

    runs: dict[str, DistillSpec]
    select: dict[str, list[str]]
    embedded_budget: float = 0.1

    def exp_id(self, run: str, number: int = 1) -> str:
        from pqk.naming import exp_id

        return exp_id("K", "", self.runs[run].keyparams(), number)


_GRID_KEYS = ("ratio", "alpha", "embedded_budget", "train", "runs", "select")


def load_distill_config(path: Path) -> DistillGrid:
    """Read and validate a distillation grid; one-line ConfigError/InputError on bad input."""
    from pqk.yaml_io import read_yaml

    data = read_yaml(Path(path), "distillation config", "see configs/distill.yaml", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"distillation config {path} must be a mapping with 'train' and 'runs'")
    unknown = sorted(set(data) - set(_GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; accepted: {', '.join(_GRID_KEYS)}")
    shared_train = data.get("train") or {}
    if not isinstance(shared_train, dict):
        raise ConfigError(f"{path}: 'train' must be a mapping of TrainSpec fields")
    runs_raw = data.get("runs")
    if not isinstance(runs_raw, dict) or not runs_raw:
        raise ConfigError(f"{path}: 'runs' must map run names (e.g. K-1) to their settings")
    runs = {}
    for name, run in runs_raw.items():
        run = dict(run or {})
        if not isinstance(run.get("train", {}), dict):
            raise ConfigError(f"{path}: runs.{name}.train must be a mapping of TrainSpec fields")
        train = {**shared_train, **run.pop("train", {})}
        defaults = {k: data[k] for k in ("ratio", "alpha") if k in data}
        try:
            runs[str(name)] = DistillSpec.from_dict({**defaults, **run, "train": train})
        except ConfigError as exc:
            raise ConfigError(f"{path}: runs.{name}: {exc}") from None
    select = {}
    for name, members in (data.get("select") or {}).items():
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{path}: select.{name} must list run names, e.g. [K-1, K-2, K-3]")
        for m in members:
            if m not in runs:
                raise ConfigError(f"{path}: select.{name} names run {m!r}; runs are {', '.join(runs)}")
        if name in runs:
            raise ConfigError(f"{path}: select.{name} has the name of a run")
        select[str(name)] = [str(m) for m in members]
    budget = data.get("embedded_budget", 0.1)
    if not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"{path}: embedded_budget {budget!r} is not accepted; expected a number > 0")
    ids = [DistillGrid(runs, select).exp_id(n) for n in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: two runs share the exp_id {dup[0]}; change T, beta, gamma or the schedule")
    return DistillGrid(runs=runs, select=select, embedded_budget=float(budget))
