"""Joint PQK as a registered method: one training run that prunes, distils and fake-quantizes,
ends in INT8 and is gated against its own FP32 model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pqk.measure.probe import CostModel, Costing, Item
from pqk.methods.base import Method, StepContext, StepResult, register

from pqk.methods.distill.method import distill_cost
from pqk.methods.prune.method import pruned_copy
from pqk.methods.quantize.method import _runtimes, apply_side_by_side, quantize_cost, restore_quantized
from pqk.methods.quantize_step import DEFAULT_RUNTIMES


@dataclass
class JointStepSpec:
    joint: Any  # pqk.methods.joint.JointSpec
    runtimes: tuple[str, ...] = ("onednn", "onnxruntime", "openvino")


@register
class Joint(Method):
    name = "joint"
    letter = "PQK"
    options = frozenset({"run", "rho", "runtimes"})  # one training run: prune + distil + fake quant (configs/joint.yaml)
    default_config = "configs/joint.yaml"
    trains = True
    quantizes = True
    only_step = "joint starts from the teacher and ends in INT8"

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> JointStepSpec:
        from pqk.methods.joint import load_joint_spec

        spec = load_joint_spec(config, run=options.get("run"), rho=options.get("rho"))
        return JointStepSpec(spec, _runtimes(options.get("runtimes", DEFAULT_RUNTIMES)))

    def config_files(self, config: Path, data: Any) -> dict[str, Path]:
        from pqk.methods.joint import referenced_configs

        return referenced_configs(data, config.resolve().parent)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: JointStepSpec) -> StepResult:
        from pqk.methods.joint import joint_step

        result, outcome = joint_step(ctx.teacher, ctx, spec.joint, spec.runtimes)
        result.float_model = Path(outcome.details["joint"]["checkpoint"])
        apply_side_by_side(result, outcome.details)
        return result

    def restore(self, done, entering, task) -> StepResult:
        return restore_quantized(done, entering, task)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        return ((result.details if result else None) or {}).get("keyparams", "joint")

    def stage(self, alone: bool) -> str:
        return "P3"  # gated like P→K→Q: against its own FP32 model (masks removed, float weights)

    def reference(self, alone: bool) -> str:
        return "own_float"

    def cost(self, costing, step, model, where: str):
        return joint_cost(costing, step, model, where)


def joint_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    """One distillation run's training (masks and fake quantization cost nothing extra per
    step) + calibration twice (at fake-quant onset and at export) + the FP32 reference's
    evaluation; the model that leaves is the student pruned by rho."""
    from pqk.io.files import resolve_path

    cfg = costing.config(step)
    anchor = (step.config or Path(step.config_name)).resolve().parent

    def sub(method: str, key: str, default: str, options: dict):
        name = str((cfg.get(key) or {}).get("config", default))
        return replace(step, method=method, config=resolve_path(name, anchor), options=options, config_name=name)

    run = step.options.get("run", (cfg.get("distill") or {}).get("run", "K-1"))
    items, student = distill_cost(costing, sub("distill", "distill", "distill.yaml", {"run": run}), model, where)
    calib, _ = quantize_cost(costing, sub("quantize", "quantize", "quant.yaml", {"qat": "never"}), student, where)
    items = [replace(it, step="joint") for it in items + calib + calib]
    rho = float(step.options.get("rho", (cfg.get("prune") or {}).get("rho", 0.1)))
    pruned = CostModel(f"joint rho={rho:g} of {student.name}", pruned_copy(student.module, rho, costing))
    items.append(costing.evaluation(pruned, "evaluation of the joint model's FP32 reference"))
    return items, pruned
