"""`pqk budget`: the device-hours and money a plan will cost, before any of it runs.

How the figures are made:

1. **Probe.** Every model a plan trains or runs (the teacher, the student `derive_student` makes
   of it, a pruned copy, ...) is built on this machine, and at each shape the plan uses:
   - one *training step* (forward + backward + AdamW step) at the config's training
     resolution and batch, plus the frozen forward of the teacher where the method has one
     (distillation, QAT's FP32 target): 1 warm-up step, whose FLOPs `torch.utils.flop_counter`
     counts (1 MAC = 2 FLOPs, forward and backward), then `probe_steps` timed steps (median);
   - one *forward pass* (batch 1): evaluation, validation, calibration, sensitivity trials.
   A surrogate loss (the mean of every output map) stands in for the methods' losses: the
   backward pass still spans the whole network, which is what costs.
2. **Count.** Steps per experiment: epochs x steps_per_epoch (epochs x `budget`, as the
   methods scale them) per training run, validation pairs every epoch, calibration pairs,
   sensitivity trials, and one evaluation of the frozen workload (pairs + real pairs + latency
   warm-up/repeats + every pair of the scene-level scenes). A step shared with an earlier
   experiment (K→Q's distillation is K's) is the runner's cache: counted once.
3. **Scale.** `cpu`: the probe's measured seconds themselves. `a100`: FLOPs / (peak x
   utilisation), 312 TFLOP/s bf16 dense at 0.35 by default. `h100`: the A100 time divided by
   1.7..2.2, the user's plan's assumption (document 000), printed as a range.

Upper bounds on purpose: every epoch is counted (early stopping can only save), QAT is counted
although `--qat auto` runs it only when PTQ misses the gate. Not modelled: scene generation,
global alignment's optimisation, ONNX export, kernel-launch overhead (a small model on a GPU
is launch-bound, so its GPU figures are a floor, not an estimate of wall time).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pqk.errors import ConfigError, InputError

if TYPE_CHECKING:  # torch is imported where it is used: a bad --gpu fails before it loads
    import torch
    import torch.nn as nn

GPUS = ("a100", "h100", "cpu")
METHODS = ("distill", "prune", "quantize", "joint")
DEFAULT_RATE_USD_PER_H = 6.88  # the user's plan (document 000): H100 at $6.88/h

# The frozen workload of the protocol when no workload file is found (configs/workload.yaml).
_DEFAULT_WORKLOAD = {"width": 512, "height": 384, "pairs": 20, "real_pairs": 2, "scene_level": 1,
                     "views": 8, "scene_graph": "swin-4", "symmetrize": True}
_LATENCY_PASSES = 3 + 30  # EvalOptions: 3 warm-up + 30 timed pairs
_DEFAULT_CONFIGS = {"distill": "configs/distill.yaml", "prune": "configs/prune.yaml", "quantize": "configs/quant.yaml",
                    "joint": "configs/joint.yaml"}


# --- factors: probe FLOPs -> device time ----------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """How counted FLOPs become device time on a target GPU.

    a100_peak_tflops: A100 tensor-core peak, bf16 dense (NVIDIA's datasheet: 312).
    utilisation: the share of that peak a training loop sustains (model FLOPs utilisation;
    0.35 is typical of transformer training that is not hand-tuned).
    h100_speedup: how much faster an H100 runs the same work (document 000: 1.7 to 2.2x)."""

    a100_peak_tflops: float = 312.0
    utilisation: float = 0.35
    h100_speedup: tuple[float, float] = (1.7, 2.2)

    def __post_init__(self) -> None:
        if not self.a100_peak_tflops > 0 or not math.isfinite(self.a100_peak_tflops):
            raise InputError(f"--peak-tflops {self.a100_peak_tflops!r} is not accepted; expected a number > 0")
        if not 0 < self.utilisation <= 1:
            raise InputError(f"--utilisation {self.utilisation!r} is not accepted; expected a fraction in (0, 1]")
        lo, hi = self.h100_speedup
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise InputError(f"--h100-speedup {lo},{hi} is not accepted; expected LOW,HIGH with 0 < LOW <= HIGH")

    def hours(self, gpu: str, flops: float, cpu_seconds: float) -> tuple[float, float]:
        """(low, high) device-hours of work measured as `flops` / `cpu_seconds` on this machine."""
        if gpu == "cpu":
            return cpu_seconds / 3600.0, cpu_seconds / 3600.0
        a100 = flops / (self.a100_peak_tflops * 1e12 * self.utilisation) / 3600.0
        if gpu == "a100":
            return a100, a100
        lo, hi = self.h100_speedup
        return a100 / hi, a100 / lo

    def to_json(self) -> dict:
        return {"a100_peak_tflops": self.a100_peak_tflops, "utilisation": self.utilisation,
                "h100_speedup": list(self.h100_speedup)}


def check_gpu(gpu: str) -> str:
    key = str(gpu).strip().lower()
    if key not in GPUS:
        raise InputError(f"--gpu {gpu!r} is not known; accepted: {', '.join(GPUS)}")
    return key


def parse_speedup(value: str) -> tuple[float, float]:
    """'1.7,2.2' -> (1.7, 2.2); one number -> (x, x)."""
    try:
        parts = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InputError(f"--h100-speedup {value!r} is not accepted; expected LOW,HIGH, e.g. 1.7,2.2")
    return parts[0], parts[1]


# --- the plan file, read leniently --------------------------------------------------------------


@dataclass
class PlanStep:
    method: str
    config: Path | None  # resolved; None when the file is not there
    config_name: str  # as written in the plan
    options: dict  # every other key of the step (run, rho, ratio, qat, ...)

    def key(self) -> str:
        return json.dumps([self.method, str(self.config or self.config_name), self.options], sort_keys=True, default=str)

    def label(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.options.items())
        return self.method + (f" ({extra})" if extra else "")


@dataclass
class PlanExperiment:
    id: str
    steps: list[PlanStep]
    estimate_h100: tuple[float, float] | None = None
    description: str = ""


@dataclass
class PlanFile:
    name: str
    path: Path
    description: str
    experiments: list[PlanExperiment]
    estimate_total_h100: tuple[float, float] | None
    workload: Path | None
    teacher: str | None
    budget: float | None = None  # the budget `pqk run` uses for this plan
    notes: list[str] = field(default_factory=list)


def _estimate(value: Any) -> tuple[float, float] | None:
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


def resolve_near(name: str | Path, anchor: Path) -> Path | None:
    """A path as written in a plan: absolute, relative to the working folder, or relative to
    any folder above the plan file (a plan copied into runs/<plan>/ still finds configs/)."""
    path = Path(name)
    if path.is_absolute():
        return path if path.exists() else None
    for base in [Path.cwd(), *Path(anchor).resolve().parents]:
        if (base / path).exists():
            return base / path
    return None


def read_plan(path: str | Path) -> PlanFile:
    """The plan YAML (configs/plans/*.yaml): name, experiments with their method steps, and the
    plan document's H100-hour estimates (`estimate_h100_hours: {total: 45, K: 20}` at the top,
    or `estimate_h100_hours: 20` in an experiment)."""
    from pqk.yaml_io import read_yaml

    path = Path(path)
    data = read_yaml(path, "plan", "see configs/plans/minimal.yaml", invalid=ConfigError)
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), list) or not data["experiments"]:
        raise ConfigError(f"plan {path} must be a mapping with a non-empty 'experiments' list")
    top = data.get("estimate_h100_hours")
    top = top if isinstance(top, dict) else ({"total": top} if top is not None else {})
    notes: list[str] = []
    experiments: list[PlanExperiment] = []
    for k, raw in enumerate(data["experiments"]):
        if not isinstance(raw, dict) or not raw.get("id"):
            raise ConfigError(f"plan {path}: experiment {k + 1} needs an 'id' (e.g. id: K)")
        exp_id = str(raw["id"])
        if any(e.id == exp_id for e in experiments):
            raise ConfigError(f"plan {path}: two experiments have the id {exp_id!r}")
        raw_steps = raw.get("steps") or []
        if not isinstance(raw_steps, list):
            raise ConfigError(f"plan {path}: experiment {exp_id}: 'steps' must be a list of {{method: ..., config: ...}}")
        steps = []
        for s in raw_steps:
            if isinstance(s, str):
                s = {"method": s}
            if not isinstance(s, dict) or not s.get("method"):
                raise ConfigError(f"plan {path}: experiment {exp_id}: a step needs a 'method' ({', '.join(METHODS)})")
            options = {str(k2): v for k2, v in s.items() if k2 not in ("method", "config")}
            name = s.get("config") or _DEFAULT_CONFIGS.get(str(s["method"]), f"configs/{s['method']}.yaml")
            steps.append(PlanStep(str(s["method"]), resolve_near(name, path), str(name), options))
        estimate = _estimate(raw.get("estimate_h100_hours", top.get(exp_id)))
        experiments.append(PlanExperiment(exp_id, steps, estimate, str(raw.get("description", ""))))
    workload = data.get("workload")
    workload_path = resolve_near(workload or "configs/workload.yaml", path)
    if workload and workload_path is None:
        notes.append(f"workload {workload} not found: the protocol's workload shape assumed (512x384, 20 pairs)")
    return PlanFile(
        name=str(data.get("name") or path.stem), path=path, description=str(data.get("description", "")),
        experiments=experiments, estimate_total_h100=_estimate(top.get("total")), workload=workload_path,
        teacher=None if data.get("teacher") is None else str(data["teacher"]),
        budget=float(data["budget"]) if isinstance(data.get("budget"), (int, float)) else None, notes=notes,
    )


def _config(step: PlanStep, notes: list[str]) -> dict:
    """The step's config file as a mapping ({} with a note when it is not there yet)."""
    from pqk.yaml_io import read_yaml

    if step.config is None:
        notes.append(f"{step.config_name} not found: {step.method} costed with the trainer's defaults")
        return {}
    data = read_yaml(step.config, f"{step.method} config", invalid=ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{step.method} config {step.config} must be a mapping")
    return data


def _train_spec(mapping: Any, where: str, notes: list[str], budget: float):
    """A TrainSpec from whatever TrainSpec-like mapping a config holds; unknown keys are noted,
    not fatal (the method's own loader is the validator)."""
    from pqk.train.trainer import TrainSpec

    mapping = dict(mapping or {}) if isinstance(mapping, dict) else {}
    known = {f.name for f in fields(TrainSpec)}
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        notes.append(f"{where}: training keys not costed: {', '.join(unknown)}")
    try:
        spec = TrainSpec(**{k: v for k, v in mapping.items() if k in known})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec.scaled(budget) if budget != 1.0 else spec


def _workload_shape(path: Path | None, notes: list[str]) -> dict:
    """Evaluation shape and pass count of the frozen workload (read without loading scenes)."""
    from pqk.data.pairs import make_pair_indices
    from pqk.yaml_io import read_yaml

    shape = dict(_DEFAULT_WORKLOAD)
    if path is None:
        notes.append("no workload file found: the protocol's workload assumed (512x384, 20 pairs, 1 scene of 8 views)")
    else:
        data = read_yaml(path, "workload", invalid=ConfigError) or {}
        src = data.get("data") if isinstance(data.get("data"), dict) else {}
        shape.update(
            width=int(src.get("width", shape["width"])), height=int(src.get("height", shape["height"])),
            pairs=len(data.get("pairs") or []) or int(data.get("n_pairs", shape["pairs"])),
            real_pairs=len(data.get("real_pairs") or []), scene_level=len(data.get("scene_level") or []),
            views=int(src.get("views", shape["views"])), scene_graph=str(data.get("scene_graph", shape["scene_graph"])),
            symmetrize=bool(data.get("symmetrize", True)),
        )
    scene_pairs = len(make_pair_indices(shape["views"], shape["scene_graph"], symmetrize=shape["symmetrize"]))
    shape["passes"] = shape["pairs"] + shape["real_pairs"] + _LATENCY_PASSES + shape["scene_level"] * scene_pairs
    shape["scene_pairs"] = scene_pairs
    return shape


# --- the probe ------------------------------------------------------------------------------


def _views(batch: int, height: int, width: int) -> tuple[dict, dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    shape = torch.tensor([[height, width]] * batch, dtype=torch.int32)
    return ({"img": torch.randn(batch, 3, height, width, generator=gen), "true_shape": shape},
            {"img": torch.randn(batch, 3, height, width, generator=gen), "true_shape": shape.clone()})


def _surrogate_loss(res1: dict, res2: dict) -> torch.Tensor:
    # A scalar of every output map: its backward pass spans the whole network, as the real
    # losses' do (their own arithmetic is negligible next to the network's).
    import torch

    terms = [v.float().mean() for r in (res1, res2) for v in r.values() if torch.is_tensor(v) and v.is_floating_point()]
    return torch.stack(terms).sum()


class Probe:
    """FLOPs and measured seconds of one training step / one forward pass, per (model, shape);
    each probed once. `rows` lists what was measured, for the report."""

    def __init__(self, steps: int = 3, log: Callable[[str], None] | None = None, max_seconds: float = 6.0):
        if steps < 1:
            raise InputError(f"--probe-steps {steps} is not accepted; expected an integer >= 1")
        self.steps = steps
        self.max_seconds = max_seconds  # a slow probe stops timing early (at least one timed step)
        self.log = log or (lambda _m: None)
        self.cache: dict[tuple, tuple[float, float]] = {}
        self.rows: list[dict] = []

    def train_step(self, name: str, model: nn.Module, width: int, height: int, batch: int,
                   target: nn.Module | None = None, target_name: str = "") -> tuple[float, float]:
        """(FLOPs, seconds) of one optimizer step of `model` (+ a frozen forward of `target`)."""
        import torch

        key = ("train", name, width, height, batch, target_name if target is not None else "")
        if key in self.cache:
            return self.cache[key]
        self.log(f"probe: training step of {name} at {width}x{height}, batch {batch}"
                 + (f" (+ {target_name} forward)" if target is not None else ""))
        # A copy: the probe's AdamW steps must not touch the model (a frozen teacher trains here too).
        work = copy.deepcopy(model).train().requires_grad_(True)
        params = list(work.parameters())
        opt = torch.optim.AdamW(params, lr=1e-6)
        v1, v2 = _views(batch, height, width)

        def step() -> None:
            res1, res2 = work(v1, v2)
            if target is not None:
                with torch.no_grad():
                    target(v1, v2)
            loss = _surrogate_loss(res1, res2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        flops, seconds = self._measure(step)
        return self._keep(key, flops, seconds, name=name, kind="train step", width=width, height=height,
                          batch=batch, with_forward_of=target_name if target is not None else None)

    def forward(self, name: str, model: nn.Module, width: int, height: int) -> tuple[float, float]:
        """(FLOPs, seconds) of one batch-1 forward pass (evaluation, validation, calibration)."""
        import torch

        key = ("forward", name, width, height, 1, "")
        if key in self.cache:
            return self.cache[key]
        self.log(f"probe: forward of {name} at {width}x{height}")
        model = model.eval()
        v1, v2 = _views(1, height, width)

        def step() -> None:
            with torch.inference_mode():
                model(v1, v2)

        flops, seconds = self._measure(step)
        return self._keep(key, flops, seconds, name=name, kind="forward", width=width, height=height, batch=1,
                          with_forward_of=None)

    def _measure(self, step: Callable[[], None]) -> tuple[float, float]:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:  # the warm-up step is the counted one (counting slows it down)
            step()
        times: list[float] = []
        while len(times) < self.steps and (not times or sum(times) < self.max_seconds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return float(counter.get_total_flops()), statistics.median(times)

    def _keep(self, key: tuple, flops: float, seconds: float, **row: Any) -> tuple[float, float]:
        self.cache[key] = (flops, seconds)
        self.rows.append({**row, "gflops": round(flops / 1e9, 4), "seconds": round(seconds, 5),
                          "achieved_gflops_per_s": round(flops / 1e9 / seconds, 2) if seconds > 0 else None})
        return flops, seconds


# --- cost models of the methods ---------------------------------------------------------------


@dataclass
class Item:
    """One line of an experiment's bill: `count` repetitions of a probed unit of work."""

    step: str  # "distill K-1", "prune", "quantize", "evaluation"
    what: str
    flops: float = 0.0
    cpu_seconds: float = 0.0
    reused_from: str | None = None  # the runner's step cache: counted in that experiment
    conditional: str | None = None  # when it runs only sometimes (QAT under --qat auto)


@dataclass
class _Model:
    name: str
    module: nn.Module
    ratio: float | None = None  # the distillation ratio it was derived with


class _Costing:
    """Walks a plan's experiments, model by model, and prices each step."""

    def __init__(self, teacher: nn.Module, teacher_name: str, probe: Probe, budget: float, shape: dict, notes: list[str]):
        self.teacher = _Model(teacher_name, teacher)
        self.probe = probe
        self.budget = budget
        self.shape = shape
        self.notes = notes

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def train(self, step: str, label: str, model: _Model, spec, target: _Model | None) -> list[Item]:
        """A training run: steps x train-step probe, plus validation pairs every epoch."""
        flops, secs = self.probe.train_step(model.name, model.module, spec.width, spec.height, spec.batch_size,
                                            target.module if target else None, target.name if target else "")
        n = spec.epochs * spec.steps_per_epoch
        vf, vs = self.probe.forward(model.name, model.module, spec.width, spec.height)
        nv = spec.epochs * spec.val_pairs
        return [
            Item(step, f"{label}: {spec.epochs} epochs x {spec.steps_per_epoch} steps, batch {spec.batch_size} "
                       f"at {spec.width}x{spec.height}" + (f" (+ {target.name} forward)" if target else ""),
                 n * flops, n * secs),
            Item(step, f"{label} validation: {spec.epochs} epochs x {spec.val_pairs} pairs", nv * vf, nv * vs),
        ]

    def forwards(self, step: str, what: str, model: _Model, count: int, width: int, height: int) -> Item:
        f, s = self.probe.forward(model.name, model.module, width, height)
        return Item(step, what, count * f, count * s)

    def evaluation(self, model: _Model, what: str = "evaluation") -> Item:
        sh = self.shape
        return self.forwards(
            "evaluation",
            f"{what}: {sh['passes']} passes at {sh['width']}x{sh['height']} ({sh['pairs']} pairs, {sh['real_pairs']} real, "
            f"{_LATENCY_PASSES} latency, {sh['scene_level']} scene x {sh['scene_pairs']} pairs)",
            model, sh["passes"], sh["width"], sh["height"])

    # -- distill
    def distill(self, step: PlanStep, model: _Model, where: str) -> tuple[list[Item], _Model]:
        from pqk.methods.distill import derive_student

        cfg = _config(step, self.notes)
        shared = cfg.get("train") or {}
        runs_cfg = cfg.get("runs") or {}
        if isinstance(runs_cfg, list):  # a list of {name: K-1, ...} is read as well as a mapping
            runs_cfg = {str(r.get("name") or r.get("id") or f"run{k + 1}"): r for k, r in enumerate(runs_cfg) if isinstance(r, dict)}
        select = cfg.get("select") or {}
        wanted = step.options.get("run", step.options.get("runs"))
        if wanted is None:  # as the runner: the config's first run
            names = list(runs_cfg)[:1] or ["default"]
        else:
            names = []
            for name in (wanted if isinstance(wanted, list) else str(wanted).split(",")):
                name = str(name).strip()
                if name in select:
                    names += [str(m) for m in select[name]]
                elif name in runs_cfg or not runs_cfg:
                    names.append(name)
                else:
                    accepted = ", ".join([*runs_cfg, *select])
                    raise ConfigError(f"{where}: distill run {name!r} is not in {step.config_name}; accepted: {accepted}")
        items: list[Item] = []
        student: _Model | None = None
        for name in dict.fromkeys(names):
            run = runs_cfg.get(name) or {}
            ratio = float(step.options.get("ratio", run.get("ratio", cfg.get("ratio", 0.3))))
            train = {**shared, **(run.get("train") or {})}
            spec = _train_spec(train, f"{where}: {step.config_name} run {name}", self.notes, self.budget)
            if student is None or ratio != student.ratio:
                module = derive_student(model.module, ratio) if ratio > 0 else copy.deepcopy(model.module)
                student = _Model(f"student r={ratio:g} of {model.name}" if ratio > 0 else model.name, module, ratio)
            target = None if run.get("task_only") else self.teacher
            items += self.train(f"distill {name}", f"distill {name}", student, spec, target)
        if len(names) > 1:  # a selection (K-4) measures every run to pick the best
            for name in names[1:]:
                items.append(self.evaluation(student, f"evaluation of run {name} (selection)"))
        return items, student

    # -- prune
    def prune(self, step: PlanStep, model: _Model, where: str) -> tuple[list[Item], _Model]:
        cfg = _config(step, self.notes)
        rhos = step.options.get("rho", cfg.get("rho", 0.3))
        rhos = [float(r) for r in (rhos if isinstance(rhos, list) else [rhos])]
        allocation = str(step.options.get("allocation", cfg.get("allocation", "sensitivity")))
        calib = cfg.get("calibration") or {}
        cw, ch = int(calib.get("width", 512)), int(calib.get("height", 384))
        n_pairs = int(calib.get("n_pairs", 8))
        items: list[Item] = []
        if allocation == "sensitivity":
            ratios = cfg.get("sensitivity_ratios") or [0.25, 0.5, 0.75]
            units = _prunable_unit_count(model.module)
            trials = 1 + units * len(ratios)
            items.append(self.forwards("prune", f"sensitivity: {trials} trials x {n_pairs} pairs at {cw}x{ch}",
                                       model, trials * n_pairs, cw, ch))
        pruned = model
        finetune = cfg.get("finetune")
        if not finetune:
            self._note(f"{where}: {step.config_name} has no 'finetune' settings: no fine-tuning costed")
        for rho in rhos:
            pruned = _Model(f"pruned rho={rho:g} of {model.name}", _pruned_copy(model.module, rho, self.notes))
            if finetune:
                spec = _train_spec(finetune, f"{where}: {step.config_name} finetune", self.notes, self.budget)
                items += self.train("prune", f"fine-tune rho {rho:g}", pruned, spec, None)
        if len(rhos) > 1:
            self._note(f"{where}: prune lists rho {rhos}: the next steps continue from rho {rhos[-1]:g}")
        return items, pruned

    # -- quantize
    def quantize(self, step: PlanStep, model: _Model, where: str) -> tuple[list[Item], _Model]:
        from pqk.methods.quantize import DEFAULT_QAT

        cfg = _config(step, self.notes)
        calib = cfg.get("calibration") or {}
        size = int(step.options.get("calibration_size", step.options.get("calib", calib.get("size", 512))))
        size = max(1, round(size * self.budget)) if self.budget != 1.0 else size
        sh = self.shape
        items = [self.forwards("quantize", f"PTQ calibration: {size} pairs at {sh['width']}x{sh['height']}",
                               model, size, sh["width"], sh["height"])]
        mode = str(step.options.get("qat", "auto"))
        if mode != "never":
            qat = {**DEFAULT_QAT, **(cfg.get("qat") or {})}
            spec = _train_spec(qat.get("train") or DEFAULT_QAT["train"], f"{where}: {step.config_name} qat.train",
                               self.notes, self.budget)
            target = _Model(f"{model.name} (FP32 target)", model.module) if float(qat.get("teacher_weight", 0.5)) > 0 else None
            for item in self.train("quantize", "QAT", model, spec, target):
                if mode == "auto":
                    item.conditional = "QAT runs only when PTQ misses the gate (qat: auto)"
                items.append(item)
        return items, model


    # -- joint PQK
    def joint(self, step: PlanStep, model: _Model, where: str) -> tuple[list[Item], _Model]:
        """One distillation run's training (masks and fake quantization cost nothing extra per
        step) + calibration twice (at fake-quant onset and at export) + the FP32 reference's
        evaluation; the model that leaves is the student pruned by rho."""
        cfg = _config(step, self.notes)
        anchor = step.config or Path(step.config_name)

        def sub(method: str, key: str, default: str, options: dict) -> PlanStep:
            name = str((cfg.get(key) or {}).get("config", default))
            return PlanStep(method, resolve_near(name, anchor), name, options)

        run = step.options.get("run", (cfg.get("distill") or {}).get("run", "K-1"))
        items, student = self.distill(sub("distill", "distill", "distill.yaml", {"run": run}), model, where)
        calib, _ = self.quantize(sub("quantize", "quantize", "quant.yaml", {"qat": "never"}), student, where)
        items = [replace(it, step="joint") for it in items + calib + calib]
        rho = float(step.options.get("rho", (cfg.get("prune") or {}).get("rho", 0.1)))
        pruned = _Model(f"joint rho={rho:g} of {student.name}", _pruned_copy(student.module, rho, self.notes))
        items.append(self.evaluation(pruned, "evaluation of the joint model's FP32 reference"))
        return items, pruned


def _prunable_unit_count(model: nn.Module) -> int:
    try:
        from pqk.methods.prune import prunable_units

        return len(prunable_units(model, True, True))
    except Exception:  # a model the pruner does not know: one head and one FFN unit per block
        return 2 * sum(len(getattr(model, s, [])) for s in ("enc_blocks", "dec_blocks", "dec_blocks2"))


def _pruned_copy(model: nn.Module, rho: float, notes: list[str]) -> nn.Module:
    """The model with `rho` of its prunable parameters removed: L1 importance, uniform
    allocation (the sensitivity allocation removes the same share, so the FLOPs are close)."""
    try:
        from pqk.methods.prune import PruneSpec, allocate_uniform, apply_pruning, importance_scores, prunable_units

        spec = PruneSpec(rho=rho, allocation="uniform")
        # Torch-Pruning traces the graph through autograd: a frozen teacher has to thaw first.
        model = copy.deepcopy(model).requires_grad_(True)
        units = prunable_units(model, True, True)
        counts = allocate_uniform(units, rho, spec)
        return apply_pruning(model, units, importance_scores(model, units, "l1"), counts).eval().requires_grad_(False)
    except Exception as exc:  # never fail an estimate on this: the unpruned model is an upper bound
        note = f"could not build a pruned copy ({type(exc).__name__}): pruned steps costed on the unpruned model"
        if note not in notes:
            notes.append(note)
        return model


# --- the estimate -----------------------------------------------------------------------------


def _load_teacher(teacher: Any, plan: PlanFile, notes: list[str]) -> tuple[nn.Module, str]:
    import torch.nn as nn

    from pqk.assets import default_checkpoint
    from pqk.models.dust3r import count_parameters, load_checkpoint

    if isinstance(teacher, nn.Module):
        module, name = copy.deepcopy(teacher), "teacher"
    else:
        path = teacher or (resolve_near(plan.teacher, plan.path) if plan.teacher else None)
        if teacher is None and plan.teacher and path is None:
            raise InputError(f"plan teacher {plan.teacher} does not exist; pass --teacher")
        if path is None:
            path, _ = default_checkpoint()
            notes.append("teacher: the bundled 5.2M-parameter DUSt3R (pass --teacher for the official ViT-Large, "
                         "which the plan document's estimates are for)")
        if not Path(path).exists():
            raise InputError(f"--teacher {path} does not exist")
        module, name = load_checkpoint(path, device="cpu"), "teacher"
    module.eval().requires_grad_(False)
    return module, f"{name} ({count_parameters(module) / 1e6:.2f}M params)"


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (hours of a small model are millionths)."""
    return 0.0 if x == 0 or not math.isfinite(x) else round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _pair(lo: float, hi: float) -> list[float]:
    return [_sig(lo), _sig(hi)]


def estimate_plan(
    plan_path: str | Path,
    gpu: str = "h100",
    rate: float = DEFAULT_RATE_USD_PER_H,
    budget: float = 1.0,
    *,
    teacher: str | Path | nn.Module | None = None,
    factors: Factors | None = None,
    probe_steps: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Device-hours and USD of every experiment of a plan on `gpu`, from a probe on this machine.

    Returns a JSON-ready dict: `experiments` (id, items with their hours/usd as [low, high],
    totals, the plan document's H100 estimate), `total`, `probe` (what was measured), `factors`
    and `notes`. `teacher`: a checkpoint path or a module (default: the plan's, else the bundled
    one)."""
    import torch

    gpu = check_gpu(gpu)
    if not isinstance(rate, (int, float)) or rate < 0 or not math.isfinite(rate):
        raise InputError(f"--rate {rate!r} is not accepted; expected USD per hour >= 0")
    if not isinstance(budget, (int, float)) or not budget > 0 or not math.isfinite(budget):
        raise InputError(f"--budget {budget!r} is not accepted; expected a number > 0")
    factors = factors or Factors()
    plan = read_plan(plan_path)
    notes = list(plan.notes)
    if plan.budget is not None and plan.budget != budget:
        notes.append(f"the plan sets budget {plan.budget:g} (what pqk run uses); this estimate is at budget {budget:g}")
    say = log or (lambda _m: None)
    module, teacher_desc = _load_teacher(teacher, plan, notes)
    shape = _workload_shape(plan.workload, notes)
    probe = Probe(probe_steps, say)
    costing = _Costing(module, "teacher", probe, float(budget), shape, notes)
    started = time.perf_counter()

    # The runner's step cache: a chain of steps already paid for by an earlier experiment is
    # reused, so the plan pays for it once ("hours"); "hours_with_shared" counts it again, as the
    # experiment's record does (its gpu_hours include every step it needed).
    done: dict[str, tuple[str, _Model, list[Item]]] = {}
    experiments = []
    for exp in plan.experiments:
        items: list[Item] = []
        model = costing.teacher
        chain: list[str] = []
        for k, step in enumerate(exp.steps):
            chain.append(step.key())
            key = "|".join(chain)
            if key in done:
                paid_by, model, paid = done[key]
                items += [replace(it, what=f"{it.what} (cached from {paid_by})", reused_from=paid_by) for it in paid]
                continue
            where = f"experiment {exp.id}, step {k + 1}"
            if step.method not in METHODS:
                costing._note(f"{where}: no cost model for method {step.method!r} (known: {', '.join(METHODS)}); not counted")
                new_items = [Item(step.method, f"{step.label()}: not costed")]
            else:
                new_items, model = getattr(costing, step.method)(step, model, where)
            items += new_items
            done[key] = (exp.id, model, new_items)
        items.append(costing.evaluation(model))
        experiments.append(_priced(exp, items, gpu, rate, factors))

    doc_total = plan.estimate_total_h100
    if doc_total is None and all(e.estimate_h100 for e in plan.experiments):
        doc_total = (sum(e.estimate_h100[0] for e in plan.experiments), sum(e.estimate_h100[1] for e in plan.experiments))
    result = {
        "plan": plan.name,
        "plan_file": str(plan.path),
        "description": plan.description,
        "gpu": gpu,
        "rate_usd_per_h": float(rate),
        "budget": float(budget),
        "factors": factors.to_json(),
        "probe": {"device": "cpu", "threads": torch.get_num_threads(), "steps": probe.steps, "teacher": teacher_desc,
                  "workload": {k: shape[k] for k in ("width", "height", "passes")},
                  "wall_s": round(time.perf_counter() - started, 1), "measured": probe.rows},
        "experiments": experiments,
        "total": {"plan_estimate_h100_hours": list(doc_total) if doc_total else None},
        "notes": notes,
    }
    _total(result)
    return result


def _priced(exp: PlanExperiment, items: list[Item], gpu: str, rate: float, factors: Factors) -> dict:
    rows = [{"step": it.step, "what": it.what, "flops": it.flops, "gflops": round(it.flops / 1e9, 3),
             "cpu_seconds": _sig(it.cpu_seconds, 6), "reused_from": it.reused_from, "conditional": it.conditional}
            for it in items]
    exp_row = {"id": exp.id, "steps": " -> ".join(s.label() for s in exp.steps) or "(teacher measured)", "items": rows,
               "plan_estimate_h100_hours": list(exp.estimate_h100) if exp.estimate_h100 else None}
    _price_experiment(exp_row, gpu, rate, factors)
    return exp_row


def _price_experiment(exp: dict, gpu: str, rate: float, factors: Factors) -> None:
    """Fill hours / usd of an experiment's items and its totals from their FLOPs and seconds."""
    for row in exp["items"]:
        lo, hi = factors.hours(gpu, row["flops"], row["cpu_seconds"])
        row["hours"], row["usd"] = _pair(lo, hi), _pair(lo * rate, hi * rate)
    own = [factors.hours(gpu, r["flops"], r["cpu_seconds"]) for r in exp["items"] if not r["reused_from"]]
    every = [factors.hours(gpu, r["flops"], r["cpu_seconds"]) for r in exp["items"]]
    lo, hi = sum(h[0] for h in own), sum(h[1] for h in own)
    exp["hours"], exp["usd"] = _pair(lo, hi), _pair(lo * rate, hi * rate)
    exp["hours_with_shared"] = _pair(sum(h[0] for h in every), sum(h[1] for h in every))
    exp["_exact"] = (lo, hi)


def reprice(result: dict, gpu: str, rate: float | None = None, factors: Factors | None = None) -> dict:
    """The same estimate on another device / price, without probing again: every item keeps the
    FLOPs and measured seconds it was priced from."""
    gpu = check_gpu(gpu)
    rate = result["rate_usd_per_h"] if rate is None else float(rate)
    if factors is None:
        f = result["factors"]
        factors = Factors(f["a100_peak_tflops"], f["utilisation"], tuple(f["h100_speedup"]))
    out = copy.deepcopy(result)
    out.update(gpu=gpu, rate_usd_per_h=rate, factors=factors.to_json())
    for exp in out["experiments"]:
        _price_experiment(exp, gpu, rate, factors)
    _total(out)
    return out


def _total(result: dict) -> None:
    # Totals from the unrounded sums, so they add up to the experiments' figures.
    exact = [e.pop("_exact", tuple(e["hours"])) for e in result["experiments"]]
    lo, hi = sum(x[0] for x in exact), sum(x[1] for x in exact)
    rate = result["rate_usd_per_h"]
    result["total"].update(hours=_pair(lo, hi), usd=_pair(lo * rate, hi * rate))


def format_range(pair: list[float] | tuple[float, float] | None, digits: int = 3, unit: str = "") -> str:
    """[a, b] -> 'a–b' (or 'a' when equal), in significant digits; None -> '—'."""
    if not pair:
        return "—"
    lo, hi = pair

    def f(x: float) -> str:
        if x == 0:
            return "0"
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"

    text = f(lo) if math.isclose(lo, hi, rel_tol=1e-9, abs_tol=0.0) else f"{f(lo)}–{f(hi)}"
    return f"{unit}{text}"


# --- printing ---------------------------------------------------------------------------------


def human_hours(hours: float) -> str:
    """Device time in the unit a reader takes in at a glance: s, min or h."""
    seconds = hours * 3600.0
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{hours:,.1f} h" if hours >= 100 else f"{hours:.3g} h"


def human_range(pair: list[float] | None) -> str:
    if not pair:
        return "—"
    lo, hi = pair
    return human_hours(lo) if math.isclose(lo, hi, rel_tol=1e-9) else f"{human_hours(lo)} – {human_hours(hi)}"


def usd_range(pair: list[float] | None) -> str:
    if not pair:
        return "—"

    def f(x: float) -> str:
        return f"${x:,.0f}" if x >= 100 else (f"${x:.2f}" if x >= 0.01 else f"${x:.2g}")

    lo, hi = pair
    return f(lo) if math.isclose(lo, hi, rel_tol=1e-9) else f"{f(lo)} – {f(hi)}"


def gpu_label(result: dict) -> str:
    f = result["factors"]
    if result["gpu"] == "cpu":
        return f"this CPU ({result['probe']['threads']} threads, measured)"
    a100 = f"A100 {f['a100_peak_tflops']:g} TFLOP/s x {f['utilisation']:g}"
    if result["gpu"] == "a100":
        return a100
    lo, hi = f["h100_speedup"]
    return f"H100 = A100 time / {hi:g}..{lo:g} ({a100})"


def estimate_table(result: dict):
    """The estimate as a rich Table: one bold row per experiment, its work items beneath."""
    from rich.table import Table

    doc = any(e["plan_estimate_h100_hours"] for e in result["experiments"]) or result["total"]["plan_estimate_h100_hours"]
    table = Table(title=f"plan {result['plan']}: {gpu_label(result)}, ${result['rate_usd_per_h']:g}/h, budget {result['budget']:g}")
    table.add_column("experiment", style="bold")
    table.add_column("work")
    table.add_column("GFLOP", justify="right")
    table.add_column("device time", justify="right")
    table.add_column("USD", justify="right")
    if doc:
        table.add_column("plan doc (H100)", justify="right")
    for exp in result["experiments"]:
        gflops = sum(i["gflops"] for i in exp["items"] if not i["reused_from"])
        row = [exp["id"], exp["steps"], f"{gflops:,.0f}", human_range(exp["hours"]), usd_range(exp["usd"])]
        if doc:
            row.append(format_range(exp["plan_estimate_h100_hours"], unit="") + (" h" if exp["plan_estimate_h100_hours"] else ""))
        table.add_row(*row, style="bold")
        for item in exp["items"]:
            what = item["what"] + (" *" if item["conditional"] else "")
            cells = ["", f"  {what}", f"{item['gflops']:,.1f}", human_range(item["hours"]), usd_range(item["usd"])]
            table.add_row(*cells, *([""] if doc else []), style="dim italic" if item["reused_from"] else "dim")
    total = result["total"]
    gflops = sum(i["gflops"] for e in result["experiments"] for i in e["items"] if not i["reused_from"])
    row = ["total", "cached steps counted once", f"{gflops:,.0f}", human_range(total["hours"]), usd_range(total["usd"])]
    if doc:
        est = total["plan_estimate_h100_hours"]
        row.append((format_range(est) + " h") if est else "—")
    table.add_section()
    table.add_row(*row, style="bold")
    return table


def footer_lines(result: dict) -> list[str]:
    probe = result["probe"]
    lines = [f"probe: {len(probe['measured'])} measurements of {probe['teacher']} and its derived models on this CPU "
             f"({probe['threads']} threads, {probe['steps']} timed steps after 1 warm-up) in {probe['wall_s']:g} s"]
    if any(i["conditional"] for e in result["experiments"] for i in e["items"]):
        lines.append("* counted as an upper bound: QAT runs only when PTQ misses the gate (qat: auto)")
    if result["gpu"] != "cpu":
        lines.append("GPU time = counted FLOPs / (peak x utilisation): a floor for small models, which are launch-bound")
    return lines + [f"note: {n}" for n in result["notes"]]


__all__ = ["Factors", "GPUS", "METHODS", "Probe", "check_gpu", "estimate_plan", "estimate_table", "format_range",
           "parse_speedup", "read_plan", "reprice", "resolve_near"]
