"""Plans (configs/plans/*.yaml): which experiments to run, each a base model plus an ordered
list of method steps. Dependencies are not written down: an experiment depends on every
other experiment whose steps are a prefix of its own (K→Q depends on K, P→K→Q on P→K and P),
which is also what lets the runner share their work.

    name: minimal
    budget: 0.1                      # scales epochs / calibration (embedded default: minutes)
    experiments:
      - {id: baseline, steps: []}
      - id: K
        steps: [{method: distill, config: configs/distill.yaml, run: K-1}]
      - id: KQ
        steps: [{method: distill, config: configs/distill.yaml, run: K-1}, {method: quantize, config: configs/quant.yaml}]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqk.errors import ConfigError, InputError
from pqk.yaml_io import read_yaml

METHODS = {"distill": "K", "prune": "P", "quantize": "Q", "joint": "PQK"}
# Steps whose output is an INT8 artifact: nothing can follow them.
QUANTIZING = ("quantize", "joint")
STEP_OPTIONS = {
    "distill": {"run", "gamma"},  # a run of the distillation config (K-1, ..., control); gamma overrides its γ
    "prune": {"rho", "allocation"},
    "quantize": {"qat", "runtimes", "keep_list", "calibration_size"},
    "joint": {"run", "rho", "runtimes"},  # one training run: prune + distil + fake quant (configs/joint.yaml)
}
DEFAULT_CONFIG = {"quantize": "quant"}
ABLATIONS = ("keep", "calib", "loss")  # P5: ABL-1 keep-list, ABL-2 calibration size, ABL-3 loss terms
GATE_POLICIES = ("stop", "record")
_PLAN_KEYS = {"name", "description", "teacher", "workload", "budget", "gate_policy", "experiments",
              "estimate_h100_hours", "gates"}
_GATE_KEYS = {"max_quality_drop", "min_latency_cut", "min_size_cut"}


@dataclass(frozen=True)
class PlanStep:
    method: str
    config: Path
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}({self.config.name}{', ' + opts if opts else ''})"

    def fingerprint(self) -> str:
        """Hash of what this step does: method, options and its config's content (parsed, so
        editing a comment does not invalidate the cache), with the configs a joint config
        points at (its distillation, pruning and quantization files)."""
        payload = {"method": self.method, "options": self.options, "config": _config_data(self.config)}
        if self.method == "joint" and isinstance(payload["config"], dict):
            from pqk.methods.joint import referenced_configs

            for key, path in referenced_configs(payload["config"], self.config.resolve().parent).items():
                payload[f"{key}_config"] = _config_data(path) if isinstance(path, Path) else path
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _config_data(path: Path) -> Any:
    """A config file's parsed content (its raw text when it does not parse; None when absent)."""
    import yaml

    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@dataclass
class Experiment:
    id: str
    steps: list[PlanStep]
    ablation: str | None = None  # P5 group: its records are also collected in ablation_<kind>.json

    @property
    def combo(self) -> str:
        return "".join(METHODS[s.method] for s in self.steps) or "teacher"

    @property
    def stage(self) -> str:
        """The protocol stage whose gate applies (protocol.md, "Stages, outputs and gates")."""
        methods = [s.method for s in self.steps]
        if not methods:
            return "P0"
        if methods == ["joint"]:
            return "P3"  # gated like P→K→Q: against its own FP32 model (masks removed, float weights)
        if methods[-1] == "quantize":
            return "P2" if len(methods) == 1 else "P3"
        if methods == ["prune"]:
            return "P4"
        return "P1"  # K alone, or P→K: a student held to the teacher's quality


@dataclass
class Plan:
    name: str
    experiments: list[Experiment]
    path: Path
    description: str = ""
    teacher: Path | None = None
    workload: Path = Path("configs/workload.yaml")
    budget: float = 1.0
    gate_policy: str = "stop"
    estimates: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)  # stage -> GateRule overriding the protocol's

    def select(self, ids: list[str]) -> "Plan":
        """The plan reduced to the experiments `ids` and those they build on (their prefixes)."""
        from dataclasses import replace

        known = {e.id: e for e in self.experiments}
        bad = [i for i in ids if i not in known]
        if bad or not ids:
            raise ConfigError(f"experiment {bad[0] if bad else ''!r} is not in plan {self.name}; accepted: {', '.join(known)}")
        keep = set(ids) | {p.id for i in ids for p in self.prefixes(known[i])}
        return replace(self, experiments=[e for e in self.experiments if e.id in keep])

    def with_budget(self, budget: float) -> "Plan":
        """The plan at another budget, named <name>_budget<b> so its runs never overwrite the
        plan's own folder."""
        from dataclasses import replace

        if isinstance(budget, bool) or not budget > 0:
            raise ConfigError(f"--budget {budget!r} is not accepted; expected a number > 0")
        if budget == self.budget:
            return self
        return replace(self, budget=float(budget), name=f"{self.name}_budget{budget:g}")

    def prefixes(self, experiment: Experiment) -> list[Experiment]:
        """Experiments whose steps are a proper prefix of `experiment`'s (its dependencies)."""
        n = len(experiment.steps)
        return [e for e in self.experiments if e is not experiment and len(e.steps) < n
                and e.steps == experiment.steps[: len(e.steps)]]


def _resolve(path_like: Any, base: Path, what: str) -> Path:
    if not isinstance(path_like, str) or not path_like:
        raise ConfigError(f"{what} must be a file path; got {path_like!r}")
    path = Path(path_like)
    if path.is_absolute() or path.exists():
        return path
    # Relative paths: from the working directory first (the README's examples run from the
    # repository root), then from the plan file's folder up.
    for root in (base, *base.parents):
        if (root / path).exists():
            return root / path
    return path


def _step(raw: Any, base: Path, where: str) -> PlanStep:
    if not isinstance(raw, dict) or "method" not in raw:
        raise ConfigError(f"{where}: a step is a mapping with 'method' and 'config'; got {raw!r}")
    method = raw["method"]
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; accepted: {', '.join(METHODS)}")
    options = {k: v for k, v in raw.items() if k not in ("method", "config")}
    unknown = sorted(set(options) - STEP_OPTIONS[method])
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} for {method}; accepted: {', '.join(sorted(STEP_OPTIONS[method]))}")
    config = _resolve(raw.get("config", f"configs/{DEFAULT_CONFIG.get(method, method)}.yaml"), base, f"{where}.config")
    if not config.is_file():
        raise InputError(f"{where}: config file {config} does not exist")
    return PlanStep(method, config, options)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan; one-line errors name the bad entry."""
    path = Path(path)
    data = read_yaml(path, "plan", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"plan {path} must be a mapping with 'name' and 'experiments'")
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise ConfigError(f"plan {path}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(_PLAN_KEYS))}")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or name.startswith(".") or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"plan {path}: name {name!r} must be letters, digits, '-', '_' or '.', not starting with '.' (it names runs/<name>)")
    base = path.resolve().parent
    raw_exps = data.get("experiments")
    if not isinstance(raw_exps, list) or not raw_exps:
        raise ConfigError(f"plan {path}: 'experiments' must be a non-empty list")
    experiments, seen = [], set()
    for k, raw in enumerate(raw_exps):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise ConfigError(f"plan {path}: experiment #{k + 1} needs an 'id' (a string)")
        exp_id = raw["id"]
        if exp_id in seen:
            raise ConfigError(f"plan {path}: experiment id {exp_id!r} is used twice")
        seen.add(exp_id)
        steps = [_step(s, base, f"{exp_id}.steps[{i}]") for i, s in enumerate(raw.get("steps") or [])]
        if any(s.method == "quantize" for s in steps[:-1]):
            raise ConfigError(f"plan {path}: experiment {exp_id!r} quantizes before its last step; quantize must come last")
        if any(s.method == "joint" for s in steps) and len(steps) != 1:
            raise ConfigError(f"plan {path}: experiment {exp_id!r}: joint starts from the teacher and ends in INT8; "
                              "it must be the experiment's only step")
        ablation = raw.get("ablation")
        if ablation is not None and ablation not in ABLATIONS:
            raise ConfigError(f"plan {path}: experiment {exp_id!r}: ablation {ablation!r} is not known; accepted: {', '.join(ABLATIONS)}")
        unknown_keys = sorted(set(raw) - {"id", "steps", "ablation"})
        if unknown_keys:
            raise ConfigError(f"plan {path}: experiment {exp_id!r}: unknown key {unknown_keys[0]!r}; accepted: id, steps, ablation")
        experiments.append(Experiment(exp_id, steps, ablation))
    budget = data.get("budget", 1.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"plan {path}: budget {budget!r} must be a number > 0")
    policy = data.get("gate_policy", "stop")
    if policy not in GATE_POLICIES:
        raise ConfigError(f"plan {path}: gate_policy {policy!r} is not known; accepted: {', '.join(GATE_POLICIES)}")
    teacher = data.get("teacher")
    gates = _gates(data.get("gates") or {}, path)
    return Plan(
        name=name, experiments=experiments, path=path, description=str(data.get("description", "")),
        teacher=_resolve(teacher, base, "teacher") if teacher else None,
        workload=_resolve(data.get("workload", "configs/workload.yaml"), base, "workload"),
        budget=float(budget), gate_policy=policy, estimates=dict(data.get("estimate_h100_hours") or {}),
        gates=gates,
    )


def _gates(raw: Any, path: Path) -> dict:
    """Stage -> GateRule: the protocol's thresholds with the plan's overrides."""
    from dataclasses import replace

    from pqk.pipeline.gates import GATES

    if not isinstance(raw, dict):
        raise ConfigError(f"plan {path}: gates must map stages (P1, P2, ...) to thresholds")
    out = {}
    for stage, values in raw.items():
        if stage not in GATES:
            raise ConfigError(f"plan {path}: gates: unknown stage {stage!r}; accepted: {', '.join(GATES)}")
        if not isinstance(values, dict) or set(values) - _GATE_KEYS:
            raise ConfigError(f"plan {path}: gates.{stage} accepts {', '.join(sorted(_GATE_KEYS))}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"plan {path}: gates.{stage}.{key} = {value!r} must be a number (a fraction)")
        out[stage] = replace(GATES[stage], **{k: float(v) for k, v in values.items()})
    return out
