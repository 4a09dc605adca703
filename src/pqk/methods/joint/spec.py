"""The joint PQK settings: `JointSpec` (the K run, ρ, the W8A8 spec and the schedule) and
its loader `load_joint_spec`, which resolves the distillation, pruning and quantization
configs a joint config names (`referenced_configs`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from pqk.errors import ConfigError
from pqk.methods.distill.spec import DistillSpec
from pqk.methods.prune import PruneSpec


@dataclass
class JointSpec:
    """One joint run: the K run (student, loss, length), ρ of P, the W8A8 spec of Q and when
    each happens (fractions of the run)."""

    distill: DistillSpec
    prune: PruneSpec
    quant: Any  # pqk.methods.quantize.QuantSpec
    distill_run: str = "K-1"
    prune_until: float = 0.5
    mask_updates: int = 8
    fake_quant_from: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        for name in ("prune_until", "fake_quant_from"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ConfigError(f"schedule.{name} = {v!r} is not accepted; expected a fraction of the run in (0, 1)")
        if isinstance(self.mask_updates, bool) or not isinstance(self.mask_updates, int) or self.mask_updates < 1:
            raise ConfigError(f"schedule.mask_updates = {self.mask_updates!r} is not accepted; expected an integer >= 1")
        if self.prune_until > self.fake_quant_from:
            raise ConfigError(f"schedule.prune_until ({self.prune_until:g}) must not come after schedule.fake_quant_from "
                              f"({self.fake_quant_from:g}): activation ranges are calibrated on the settled masks")
        if self.prune.allocation != "uniform":
            self.prune = replace(self.prune, allocation="uniform")

    @property
    def rho(self) -> float:
        return float(self.prune.rho)

    def keyparams(self) -> str:
        """The exp_id part: joint_r010_K1."""
        return f"joint_r{round(self.rho * 100):03d}_{self.distill_run.replace('-', '').replace('_', '')}"

    def record_fields(self) -> dict:
        return {"rho": self.rho, **self.distill.record_fields(), **self.quant.to_record_fields()}

    def to_json(self) -> dict:
        return {"distill_run": self.distill_run, "distill": self.distill.to_json(), "prune": self.prune.to_dict(),
                "quant": self.quant.to_dict(), "prune_until": self.prune_until, "mask_updates": self.mask_updates,
                "fake_quant_from": self.fake_quant_from}


_JOINT_KEYS = {"distill", "prune", "quantize", "schedule"}
_SECTION_KEYS = {"distill": {"config", "run"}, "prune": {"config", "rho"}, "quantize": {"config"},
                 "schedule": {"prune_until", "mask_updates", "fake_quant_from"}}


_REFERENCED = (("distill", "distill.yaml"), ("prune", "prune.yaml"), ("quantize", "quant.yaml"))


def referenced_configs(data: Mapping, base: Path) -> dict[str, Any]:
    """The distillation, pruning and quantization config a joint config names, by section
    (default: the file of that name beside it); a relative path is tried from the working
    folder, then from `base` (the joint config's folder). Non-path values are returned as is."""
    out: dict[str, Any] = {}
    for key, default in _REFERENCED:
        section = data.get(key)
        name = section.get("config", default) if isinstance(section, dict) else default
        if not isinstance(name, str) or not name:
            out[key] = name
            continue
        path = Path(name)
        out[key] = path if path.is_absolute() or path.exists() else base / path
    return out


def _existing(path: Any, what: str) -> Path:
    if not isinstance(path, Path):
        raise ConfigError(f"{what} must be a file path; got {path!r}")
    if not path.is_file():
        from pqk.errors import InputError

        raise InputError(f"{what}: {path} does not exist")
    return path


def load_joint_spec(path: str | Path, run: str | None = None, rho: float | None = None) -> JointSpec:
    """Read configs/joint.yaml: it points at the distillation, pruning and quantization configs
    (paths relative to itself) and sets the schedule. `run` / `rho` override its choices."""
    from pqk.methods.distill import load_distill_config
    from pqk.methods.prune import check_rho, load_prune_spec
    from pqk.methods.quantize import load_quant_spec
    from pqk.yaml_io import read_yaml, reject_unknown_keys

    path = Path(path)
    data = read_yaml(path, "joint PQK config", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"joint PQK config {path} must be a mapping with distill, prune, quantize, schedule")
    reject_unknown_keys("joint PQK config", data, _JOINT_KEYS)
    sections = {}
    for key, accepted in _SECTION_KEYS.items():
        section = data.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"joint PQK config {path}: {key} must be a mapping")
        reject_unknown_keys(f"joint PQK config {key}", section, accepted)
        sections[key] = section
    configs = referenced_configs(data, path.resolve().parent)
    grid = load_distill_config(_existing(configs["distill"], "distill.config"))
    run = run or sections["distill"].get("run") or next(iter(grid.runs))
    if run not in grid.runs:
        raise ConfigError(f"distillation run {run!r} is not in the distillation config; accepted: {', '.join(grid.runs)}")
    distill = grid.runs[run]
    if distill.task_only:
        raise ConfigError(f"distillation run {run!r} is the task-only control; joint PQK distils from the teacher")
    prune = load_prune_spec(_existing(configs["prune"], "prune.config"))
    rho = rho if rho is not None else sections["prune"].get("rho", prune.rho)
    prune = replace(prune, rho=check_rho(rho))
    quant = load_quant_spec(_existing(configs["quantize"], "quantize.config"))
    schedule = sections["schedule"]
    return JointSpec(distill=distill, prune=prune, quant=quant, distill_run=run,
                     prune_until=schedule.get("prune_until", 0.5), mask_updates=schedule.get("mask_updates", 8),
                     fake_quant_from=schedule.get("fake_quant_from", 2.0 / 3.0))
