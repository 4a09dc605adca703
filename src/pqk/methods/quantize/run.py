"""Q as one step: PTQ, the accuracy-driven keep-list when asked, QAT when asked or when PTQ
loses more than the gate allows, every decision taken on held-out generated pairs (never the
workload's), and every runtime of every stage as a variant a command may measure.

The step's primary result is the last stage (QAT, else the keep-list's PTQ, else PTQ) on its
fastest asked-for runtime, measured side by side; `pqk quantize` measures every variant.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pqk.methods.base import StepContext, StepResult


def _variants(outcome, label: str, runtimes: tuple[str, ...]) -> dict[str, StepResult]:
    """StepResults of one outcome on each available asked-for runtime, tagged PTQ_ort, QAT_onednn, ..."""
    from pqk.methods.quantize.method import apply_side_by_side

    out = {}
    for runtime in runtimes:
        if runtime not in outcome.runtimes():
            continue
        result = outcome.step_result(runtime)
        apply_side_by_side(result, outcome.details)
        out[f"{label}_{'ort' if runtime == 'onnxruntime' else runtime}"] = result
    return out


def quantize_run(model: torch.nn.Module, ctx: StepContext, spec) -> StepResult:
    """The Q step (see the module docstring); `spec` is the method's QuantStepSpec."""
    from pqk.io.files import write_json
    from pqk.methods.quantize_step import QuantRun, auto_keep_groups, fastest_runtime, ptq, qat_after_ptq

    run = QuantRun(runtimes=spec.runtimes, qat=spec.qat, fixed_calibration=spec.fixed_calibration)
    max_drop = ctx.max_quality_drop
    outcome = ptq(model, ctx, spec.quant, run)
    variants = _variants(outcome, "PTQ", spec.runtimes)
    if spec.auto_keep:
        ctx.log("auto-keep: probing layer groups on held-out pairs")
        keep = auto_keep_groups(model, outcome, ctx, max_drop=max_drop)
        write_json(Path(ctx.out_dir) / "auto_keep.json", keep)
        ctx.log(f"auto-keep: float groups {keep['float_groups'] or 'none'}")
        if keep["float_groups"]:
            outcome = ptq(model, ctx, spec.quant, run, float_groups=keep["float_groups"])
            variants.update(_variants(outcome, "PTQautokeep", spec.runtimes))
    decision = None
    if spec.qat == "auto":
        decision = _heldout_decision(model, outcome, ctx)
        ctx.log(f"PTQ held-out δ1 drop {decision['drop']:.2%} (QAT when > {max_drop:.0%})")
    if spec.qat == "always" or (decision is not None and decision["drop"] > max_drop):
        outcome = qat_after_ptq(outcome, ctx, spec.quant, run, teacher=model, show_progress=False)
        variants.update(_variants(outcome, "QAT", spec.runtimes))
    outcome.details["qat_decision"] = {"mode": spec.qat, "max_drop": max_drop, **(decision or {})}
    result = outcome.step_result(fastest_runtime(outcome, spec.runtimes))
    from pqk.methods.quantize.method import apply_side_by_side

    apply_side_by_side(result, outcome.details)
    qat_checkpoint = outcome.details.get("qat", {}).get("checkpoint")
    # A QAT model's float weights (LayerNorms included) differ from the input model's.
    result.float_model = Path(qat_checkpoint) if qat_checkpoint else None
    result.variants = variants
    return result


def _heldout_decision(model: torch.nn.Module, outcome, ctx: StepContext) -> dict:
    from pqk.methods.quantize_step import _OrtAsModule, heldout_delta1_drop

    probe = outcome.int8_model
    if probe is None:
        from pqk.backends.onnx_export import OrtPairRunner

        probe = _OrtAsModule(OrtPairRunner(outcome.onnx_int8))
    return heldout_delta1_drop(model, probe, ctx)
