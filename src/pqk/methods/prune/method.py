"""P as a registered method: one ρ of the pruning spec, optionally checked in ONNX Runtime,
gated P4 alone and P1 before K; costed for `pqk budget` (sensitivity trials, fine-tuning)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pqk.measure.probe import CostModel, Costing, Item
from pqk.methods.base import Method, StepContext, StepResult, register


@register
class Prune(Method):
    name = "prune"
    letter = "P"
    options = frozenset({"rho", "allocation", "importance", "onnx_check"})
    default_config = "configs/prune.yaml"
    trains = True

    def load_spec(self, config: Path, options: Mapping[str, Any]):
        from pqk.methods.prune import ALLOCATIONS, IMPORTANCES, check_choice, check_rho, load_prune_spec

        spec = load_prune_spec(config)
        changes = {}
        if "rho" in options:
            changes["rho"] = check_rho(options["rho"])
        if "allocation" in options:
            changes["allocation"] = check_choice("--allocation", options["allocation"], ALLOCATIONS)
        if "importance" in options:
            changes["importance"] = check_choice("--importance", options["importance"], IMPORTANCES)
        spec = replace(spec, **changes) if changes else spec
        return PruneStepSpec(spec, bool(options.get("onnx_check", False)))

    def run(self, model: torch.nn.Module, ctx: StepContext, spec) -> StepResult:
        from pqk.methods.prune import prune_step

        result = prune_step(model, ctx, spec.prune)
        if spec.onnx_check:
            result.eval_details["onnx_check"] = _onnx_check(result, ctx)
        return result

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        from pqk.methods.prune import rho_tag

        rho = (result.fields if result else {}).get("rho", options.get("rho", 0))
        tag = rho_tag(float(rho or 0))
        for key, default in (("allocation", "sensitivity"), ("importance", "l1")):
            if options.get(key, default) != default:
                tag += f"_{options[key]}"
        return tag

    def stage(self, alone: bool) -> str:
        return "P4" if alone else "P1"

    def cost(self, costing, step, model, where: str):
        return prune_cost(costing, step, model, where)


@dataclass
class PruneStepSpec:
    prune: Any  # pqk.methods.prune.PruneSpec
    onnx_check: bool = False  # export the pruned model and compare ONNX Runtime with PyTorch


def _onnx_check(result: StepResult, ctx: StepContext) -> dict:
    """Export the pruned model at the workload's input shape next to its checkpoint and compare
    ONNX Runtime with PyTorch on a generated pair (a pruned model must still deploy)."""
    from pqk.backends.onnx_export import compare_with_torch, export_onnx

    height, width = ctx.family.input_shape(ctx.workload)
    onnx_path = Path(result.artifact).with_suffix(".onnx")
    export_onnx(result.model, onnx_path, height, width)
    view1, view2 = ctx.family.example_input(1, height, width)
    report = compare_with_torch(result.model, onnx_path, view1, view2)
    return {"onnx": onnx_path.name, "shape": [height, width], "max_rel_l2": report["max_rel_l2"],
            "matches": bool(report["max_rel_l2"] <= 1e-4)}


def prune_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    cfg = costing.config(step)
    rhos = step.options.get("rho", cfg.get("rho", 0.3))
    rhos = [float(r) for r in (rhos if isinstance(rhos, list) else [rhos])]
    allocation = str(step.options.get("allocation", cfg.get("allocation", "sensitivity")))
    calib = cfg.get("calibration") or {}
    cw, ch = int(calib.get("width", 512)), int(calib.get("height", 384))
    n_pairs = int(calib.get("n_pairs", 8))
    items: list[Item] = []
    if allocation == "sensitivity":
        ratios = cfg.get("sensitivity_ratios") or [0.25, 0.5, 0.75]
        trials = 1 + _prunable_unit_count(model.module) * len(ratios)
        items.append(costing.forwards("prune", f"sensitivity: {trials} trials x {n_pairs} pairs at {cw}x{ch}",
                                      model, trials * n_pairs, cw, ch))
    pruned = model
    finetune = cfg.get("finetune")
    if not finetune:
        costing.note(f"{where}: {step.config_name} has no 'finetune' settings: no fine-tuning costed")
    for rho in rhos:
        pruned = CostModel(f"pruned rho={rho:g} of {model.name}", pruned_copy(model.module, rho, costing))
        if finetune:
            spec = costing.train_spec(finetune, f"{where}: {step.config_name} finetune")
            items += costing.train("prune", f"fine-tune rho {rho:g}", pruned, spec, None)
    if len(rhos) > 1:
        costing.note(f"{where}: prune lists rho {rhos}: the next steps continue from rho {rhos[-1]:g}")
    return items, pruned


def _prunable_unit_count(model) -> int:
    try:
        from pqk.methods.prune import prunable_units

        return len(prunable_units(model, True, True))
    except Exception:  # a model the pruner does not know: one head and one FFN unit per block
        return 2 * sum(len(getattr(model, s, [])) for s in ("enc_blocks", "dec_blocks", "dec_blocks2"))


def pruned_copy(model, rho: float, costing: Costing):
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
        costing.note(f"could not build a pruned copy ({type(exc).__name__}): pruned steps costed on the unpruned model")
        return model
