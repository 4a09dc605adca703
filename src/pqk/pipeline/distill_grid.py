"""Stage P1 end to end (what `pqk distill` runs): the teacher's record on the workload, then
for each run of the grid the K step (`distill_step`), `evaluate`, the P1 gate against the
teacher and the record (`pqk.pipeline.experiment`); then K-4, the best run by the main metric,
copied to `student_fp32_best.safetensors`.

Layout of `out_dir` (flat records, as `pqk prune` and `pqk quantize`):
    teacher_eval.json, <exp_id>_eval.json, result_table.csv, student_fp32_best.safetensors, K-4_select.json
    <exp_id>/  student.safetensors, best.pth, last.pth, distill_log.json
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pqk.errors import InputError
from pqk.methods.distill import BEST_STUDENT_FILE, STUDENT_FILE, DistillGrid, distill_step
from pqk.pipeline.evaluate import EvalOptions
from pqk.pipeline.experiment import measure_step, teacher_reference, write_evaluation
from pqk.pipeline.gates import DEFAULT_MAIN_METRIC, HIGHER_IS_BETTER, record_from_row
from pqk.pipeline.record import Record, write_json
from pqk.methods.base import StepContext
from pqk.pipeline.workload import Workload


@dataclass
class GridOutcome:
    teacher: Record
    records: dict[str, Record] = field(default_factory=dict)  # run name -> record
    gates: dict[str, dict] = field(default_factory=dict)  # run name -> gate JSON
    selected: dict[str, str] = field(default_factory=dict)  # selection name -> chosen run
    reused: list[str] = field(default_factory=list)  # runs whose record was already there


def parse_runs(text: str | None, grid: DistillGrid) -> list[str]:
    """--runs "K-1,control" -> names in the given order; None -> every run, then selections."""
    accepted = list(grid.runs) + list(grid.select)
    if text is None:
        return accepted
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError(f"--runs is empty; accepted: {', '.join(accepted)}")
    for n in names:
        if n not in accepted:
            raise InputError(f"--runs names {n!r}, which is not in the config; accepted: {', '.join(accepted)}")
    return names


def run_distill_grid(
    grid: DistillGrid,
    names: list[str],
    teacher: torch.nn.Module,
    teacher_path: Path,
    workload: Workload,
    scenes: dict,
    out_dir: Path,
    *,
    budget: float,
    resume: bool = True,
    device: str = "cpu",
    options: EvalOptions | None = None,
    log: Callable[[str], None] = print,
    status: Callable[[str], None] | None = None,
    rank: int = 0,
) -> GridOutcome | None:
    """Train, measure and record the named runs and selections. Ranks > 0 of a distributed run
    only train (they return None); rank 0 measures and writes."""
    options = options or EvalOptions()
    say = status or log
    main = rank == 0
    outcome = None
    if main:
        ctx = StepContext(teacher=teacher, workload=workload, out_dir=out_dir, device=device, budget=budget, log=log)
        say("the teacher's record (measured once per output folder)")
        outcome = GridOutcome(teacher=teacher_reference(teacher, ctx, artifact=teacher_path, options=options,
                                                        scenes=scenes, progress=say))
    for name in names:
        if name in grid.select:
            continue
        spec, exp = grid.runs[name], grid.exp_id(name)
        run_dir, eval_path = out_dir / exp, out_dir / f"{exp}_eval.json"
        if resume and eval_path.is_file() and (run_dir / STUDENT_FILE).is_file():
            if main:
                payload = json.loads(eval_path.read_text())
                outcome.records[name] = record_from_row(payload["record"])
                outcome.gates[name] = payload["details"].get("gate") or {}
                outcome.reused.append(name)
                log(f"{name} ({exp}): already trained and measured ({eval_path}); kept (--no-resume redoes it)")
            continue
        what = "L_task only (control)" if spec.task_only else f"T={spec.T:g} beta={spec.beta:g} gamma={spec.gamma:g}"
        log(f"{name} ({exp}): {what}; budget {budget:g} -> {spec.train.scaled(budget).epochs} epochs")
        ctx = StepContext(teacher=teacher, workload=workload, out_dir=run_dir, device=device, budget=budget,
                          seed=spec.train.seed, resume=resume, log=log)
        step = distill_step(teacher, ctx, spec)
        if not main:
            continue
        say(f"{name}: evaluating {exp}")
        evaluation, gate = measure_step(step, ctx, exp_id=exp, combo="K", stage="P1", reference=outcome.teacher,
                                        options=options, scenes=scenes, progress=say)
        write_evaluation(evaluation, out_dir, extra={"run": name, "model": str(step.artifact)})
        outcome.records[name] = evaluation.record
        outcome.gates[name] = gate or {}
        log(f"{name} ({exp}): absrel {evaluation.record.absrel} delta1 {evaluation.record.delta1}; "
            f"gate P1 {(gate or {}).get('verdict', '?')}")
    if main:
        for name in names:
            if name in grid.select:
                chosen = select_best(grid, name, out_dir, log)
                if chosen is not None:
                    outcome.selected[name] = chosen
    return outcome


def select_best(grid: DistillGrid, name: str, out_dir: Path, log: Callable[[str], None],
                metric: str = DEFAULT_MAIN_METRIC) -> str | None:
    """K-4: among the selection's runs that have a record in `out_dir`, the best by the main
    metric (the records come from `evaluate` on the frozen workload: the protocol's
    re-measurement); its student is saved as `student_fp32_best.safetensors`."""
    from pqk.models.dust3r import load_checkpoint, save_model

    candidates = {}
    for run in grid.select[name]:
        exp = grid.exp_id(run)
        path = out_dir / f"{exp}_eval.json"
        if path.is_file():
            value = json.loads(path.read_text())["record"].get(metric)
            if value not in (None, "") and math.isfinite(float(value)):
                candidates[run] = {"exp_id": exp, metric: float(value)}
    if not candidates:
        log(f"{name}: none of {', '.join(grid.select[name])} has a finite {metric} in {out_dir} yet; nothing selected")
        return None
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    best = max(candidates, key=lambda r: sign * candidates[r][metric])
    exp = candidates[best]["exp_id"]
    model = load_checkpoint(out_dir / exp / STUDENT_FILE)
    history = list(model.pqk_history) + [{"step": "select", "name": name, "metric": metric, "chosen": exp,
                                          "candidates": candidates}]
    save_model(model, out_dir / BEST_STUDENT_FILE, history=history)
    write_json(out_dir / f"{name}_select.json", {"selection": name, "metric": metric, "chosen": best, "exp_id": exp,
                                                 "candidates": candidates, "model": BEST_STUDENT_FILE})
    log(f"{name}: best of {', '.join(candidates)} by {metric} is {best} ({exp}) -> {out_dir / BEST_STUDENT_FILE}")
    return best
