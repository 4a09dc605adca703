"""The method seam: what every lightweighting method is to the rest of pqk.

A method (distillation, pruning, quantization, joint PQK, and whatever comes next) is one
subclass of `Method` registered by name (`pqk.methods.register`). It declares its combo
letter, the options a plan step may set, its default config, whether it trains or quantizes,
and implements: reading its typed spec, `run(model, ctx, spec) -> StepResult`, the key
parameters of its exp_id, its stage gate and reference, its cost for `pqk budget`, and how a
finished step is rebuilt from the runner's cache. The runner, plan validation, the budget and
the report ask the registry and nothing else, so a new method is one new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pqk.errors import ConfigError

if TYPE_CHECKING:
    from pqk.tasks.base import Task


@dataclass
class StepContext:
    teacher: torch.nn.Module  # the FP32 reference (P0 teacher): distillation target, gate reference
    workload: Any  # the frozen evaluation workload (never trained or calibrated on)
    out_dir: Path  # this step's folder: checkpoints, logs, artifacts
    device: str = "cpu"
    budget: float = 1.0  # multiplies epochs / steps / calibration size (embedded default < 1)
    seed: int = 42
    resume: bool = True  # continue from the step's own last checkpoint when present
    log: Callable[[str], None] = print
    task: Task | None = None  # the model family (None: DUSt3R)
    max_quality_drop: float = 0.01  # the step's gate threshold, for decisions taken on held-out data

    @property
    def family(self) -> Task:
        from pqk.tasks import get_task

        return self.task or get_task()


@dataclass
class StepResult:
    model: torch.nn.Module | None  # the PyTorch model after the step (None: only an ONNX artifact)
    artifact: Path | None  # the saved model file whose size is reported
    fields: dict = field(default_factory=dict)  # record slice: rho, T, beta, gamma, bits_w, bits_a, keep_list
    device_hours: float = 0.0  # wall time the step spent on its device
    backend: str = "torch"  # how `evaluate` should run the artifact
    onnx_path: Path | None = None  # the deployed ONNX model, for backend "onnxruntime"
    notes: list[str] = field(default_factory=list)
    count_model: torch.nn.Module | None = None  # float model counted for params/FLOPs (quantized steps)
    runtime: str | None = None  # names a non-default torch runtime for the record (e.g. oneDNN INT8)
    details: dict = field(default_factory=dict)  # method-specific figures for the eval JSON
    # p50 reduction against the entering model's eager FP32, timed side by side in one process
    # (a quantizing step measures it): the latency gate reads this instead of two records' p50s.
    latency_cut: float | None = None
    latency_contended: bool = False  # that timing ran while other processes took the cores: not a verdict
    # Other results the step produced that a command may measure too, by exp_id tag (e.g.
    # "PTQ_onednn", "QAT_ort": every runtime of PTQ and of QAT); the result itself is the primary.
    variants: dict[str, "StepResult"] = field(default_factory=dict)
    float_model: Path | None = None  # a quantized step's float weights when they differ from its input's
    # Figures the step adds beside the evaluation's own in the eval JSON's details (e.g. pruning's
    # ONNX check); everything else the method reports goes under details["step"].
    eval_details: dict = field(default_factory=dict)


class Method(ABC):
    """One lightweighting method. Subclasses set the class attributes and implement the
    abstract methods; `register` makes them known to plans, the runner and the budget."""

    name: ClassVar[str]  # the plan's `method:` value
    letter: ClassVar[str]  # its letter(s) in an experiment's combo (K, P, Q, PQK)
    options: ClassVar[frozenset[str]] = frozenset()  # what a plan step may set beside method/config
    default_config: ClassVar[str]  # used when a step names no config
    trains: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False  # its output is a deployed INT8 artifact: nothing can follow it
    only_step: ClassVar[str | None] = None  # why it must be an experiment's only step (None: it need not be)
    families: ClassVar[tuple[str, ...]] = ("dust3r",)

    # -- what a plan step means -------------------------------------------------------------------
    @abstractmethod
    def load_spec(self, config: Path, options: Mapping[str, Any]) -> Any:
        """The step's typed spec: its config file with the step's options applied (validated:
        ConfigError/InputError name the bad value)."""

    def config_files(self, config: Path, data: Any) -> dict[str, Path]:
        """Other config files the step's result depends on (their content joins its cache key)."""
        return {}

    def check(self, spec: Any, options: Mapping[str, Any]) -> None:
        """Further validation of a loaded spec before any step of the plan runs."""

    def must_be_last(self, spec: Any) -> str | None:
        """Why a step with this spec must be its experiment's last (None: others may follow).
        By default: a quantizing method's output is a deployed INT8 artifact."""
        return "quantize must come last" if self.quantizes else None

    # -- running it -------------------------------------------------------------------------------
    @abstractmethod
    def run(self, model: torch.nn.Module, ctx: StepContext, spec: Any) -> StepResult:
        """Apply the method to `model` (the step's own copy) and save what it made in ctx.out_dir."""

    def restore(self, done: Mapping[str, Any], entering: torch.nn.Module, task: Task) -> StepResult:
        """The result of a finished step, rebuilt from what `done` (its saved summary) names."""
        return StepResult(model=task.load_model(done["artifact"]), **restore_common(done))

    # -- naming, gating, costing ---------------------------------------------------------------------
    @abstractmethod
    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        """The key-parameter part of an exp_id (K1, r030, PTQ_keepSMAS, ...)."""

    def stage(self, alone: bool) -> str:
        """The protocol stage whose gate an experiment ending in this step passes
        (`alone`: the step is the experiment's only one)."""
        return "P1"

    def reference(self, alone: bool) -> str:
        """What the gate compares with: "teacher" (P0), "input" (the FP32 model the step
        received) or "own_float" (the step's own float model, `StepResult.count_model`)."""
        return "teacher"

    def cost(self, costing: Any, step: Any, model: Any, where: str) -> tuple[list, Any]:
        """Bill of work items for `pqk budget` and the model that leaves the step (see
        `pqk.measure.probe.Costing`)."""
        costing.note(f"{where}: no cost model for method {self.name!r}; not counted")
        return [], model


def restore_common(done: Mapping[str, Any]) -> dict:
    """The StepResult fields every method's saved summary holds (for `Method.restore`)."""
    return dict(artifact=Path(done["artifact"]), fields=done["fields"], device_hours=done["device_hours"],
                notes=list(done["notes"]), details=done["details"], runtime=done.get("runtime"),
                latency_cut=done.get("latency_cut"), latency_contended=bool(done.get("latency_contended")),
                eval_details=done.get("eval_details") or {})


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A step's own copy of its input: steps may change a model in place, and distillation
    freezes the teacher's parameters (a frozen model is invisible to pruning's dependency
    graph, which follows autograd)."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


# --- the registry ---------------------------------------------------------------------------------

# name -> family -> method: a plan's `method: distill` means the distillation of the plan's family
# (DUSt3R's knows its decoder and heads, CLIP's its two towers), so one name serves every family.
_METHODS: dict[str, dict[str, Method]] = {}
DEFAULT_FAMILY = "dust3r"


def register(method: type[Method] | Method) -> type[Method] | Method:
    """Make a method known to plans, the runner and the budget by its name, for each family it
    declares (usable as a class decorator). Registering a name again for a family replaces the
    earlier method."""
    cls = method if isinstance(method, type) else type(method)
    for attr in ("name", "letter", "default_config"):
        if not getattr(cls, attr, None):
            raise ConfigError(f"method {cls.__name__} must set {attr!r}")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"method {cls.__name__} must implement {', '.join(sorted(cls.__abstractmethods__))}")
    instance = method() if isinstance(method, type) else method
    for family in instance.families:
        _METHODS.setdefault(instance.name, {})[family] = instance
    return method


def unregister(name: str, family: str | None = None) -> None:
    """Forget method `name` (for one family, or for all)."""
    if family is None:
        _METHODS.pop(name, None)
    else:
        _METHODS.get(name, {}).pop(family, None)
        if not _METHODS.get(name, True):
            _METHODS.pop(name, None)


def _load_builtins() -> None:
    from pqk.methods import builtin  # noqa: F401 (registers distill, prune, quantize, joint)


def get_method(name: str, family: str | None = None) -> Method:
    """The registered method `name` for model family `family` (default DUSt3R); one-line error
    naming the accepted ones."""
    _load_builtins()
    family = family or DEFAULT_FAMILY
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; accepted: {', '.join(method_names(family))}")
    if family not in _METHODS[name]:
        raise ConfigError(f"method {name!r} has no implementation for the {family} family; accepted for {family}: "
                          f"{', '.join(method_names(family)) or 'none'}")
    return _METHODS[name][family]


def method_names(family: str | None = None) -> list[str]:
    """Registered method names (those implemented for `family` when one is given), sorted: the
    order modules happened to be imported in must not change an error message."""
    _load_builtins()
    return sorted(n for n, impls in _METHODS.items() if family is None or family in impls)
