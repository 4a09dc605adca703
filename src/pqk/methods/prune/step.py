"""The plan runner's P step: prune to ρ, fine-tune with the task loss through the shared
trainer, and save `pruned_rXXX.pth` with the record's details."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from pqk.methods.prune.apply import prune_model
from pqk.methods.prune.calibration import calibration_examples, calibration_quality
from pqk.methods.prune.spec import PruneSpec, rho_tag, train_spec
from pqk.methods.prune.table import sensitivity_table, state_fingerprint
from pqk.models.dust3r.checkpoint import save_model
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo


def task_loss(model: nn.Module, view1: dict, view2: dict, gt: dict, progress: float):
    """The fine-tuning loss: DUSt3R's confidence-weighted regression (as the teacher was trained)."""
    from pqk.train.losses import conf_regression_loss

    res1, res2 = model(view1, view2)
    return conf_regression_loss(res1, res2, gt)


def finetune(model: nn.Module, spec: PruneSpec, out_dir: Path, budget: float = 1.0, *, resume: bool = True,
             log: Callable[[str], None] = print, show_progress: bool = True, name: str = "finetune"):
    """Fine-tune with the task loss through the shared trainer; returns its FitResult."""
    from pqk.train.trainer import fit

    ts = train_spec(spec)
    if budget != 1.0:
        ts = ts.scaled(budget)
    return fit(model, task_loss, ts, Path(out_dir), resume=resume, log=log, show_progress=show_progress, name=name)


def artifact_name(rho: float, allocation: str = "sensitivity") -> str:
    """pruned_r030.pth; the uniform baseline gets pruned_r030_uniform.pth."""
    return f"pruned_{rho_tag(rho)}" + ("" if allocation == "sensitivity" else f"_{allocation}") + ".pth"


def prune_step(model: AsymmetricCroCo3DStereo, ctx, spec: PruneSpec, *, sensitivity: dict | None = None,
               calib: Sequence[dict] | None = None):
    """The plan runner's P step: prune to `spec.rho`, fine-tune (epochs scaled by `ctx.budget`),
    save `pruned_rXXX.pth` in `ctx.out_dir`. Record slice: rho. `sensitivity` / `calib` reuse a
    table and calibration pairs the caller already has (several ρ on one model)."""
    from pqk.methods.base import StepResult

    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if calib is None and (spec.allocation == "sensitivity" or spec.importance == "taylor"):
        calib = calibration_examples(spec.calibration, spec.seed)
    if sensitivity is None and spec.allocation == "sensitivity":
        sensitivity = sensitivity_table(model, spec, calib, out_dir, ctx.log)
    outcome = prune_model(model, spec, calib, sensitivity=sensitivity, log=ctx.log)
    pruned, history = outcome.model, outcome.model.pqk_history
    tag = rho_tag(spec.rho) + ("" if spec.allocation == "sensitivity" else f"_{spec.allocation}")
    details: dict[str, Any] = {"prune": outcome.stats, "spec": spec.to_dict()}
    notes = [f"{spec.allocation} allocation, {spec.importance} importance, rho achieved {outcome.stats['rho_achieved']:.3f}"]
    if calib:
        details["calibration_after_pruning"] = calibration_quality(pruned, calib)
    if spec.finetune:
        # No progress bar of its own: callers (the CLI's status line, the plan runner) show ctx.log.
        # The folder is named by the pruned weights: a resume continues this model's run, never
        # one of another allocation or base model written to the same --out.
        ft_dir = out_dir / f"finetune_{tag}_{state_fingerprint(pruned)[:8]}"
        result = finetune(pruned, spec, ft_dir, ctx.budget, resume=ctx.resume, log=ctx.log,
                          show_progress=False, name=f"finetune_{tag}")
        pruned = result.model.eval()
        details["finetune"] = {
            "budget": ctx.budget, "epochs": len(result.history), "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "wall_time_s": round(result.wall_time_s, 1),
            "best_val": result.best_val, "log": str(result.log_path),
        }
        if calib:
            details["calibration_after_finetune"] = calibration_quality(pruned, calib)
        history = history + [{"step": "finetune", "budget": ctx.budget, "best_epoch": result.best_epoch}]
    else:
        notes.append("no fine-tuning (finetune is empty)")
    pruned.pqk_history = history
    artifact = save_model(pruned, out_dir / artifact_name(spec.rho, spec.allocation))
    hours = (time.perf_counter() - start) / 3600.0
    return StepResult(model=pruned, artifact=artifact, fields={"rho": spec.rho}, device_hours=hours,
                      notes=notes, details=details)
