"""The plan runner's joint PQK step: train and settle (`train_joint`), export INT8 with the
trained ranges, build the INT8 runtimes and time them side by side."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from torch import nn

from pqk.methods.joint.spec import JointSpec
from pqk.methods.joint.train import train_joint

JOINT_FILE = "joint_student.safetensors"


def joint_step(teacher: nn.Module, ctx, spec: JointSpec, runtimes: tuple[str, ...] = ("onednn", "onnxruntime", "openvino"),
               latency_rounds: int = 10):
    """The plan runner's joint PQK step (from the teacher): train, settle, export INT8, build
    the INT8 runtimes and time them side by side. Returns (StepResult on the fastest runtime,
    PtqOutcome)."""
    from pqk.backends.torch_int8 import int8_model_from_qdq, onednn_int8_available
    from pqk.methods.qat import export_with_ranges
    from pqk.methods.quantize_step import (PtqOutcome, budget_calibration, fastest_runtime, other_shapes,
                                          side_by_side_latency, workload_shape)
    from pqk.models.dust3r import save_model

    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = workload_shape(ctx.workload)
    quant, notes = budget_calibration(spec.quant, ctx.budget)
    spec = replace(spec, quant=quant)
    ctx.log(f"joint PQK: {spec.distill_run} student, rho {spec.rho:g} (masks to {spec.prune_until:.0%} of the run), "
            f"fake quantization from {spec.fake_quant_from:.0%}")
    from pqk.methods.quantize import calibration_pairs

    calib_pairs = calibration_pairs(quant, width, height)  # one set: the run's ranges and the export's
    outcome = train_joint(ctx.teacher, spec, out_dir / "train", width, height, budget=ctx.budget, resume=ctx.resume,
                          log=ctx.log, show_progress=False, device=ctx.device, calib_pairs=calib_pairs)
    history = [{"step": "joint_pqk", **spec.to_json(), "budget": ctx.budget, "removed_per_unit": outcome.counts,
                "activation_ranges": {k: list(v) for k, v in outcome.ranges.items()}}]
    checkpoint = save_model(outcome.model, out_dir / JOINT_FILE, history=history)
    ctx.log("joint PQK: export to QDQ with the trained scales")
    exported = export_with_ranges(outcome.model, outcome.ranges, quant, calib_pairs, out_dir, height, width,
                                  name="joint_int8.onnx", other_shapes=other_shapes(ctx.workload, height, width))
    int8_model, details = None, {}
    if "onednn" in runtimes:
        if onednn_int8_available():
            int8_model, details["onednn"] = int8_model_from_qdq(outcome.model, exported["onnx_int8"])
        else:
            notes.append("no oneDNN INT8 kernels in this PyTorch: runtime onednn skipped")
    ctx.log("latency side by side")
    details["latency_side_by_side"] = side_by_side_latency(outcome.model, exported["onnx_fp32"], exported["onnx_int8"],
                                                           int8_model, height, width, latency_rounds,
                                                           openvino="openvino" in runtimes)
    fit = outcome.fit
    details.update({
        "joint": {**outcome.stats, "schedule": outcome.events, "epochs": len(fit.history), "steps": fit.steps_done,
                  "wall_time_s": fit.wall_time_s, "history": fit.history, "checkpoint": str(checkpoint),
                  "spec": spec.to_json()},
        "ptq": exported["summary"], "onnx_fp32": str(exported["onnx_fp32"]), "keyparams": spec.keyparams(),
    })
    notes = [*notes, f"joint PQK: one run of {fit.steps_done} steps, {outcome.stats['heads_removed']} heads and "
             f"{outcome.stats['ffn_channels_removed']} FFN channels masked (rho {outcome.stats['rho_achieved']:.3f}), "
             f"fake quantization from {spec.fake_quant_from:.0%}"]
    fields = spec.record_fields()
    ptq = PtqOutcome(outcome.model, Path(exported["onnx_fp32"]), Path(exported["onnx_int8"]), int8_model, fields,
                     details, notes, (time.perf_counter() - start) / 3600.0 * max(1, fit.world_size))
    return ptq.step_result(fastest_runtime(ptq, runtimes)), ptq
