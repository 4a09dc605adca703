"""The four built-in methods (K, P, Q, joint PQK) as registered `Method`s. TEMPORARY home:
each class moves into its method's package once the packages are split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common


# --- K: distillation ------------------------------------------------------------------------------


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
            spec = replace(spec, gamma=float(options["gamma"]))
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
        from pqk.methods.costs import distill_cost

        return distill_cost(costing, step, model, where)


# --- P: structured pruning ------------------------------------------------------------------------


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
        from pqk.methods.costs import prune_cost

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


# --- Q: quantization ------------------------------------------------------------------------------


@dataclass
class QuantStepSpec:
    quant: Any  # pqk.methods.quantize.QuantSpec
    runtimes: tuple[str, ...] = ("onednn", "onnxruntime")
    qat: str = "auto"
    auto_keep: bool = False
    fixed_calibration: bool = False  # the calibration size is the experiment's subject (ABL-2): no budget scaling


def _runtimes(value: Any) -> tuple[str, ...]:
    from pqk.methods.quantize_step import RUNTIMES

    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = tuple(str(r).strip() for r in items if str(r).strip())
    bad = [r for r in items if r not in RUNTIMES]
    if bad or not items:
        raise ConfigError(f"unknown runtime {bad[0] if bad else '(none)'!r}; expected one or more of {', '.join(RUNTIMES)}")
    return items


@register
class Quantize(Method):
    name = "quantize"
    letter = "Q"
    options = frozenset({"qat", "runtimes", "keep_list", "calibration_size", "auto_keep"})
    default_config = "configs/quant.yaml"
    quantizes = True

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> QuantStepSpec:
        from pqk.methods.quantize import load_quant_spec
        from pqk.methods.quantize_step import QAT_MODES

        spec = load_quant_spec(config)
        if "keep_list" in options:
            spec = spec.with_keep_list(options["keep_list"])
        if "calibration_size" in options:
            # QuantSpec validates on construction: a size that is not a positive integer is refused here.
            spec = replace(spec, calibration=replace(spec.calibration, size=options["calibration_size"]))
        qat = str(options.get("qat", "auto"))
        if qat not in QAT_MODES:
            raise ConfigError(f"unknown qat mode {qat!r}; expected one of {', '.join(QAT_MODES)}")
        return QuantStepSpec(spec, _runtimes(options.get("runtimes", "onednn,onnxruntime")), qat,
                             bool(options.get("auto_keep", False)), "calibration_size" in options)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: QuantStepSpec) -> StepResult:
        from pqk.methods.quantize_run import quantize_run

        return quantize_run(model, ctx, spec)

    def restore(self, done, entering, task) -> StepResult:
        return restore_quantized(done, entering, task)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        from pqk.methods.quantize import KEEP_KINDS

        tag = "QAT" if ((result.details if result else None) or {}).get("qat") else "PTQ"
        keep = options.get("keep_list")
        if keep is not None and list(keep) != list(KEEP_KINDS):
            tag += "_keep" + ("".join(_KEEP_TAGS.get(k, k) for k in keep) or "none")
        if "calibration_size" in options:
            tag += f"_cal{int(options['calibration_size'])}"
        return tag

    def stage(self, alone: bool) -> str:
        return "P2" if alone else "P3"

    def reference(self, alone: bool) -> str:
        return "teacher" if alone else "input"

    def cost(self, costing, step, model, where: str):
        from pqk.methods.costs import quantize_cost

        return quantize_cost(costing, step, model, where)


_KEEP_TAGS = {"Softmax": "SM", "attention_scale": "AS", "LayerNorm": "LN"}


def restore_quantized(done: Mapping[str, Any], entering: torch.nn.Module, task) -> StepResult:
    """A finished quantizing step from its summary: the float model (the step's own when it
    trained one, else its input) and the INT8 artifact on the runtime it was measured on."""
    common = restore_common(done)
    float_model = task.load_model(done["float_model"]) if done.get("float_model") else entering
    if done["backend"] == "onnxruntime":
        return StepResult(model=None, backend="onnxruntime", onnx_path=Path(done["onnx_path"]), count_model=float_model,
                          float_model=done.get("float_model") and Path(done["float_model"]), **common)
    from pqk.backends.torch_int8 import int8_model_from_qdq

    int8, _ = int8_model_from_qdq(float_model, done["artifact"])
    return StepResult(model=int8, backend="torch", count_model=float_model,
                      float_model=done.get("float_model") and Path(done["float_model"]), **common)


# --- joint PQK ------------------------------------------------------------------------------------


@dataclass
class JointStepSpec:
    joint: Any  # pqk.methods.joint.JointSpec
    runtimes: tuple[str, ...] = ("onednn", "onnxruntime")


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
        return JointStepSpec(spec, _runtimes(options.get("runtimes", "onednn,onnxruntime")))

    def config_files(self, config: Path, data: Any) -> dict[str, Path]:
        from pqk.methods.joint import referenced_configs

        return referenced_configs(data, config.resolve().parent)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: JointStepSpec) -> StepResult:
        from pqk.methods.joint import joint_step

        result, outcome = joint_step(ctx.teacher, ctx, spec.joint, spec.runtimes)
        result.float_model = Path(outcome.details["joint"]["checkpoint"])
        result.latency_cut = _latency_cut(outcome.details, result.backend)
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
        from pqk.methods.costs import joint_cost

        return joint_cost(costing, step, model, where)


def _latency_cut(details: Mapping[str, Any], backend: str) -> float | None:
    """The side-by-side p50 cut of the runtime a quantized result runs on, vs eager FP32."""
    from pqk.methods.quantize_step import RUNTIME_LATENCY_KEY

    side = details.get("latency_side_by_side") or {}
    variant = RUNTIME_LATENCY_KEY["onednn" if backend == "torch" else "onnxruntime"]
    speedup = (side.get("variants") or {}).get(variant, {}).get("speedup")
    return None if not speedup else 1.0 - 1.0 / speedup
