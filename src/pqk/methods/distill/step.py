"""Running a distillation: `distill` trains a student against its teacher with the shared
trainer, `distill_step` is the plan runner's K step (derive the student, distil it, save it)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pqk.methods.base import StepContext, StepResult
from pqk.methods.distill.loss import DistillLoss
from pqk.methods.distill.spec import DistillSpec
from pqk.methods.distill.student import derive_student
from pqk.train.trainer import FitResult, fit, unwrap


def distill(
    student: nn.Module,
    teacher: nn.Module,
    spec: DistillSpec,
    out_dir: Path,
    *,
    resume: bool = True,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    device: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train `student` against `teacher` with `spec`'s loss; `out_dir` gets best.pth, last.pth
    and distill_log.json (see `pqk.train.trainer.fit`)."""
    loss = DistillLoss(student, teacher, spec)
    try:
        return fit(student, loss, spec.train, out_dir, resume=resume, extra_modules=dict(loss.projections),
                   log=log, show_progress=show_progress, name="distill", device=device, on_step=on_step)
    finally:
        loss.close()


STUDENT_FILE = "student.safetensors"


def distill_step(model: nn.Module, ctx: StepContext, spec: DistillSpec) -> StepResult:
    """The plan runner's K step: derive a student from `model` (ratio 0: train `model` itself),
    distil it from `ctx.teacher` at `ctx.budget`, save it into `ctx.out_dir`."""
    from pqk.models.dust3r import save_model

    spec = spec.scaled(ctx.budget) if ctx.budget != 1.0 else spec
    student = derive_student(model, spec.ratio) if spec.ratio > 0 else copy.deepcopy(unwrap(model))
    if spec.ratio == 0:
        student.pqk_history = list(getattr(unwrap(model), "pqk_history", []))
    torch.manual_seed(ctx.seed)
    result = distill(student, ctx.teacher, spec, ctx.out_dir, resume=ctx.resume, log=ctx.log, device=ctx.device)
    entry = {
        "step": "distill", "loss": "task_only" if spec.task_only else "alpha*task + beta*KL_T + gamma*feat",
        "T": spec.T, "alpha": spec.alpha, "beta": spec.beta, "beta_schedule": spec.beta_schedule, "gamma": spec.gamma,
        "ratio": spec.ratio, "derivation": getattr(student, "pqk_derivation", None), "epochs": spec.train.epochs,
        "steps_per_epoch": spec.train.steps_per_epoch, "steps_done": result.steps_done, "best_epoch": result.best_epoch,
        "best_val": result.best_val, "seed": ctx.seed, "budget": ctx.budget,
    }
    history = list(getattr(student, "pqk_history", [])) + [entry]
    path = save_model(result.model, Path(ctx.out_dir) / STUDENT_FILE, history=history) if _is_main() else Path(ctx.out_dir) / STUDENT_FILE
    result.model.pqk_history = history
    notes = ["control: L_task only"] if spec.task_only else []
    if spec.beta_schedule:
        notes.append("beta schedule " + ", ".join(f"{b:g} from {s:.0%}" for s, b in spec.beta_schedule))
    if result.stopped_early:
        notes.append(f"early stop at epoch {len(result.history)} (best {result.best_epoch})")
    return StepResult(
        model=result.model, artifact=path, fields=spec.record_fields(),
        device_hours=result.wall_time_s * result.world_size / 3600.0, notes=notes,
        details={"distill": {**entry, "wall_time_s": result.wall_time_s, "world_size": result.world_size,
                             "stopped_early": result.stopped_early, "log": str(result.log_path),
                             "history": result.history}},
    )


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
