"""What a unit of work costs on this machine, for `pqk budget`: a probe that runs one training
step and one forward pass of every model a plan would train or run (FLOPs counted, seconds
measured), and the `Costing` toolkit a method's `cost` uses to turn its config into a bill of
work items (training runs, forward passes, one evaluation of the frozen workload).

The probe's inputs come from the model family's adapter (`Task.example_input`), and its loss is
a surrogate: the mean of every floating output tensor, whose backward pass spans the whole
network as the methods' real losses do (their own arithmetic is negligible next to it).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pqk.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from pqk.tasks.base import Task


def surrogate_loss(outputs: Any) -> torch.Tensor:
    """A scalar of every floating tensor in `outputs` (nested tuples, lists and dicts)."""
    import torch

    terms: list = []

    def walk(value: Any) -> None:
        if torch.is_tensor(value) and value.is_floating_point():
            terms.append(value.float().mean())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(outputs)
    return torch.stack(terms).sum()


class Probe:
    """FLOPs and measured seconds of one training step / one forward pass, per (model, shape);
    each probed once. `rows` lists what was measured, for the report."""

    def __init__(self, task: Task, steps: int = 3, log: Callable[[str], None] | None = None, max_seconds: float = 6.0):
        if steps < 1:
            raise InputError(f"--probe-steps {steps} is not accepted; expected an integer >= 1")
        self.task = task
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
        inputs = self.task.example_input(batch, height, width)

        def step() -> None:
            outputs = work(*inputs)
            if target is not None:
                with torch.no_grad():
                    target(*inputs)
            loss = surrogate_loss(outputs)
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
        inputs = self.task.example_input(1, height, width)

        def step() -> None:
            with torch.inference_mode():
                model(*inputs)

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
class CostModel:
    """A model as the budget walks a plan: what it is called in the bill, and the module."""

    name: str
    module: nn.Module
    ratio: float | None = None  # the distillation ratio it was derived with


class Costing:
    """What a method's `cost` prices its work with: the probe, the plan's budget, the teacher
    (distillation and QAT targets), the shape of one evaluation and the estimate's notes."""

    def __init__(self, teacher: nn.Module, teacher_name: str, probe: Probe, budget: float, shape: dict, notes: list[str]):
        self.teacher = CostModel(teacher_name, teacher)
        self.probe = probe
        self.budget = budget
        self.shape = shape  # the task's evaluation shape: width, height, passes, what (a description)
        self.notes = notes
        self.once: set = set()  # work a plan pays for once whichever experiment meets it first (shared targets)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def train(self, step: str, label: str, model: CostModel, spec, target: CostModel | None) -> list[Item]:
        """A training run: steps x train-step probe per resolution stage, plus validation pairs
        every epoch."""
        total = spec.epochs * spec.steps_per_epoch
        stages = spec.stages()
        items = []
        for k, (start, width, height, batch) in enumerate(stages):
            end = stages[k + 1][0] if k + 1 < len(stages) else 1.0
            # The steps whose progress (step / total) falls in [start, end).
            n = math.ceil(end * total) - math.ceil(start * total)
            if n <= 0:
                continue
            flops, secs = self.probe.train_step(model.name, model.module, width, height, batch,
                                                target.module if target else None, target.name if target else "")
            what = f"{spec.epochs} epochs x {spec.steps_per_epoch} steps" if len(stages) == 1 else f"{n} of {total} steps"
            items.append(Item(step, f"{label}: {what}, batch {batch} at {width}x{height}"
                                    + (f" (+ {target.name} forward)" if target else ""), n * flops, n * secs))
        val_width, val_height = spec.val_size()
        vf, vs = self.probe.forward(model.name, model.module, val_width, val_height)
        nv = spec.epochs * spec.val_pairs
        items.append(Item(step, f"{label} validation: {spec.epochs} epochs x {spec.val_pairs} pairs"
                                + (f" at {val_width}x{val_height}" if len(stages) > 1 else ""), nv * vf, nv * vs))
        return items

    def forwards(self, step: str, what: str, model: CostModel, count: int, width: int, height: int) -> Item:
        f, s = self.probe.forward(model.name, model.module, width, height)
        return Item(step, what, count * f, count * s)

    def evaluation(self, model: CostModel, what: str = "evaluation") -> Item:
        sh = self.shape
        return self.forwards("evaluation", f"{what}: {sh['passes']} passes at {sh['width']}x{sh['height']} ({sh['what']})",
                             model, sh["passes"], sh["width"], sh["height"])

    def config(self, step: Any) -> dict:
        """The step's config file as a mapping ({} with a note when it is not there yet)."""
        from pqk.yaml_io import read_yaml

        if step.config is None or not Path(step.config).is_file():
            self.note(f"{step.config_name} not found: {step.method} costed with the trainer's defaults")
            return {}
        data = read_yaml(step.config, f"{step.method} config", invalid=ConfigError)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{step.method} config {step.config} must be a mapping")
        return data

    def train_spec(self, mapping: Any, where: str):
        """A TrainSpec from whatever TrainSpec-like mapping a config holds, scaled by the budget;
        unknown keys are noted, not fatal (the method's own loader is the validator)."""
        from pqk.train.trainer import TrainSpec

        mapping = dict(mapping or {}) if isinstance(mapping, dict) else {}
        known = {f.name for f in fields(TrainSpec)}
        unknown = sorted(str(k) for k in mapping if k not in known)
        if unknown:
            self.note(f"{where}: training keys not costed: {', '.join(unknown)}")
        try:
            spec = TrainSpec(**{k: v for k, v in mapping.items() if k in known})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return spec.scaled(self.budget) if self.budget != 1.0 else spec

