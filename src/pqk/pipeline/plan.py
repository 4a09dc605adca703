"""Plans (configs/plans/*.yaml): which experiments to run, each a base model plus an ordered
list of method steps. Dependencies are not written down: an experiment depends on every
other experiment whose steps are a prefix of its own (K→Q depends on K, P→K→Q on P→K and P),
which is also what lets the runner share their work.

    name: minimal
    task: dust3r                     # the model family (default dust3r)
    budget: 0.1                      # scales epochs / calibration (embedded default: minutes)
    experiments:
      - {id: baseline, steps: []}
      - id: K
        steps: [{method: distill, config: configs/distill.yaml, run: K-1}]
      - id: KQ
        steps: [{method: distill, config: configs/distill.yaml, run: K-1}, {method: quantize, config: configs/quant.yaml}]

This is the one reader of plans: `pqk run` reads them strictly (every method, option and
config file checked, one-line errors), `pqk budget` leniently (a draft plan whose config
files do not exist yet is still costed; what could not be read becomes a note).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pqk.errors import ConfigError, InputError
from pqk.methods.base import get_method, method_names
from pqk.io.files import resolve_path  # noqa: F401 (re-exported)
from pqk.yaml_io import read_yaml

ABLATIONS = ("keep", "calib", "loss")  # P5: ABL-1 keep-list, ABL-2 calibration size, ABL-3 loss terms
GATE_POLICIES = ("stop", "record")
_PLAN_KEYS = {"name", "description", "teacher", "workload", "budget", "gate_policy", "experiments",
              "estimate_h100_hours", "gates", "task"}
_EXPERIMENT_KEYS = {"id", "steps", "ablation", "description", "estimate_h100_hours", "exp_id", "budget"}
_GATE_KEYS = {"max_quality_drop", "min_latency_cut", "min_size_cut"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names that become file names


@dataclass(frozen=True)
class PlanStep:
    method: str
    config: Path | None  # resolved; None when a lenient read did not find it
    options: dict = field(default_factory=dict)
    config_name: str = ""  # as written in the plan
    family: str = "dust3r"  # the plan's model family: which implementation of the method runs

    @property
    def impl(self):
        """The registered method this step runs (its implementation for the plan's family)."""
        return get_method(self.method, self.family)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        name = self.config.name if self.config is not None else self.config_name
        return f"{self.method}({name}{', ' + opts if opts else ''})"

    def label(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.options.items())
        return self.method + (f" ({extra})" if extra else "")

    def fingerprint(self) -> str:
        """Hash of what this step does: method, options and its config's content (parsed, so
        editing a comment does not invalidate the cache), with every other config file the
        method says its result depends on (joint PQK: the configs it names)."""
        data = _config_data(self.config)
        payload = {"method": self.method, "options": self.options, "config": data}
        if self.family != "dust3r":  # DUSt3R's cache keys predate families and stay valid
            payload["family"] = self.family
        if isinstance(data, dict) and self.config is not None:
            for key, path in self.impl.config_files(self.config, data).items():
                payload[f"{key}_config"] = _config_data(path) if isinstance(path, Path) else path
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def spec(self) -> Any:
        """The step's typed spec (its method's reading of the config with the options applied)."""
        return self.impl.load_spec(self.config, self.options)


def _config_data(path: Path | None) -> Any:
    """A config file's parsed content (its raw text when it does not parse; None when absent)."""
    import yaml

    if path is None or not path.is_file():
        return None
    text = path.read_text(errors="replace")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@dataclass
class Experiment:
    id: str
    steps: list[PlanStep]
    ablation: str | None = None  # P5 group: its records are also collected in ablation_<kind>.json
    description: str = ""
    estimate_h100: tuple[float, float] | None = None  # the plan document's figure, for `pqk budget`
    exp_id: str | None = None  # the record's name when the plan gives one (else derived from the steps)
    combo_override: str | None = None  # a command quantizing a student names its combo (KQ)
    stage_override: str | None = None
    folder: str | None = None  # the steps' folder, relative to the run folder (None: steps/<method>-<key>)
    # This experiment's own budget (None: the plan's): one plan can then hold the same steps at
    # several budgets, the points of a budget-vs-quality curve (exp_id gets a _bud<b> part).
    budget: float | None = None

    @property
    def combo(self) -> str:
        if self.combo_override:
            return self.combo_override
        return "".join(_letter(s) for s in self.steps) or "teacher"

    @property
    def stage(self) -> str:
        """The protocol stage whose gate applies (protocol.md, "Stages, outputs and gates")."""
        if self.stage_override:
            return self.stage_override
        if not self.steps:
            return "P0"
        return self.steps[-1].impl.stage(len(self.steps) == 1)

    @property
    def reference_kind(self) -> str:
        """teacher | input | own_float: what this experiment's gate compares with."""
        if not self.steps:
            return "teacher"
        kind = self.steps[-1].impl.reference(len(self.steps) == 1)
        if self.stage_override == "P3" and kind == "teacher":
            return "input"  # a command quantizing a student: the student in FP32 is the reference
        return kind


def _letter(step: PlanStep) -> str:
    try:
        return step.impl.letter
    except ConfigError:  # a lenient read keeps steps of unknown methods; they have no letter
        return "?"


@dataclass
class Plan:
    name: str
    experiments: list[Experiment]
    path: Path
    description: str = ""
    teacher: Path | None = None
    teacher_name: str | None = None  # as written in the plan
    workload: Path | None = Path("configs/workload.yaml")
    budget: float = 1.0
    gate_policy: str = "stop"
    estimates: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)  # stage -> GateRule overriding the protocol's
    task: str = "dust3r"
    budget_set: bool = True  # the plan file sets its budget (else 1.0 is assumed)
    notes: list[str] = field(default_factory=list)  # what a lenient read could not use

    def select(self, ids: list[str]) -> "Plan":
        """The plan reduced to the experiments `ids` and those they build on (their prefixes)."""
        known = {e.id: e for e in self.experiments}
        bad = [i for i in ids if i not in known]
        if bad or not ids:
            raise ConfigError(f"experiment {bad[0] if bad else ''!r} is not in plan {self.name}; accepted: {', '.join(known)}")
        keep = set(ids) | {p.id for i in ids for p in self.prefixes(known[i])}
        return replace(self, experiments=[e for e in self.experiments if e.id in keep])

    def with_budget(self, budget: float) -> "Plan":
        """The plan at another budget, named <name>_budget<b> so its runs never overwrite the
        plan's own folder."""
        if isinstance(budget, bool) or not budget > 0:
            raise ConfigError(f"--budget {budget!r} is not accepted; expected a number > 0")
        if budget == self.budget:
            return self
        return replace(self, budget=float(budget), name=f"{self.name}_budget{budget:g}")

    def with_gate_policy(self, policy: str) -> "Plan":
        if policy not in GATE_POLICIES:
            raise InputError(f"--gate-policy {policy!r} is not known; accepted: {', '.join(GATE_POLICIES)}")
        return replace(self, gate_policy=policy)

    def prefixes(self, experiment: Experiment) -> list[Experiment]:
        """Experiments whose steps are a proper prefix of `experiment`'s (its dependencies)."""
        n = len(experiment.steps)
        return [e for e in self.experiments if e is not experiment and len(e.steps) < n
                and e.steps == experiment.steps[: len(e.steps)] and (not e.steps or e.budget == experiment.budget)]

    def validate_specs(self) -> None:
        """Read every step's spec (run names, values, referenced files): a plan is checked whole
        before its first step runs, so a typo in its last experiment costs nothing."""
        for exp in self.experiments:
            for k, step in enumerate(exp.steps):
                try:
                    step.impl.check(step.spec(), step.options)
                except (ConfigError, InputError) as exc:
                    where = f"plan {self.path}: {exp.id}.steps[{k}] ({step.method}): " if self.path is not None else ""
                    raise type(exc)(f"{where}{exc}") from None


def estimate_range(value: Any) -> tuple[float, float] | None:
    """The plan document's figure: 45, [140, 150] or '140-150' -> (low, high)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(min(value)), float(max(value))
    if isinstance(value, str):
        nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", value)]
        if 1 <= len(nums) <= 2:
            return min(nums), max(nums)
    return None


class _Reader:
    """One plan file read strictly (errors) or leniently (notes)."""

    def __init__(self, path: Path, strict: bool, family: str = "dust3r"):
        self.path, self.strict, self.notes, self.family = path, strict, [], family
        self.base = path.resolve().parent

    def problem(self, error: type[Exception], message: str) -> None:
        if self.strict:
            raise error(f"plan {self.path}: {message}")
        self.notes.append(message)

    def step(self, raw: Any, where: str) -> PlanStep | None:
        if isinstance(raw, str) and not self.strict:
            raw = {"method": raw}
        if not isinstance(raw, dict) or not raw.get("method"):
            raise ConfigError(f"plan {self.path}: {where}: a step is a mapping with 'method' and 'config' "
                              f"({', '.join(method_names(self.family))}); got {raw!r}")
        method = str(raw["method"])
        options = {str(k): v for k, v in raw.items() if k not in ("method", "config")}
        if method not in method_names(self.family):
            self.problem(ConfigError, f"{where}: unknown method {method!r} for the {self.family} family; "
                                      f"accepted: {', '.join(method_names(self.family))}")
            return PlanStep(method, None, options, str(raw.get("config") or f"configs/{method}.yaml"), self.family)
        known = get_method(method, self.family)
        unknown = sorted(set(options) - known.options)
        if unknown and self.strict:
            raise ConfigError(f"plan {self.path}: {where}: unknown option {unknown[0]!r} for {method}; "
                              f"accepted: {', '.join(sorted(known.options))}")
        name = raw.get("config", known.default_config)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"plan {self.path}: {where}.config must be a file path; got {name!r}")
        config = resolve_path(name, self.base)
        if config is None or not config.is_file():
            if self.strict:
                raise InputError(f"plan {self.path}: {where}: config file {name} does not exist")
            config = None
        return PlanStep(method, config, options, name, self.family)

    def experiment(self, k: int, raw: Any, seen: set[str], top_estimates: dict) -> Experiment:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), (str, int)) or raw.get("id") == "":
            raise ConfigError(f"plan {self.path}: experiment #{k + 1} needs an 'id' (a string, e.g. id: K)")
        exp_id = str(raw["id"])
        if exp_id in seen:
            raise ConfigError(f"plan {self.path}: experiment id {exp_id!r} is used twice")
        seen.add(exp_id)
        unknown = sorted(set(raw) - _EXPERIMENT_KEYS)
        if unknown:
            self.problem(ConfigError, f"experiment {exp_id!r}: unknown key {unknown[0]!r}; accepted: "
                                      f"{', '.join(sorted(_EXPERIMENT_KEYS))}")
        raw_steps = raw.get("steps") or []
        if not isinstance(raw_steps, list):
            raise ConfigError(f"plan {self.path}: experiment {exp_id}: 'steps' must be a list of {{method: ..., config: ...}}")
        steps = [self.step(s, f"{exp_id}.steps[{i}]") for i, s in enumerate(raw_steps)]
        self._check_order(exp_id, steps)
        ablation = raw.get("ablation")
        if ablation is not None and ablation not in ABLATIONS:
            self.problem(ConfigError, f"experiment {exp_id!r}: ablation {ablation!r} is not known; accepted: {', '.join(ABLATIONS)}")
        name = raw.get("exp_id")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ConfigError(f"plan {self.path}: experiment {exp_id!r}: exp_id {name!r} must be letters, digits, '.', '-', '_'")
        budget = raw.get("budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ConfigError(f"plan {self.path}: experiment {exp_id!r}: budget {budget!r} must be a number > 0")
        return Experiment(exp_id, steps, ablation if ablation in ABLATIONS else None, str(raw.get("description", "")),
                          estimate_range(raw.get("estimate_h100_hours", top_estimates.get(exp_id))), name,
                          budget=None if budget is None else float(budget))

    def _check_order(self, exp_id: str, steps: list[PlanStep]) -> None:
        known = [(s, s.impl) for s in steps if s.method in method_names(self.family)]
        for s, m in known[:-1] if self.strict else []:
            try:
                why = m.must_be_last(s.spec())
            except (ConfigError, InputError):
                continue  # a bad spec is reported by validate_specs, with its step's place
            if why:
                raise ConfigError(f"plan {self.path}: experiment {exp_id!r}: {s.method} comes before its last step; {why}")
        for s, m in known:
            if m.only_step and len(steps) != 1 and self.strict:
                raise ConfigError(f"plan {self.path}: experiment {exp_id!r}: {m.only_step}; it must be the experiment's only step")


def load_plan(path: str | Path, strict: bool = True) -> Plan:
    """Read a plan. `strict` (pqk run): every method, option and config file is checked and a
    problem is a one-line error naming it. Lenient (pqk budget): unknown methods, options and
    missing config files become `plan.notes`, and the plan is read as far as it can be."""
    path = Path(path)
    data = read_yaml(path, "plan", "see configs/plans/minimal.yaml", invalid=ConfigError)
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), list) or not data["experiments"]:
        raise ConfigError(f"plan {path} must be a mapping with 'name' and a non-empty 'experiments' list")
    task = data.get("task", "dust3r")
    from pqk.tasks import get_task

    get_task(task)  # an unknown family is an error in either mode
    reader = _Reader(path, strict, task)
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        reader.problem(ConfigError, f"unknown key {unknown[0]!r}; accepted: {', '.join(sorted(_PLAN_KEYS))}")
    name = str(data.get("name") or path.stem)
    if not _NAME.match(name):
        raise ConfigError(f"plan {path}: name {name!r} must be letters, digits, '-', '_' or '.', not starting with '.' "
                          "(it names runs/<name>)")
    top = data.get("estimate_h100_hours")
    top = top if isinstance(top, dict) else ({"total": top} if top is not None else {})
    seen: set[str] = set()
    experiments = [reader.experiment(k, raw, seen, top) for k, raw in enumerate(data["experiments"])]
    budget = data.get("budget", 1.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"plan {path}: budget {budget!r} must be a number > 0")
    policy = data.get("gate_policy", "stop")
    if policy not in GATE_POLICIES:
        raise ConfigError(f"plan {path}: gate_policy {policy!r} is not known; accepted: {', '.join(GATE_POLICIES)}")
    teacher = data.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise ConfigError(f"plan {path}: teacher must be a file path; got {teacher!r}")
    workload_name = data.get("workload", "configs/workload.yaml")
    if not isinstance(workload_name, str) or not workload_name:
        raise ConfigError(f"plan {path}: workload must be a file path; got {workload_name!r}")
    workload = resolve_path(workload_name, reader.base)
    if workload is None and strict:
        workload = Path(workload_name)  # loading it says it is missing and how to make one
    elif workload is None:
        reader.notes.append(f"workload {workload_name} not found: the protocol's workload shape assumed (512x384, 20 pairs)")
    return Plan(
        name=name, experiments=experiments, path=path, description=str(data.get("description", "")),
        teacher=(resolve_path(teacher, reader.base) or Path(teacher)) if teacher else None, teacher_name=teacher,
        workload=workload, budget=float(budget), gate_policy=policy, estimates=top,
        gates=_gates(data.get("gates") or {}, path), task=task, budget_set="budget" in data, notes=reader.notes,
    )


def _gates(raw: Any, path: Path) -> dict:
    """Stage -> GateRule: the protocol's thresholds with the plan's overrides."""
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
