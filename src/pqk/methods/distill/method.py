"""K as a registered method: a distillation run of the grid config, named by its run, costed
for `pqk budget` (every epoch counted: early stopping can only save)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.measure.probe import CostModel, Costing, Item
from pqk.methods.base import Method, StepContext, StepResult, register


@register
class Distill(Method):
    name = "distill"
    letter = "K"
    options = frozenset({"run", "gamma"})  # a run of the distillation config (K-1, ..., control); gamma overrides its γ
    default_config = "configs/distill.yaml"
    trains = True

    def load_spec(self, config: Path, options: Mapping[str, Any]):
        from pqk.methods.distill import load_distill_config

        grid = load_distill_config(config)
        run = options.get("run") or next(iter(grid.runs))
        if run not in grid.runs:
            raise ConfigError(f"distillation run {run!r} is not in {config}; accepted: {', '.join(grid.runs)}")
        spec = grid.runs[run]
        if "gamma" in options:  # ABL-3: the same run with feature distillation
            gamma = options["gamma"]
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
                raise ConfigError(f"gamma {gamma!r} is not accepted; expected a number >= 0")
            spec = replace(spec, gamma=float(gamma))
        return spec

    def run(self, model: torch.nn.Module, ctx: StepContext, spec) -> StepResult:
        from pqk.methods.distill import distill_step

        return distill_step(model, ctx, spec)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        run = str(options.get("run", "K-1"))
        tag = run.replace("-", "").replace("_", "") if run != "control" else "taskonly"
        if "gamma" in options:
            tag += f"G{float(options['gamma']):g}".replace(".", "")
        return tag

    def cost(self, costing, step, model, where: str):
        return distill_cost(costing, step, model, where)


def _run_names(step, cfg: dict, runs_cfg: dict, where: str) -> list[str]:
    """The distillation runs a step trains: its `run`, a selection's members (K-4), or the first."""
    select = cfg.get("select") or {}
    wanted = step.options.get("run", step.options.get("runs"))
    if wanted is None:  # as the runner: the config's first run
        return list(runs_cfg)[:1] or ["default"]
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
    return names


def distill_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.methods.distill import derive_student

    cfg = costing.config(step)
    shared = cfg.get("train") or {}
    runs_cfg = cfg.get("runs") or {}
    if isinstance(runs_cfg, list):  # a list of {name: K-1, ...} is read as well as a mapping
        runs_cfg = {str(r.get("name") or r.get("id") or f"run{k + 1}"): r for k, r in enumerate(runs_cfg) if isinstance(r, dict)}
    names = _run_names(step, cfg, runs_cfg, where)
    items: list[Item] = []
    student: CostModel | None = None
    for name in dict.fromkeys(names):
        run = runs_cfg.get(name) or {}
        ratio = float(step.options.get("ratio", run.get("ratio", cfg.get("ratio", 0.3))))
        train = {**shared, **(run.get("train") or {})}
        spec = costing.train_spec(train, f"{where}: {step.config_name} run {name}")
        if student is None or ratio != student.ratio:
            module = derive_student(model.module, ratio) if ratio > 0 else copy.deepcopy(model.module)
            student = CostModel(f"student r={ratio:g} of {model.name}" if ratio > 0 else model.name, module, ratio)
        target = None if run.get("task_only") else costing.teacher
        items += costing.train(f"distill {name}", f"distill {name}", student, spec, target)
    if len(names) > 1:  # a selection (K-4) measures every run to pick the best
        for name in names[1:]:
            items.append(costing.evaluation(student, f"evaluation of run {name} (selection)"))
    return items, student
