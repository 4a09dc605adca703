"""One experiment's measurement: evaluate a method step's result with the one evaluation
function, apply its stage's gate against the reference record, and write the record (JSON and
a result_table.csv row). Every CLI command and the plan runner end here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from pqk.pipeline.evaluate import EvalOptions, Evaluation, evaluate
from pqk.pipeline.gates import check_gate, record_from_row
from pqk.pipeline.record import Record, upsert_row, write_json
from pqk.methods.base import StepContext, StepResult

TEACHER_EVAL = "teacher_eval.json"


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def measure_step(
    step: StepResult, ctx: StepContext, *, exp_id: str, combo: str, stage: str | None,
    reference: Record | None, options: EvalOptions | None = None, scenes: dict | None = None,
    progress: Callable[[str], None] | None = None, latency_cut: float | None = None, rule=None,
) -> tuple[Evaluation, dict | None]:
    """Evaluate `step`'s model on the workload, fold in its notes, apply `stage`'s gate
    against `reference` (none when either is None). Returns (evaluation, gate JSON)."""
    evaluation = evaluate(
        step.model, ctx.workload, backend=step.backend, device=ctx.device, exp_id=exp_id, combo=combo,
        artifact=step.artifact, onnx_path=step.onnx_path, method_fields=step.fields,
        steps_device_hours=step.device_hours, options=options, progress=progress, scenes=scenes,
        count_model=step.count_model, runtime=step.runtime,
    )
    record = evaluation.record
    gate = None
    if stage is not None and reference is not None:
        verdict = check_gate(stage, record, reference, rule=rule, latency_cut=latency_cut)
        gate = {**verdict.to_json(), "reference": reference.exp_id}
        step_notes = [*step.notes, verdict.note()]
    else:
        step_notes = list(step.notes)
    record.notes = "; ".join(filter(None, [*step_notes, record.notes]))
    evaluation.details["step"] = json_safe(step.details)
    evaluation.details["gate"] = gate
    return evaluation, gate


def write_evaluation(evaluation: Evaluation, out_dir: Path, name: str | None = None, extra: dict | None = None) -> tuple[Path, Path]:
    """<out>/<exp_id>_eval.json (or `name`) and an upserted row of <out>/result_table.csv."""
    out_dir = Path(out_dir)
    payload = evaluation.to_json()
    if extra:
        payload["details"].update(json_safe(extra))
    json_path = write_json(out_dir / (name or f"{evaluation.record.exp_id}_eval.json"), payload)
    csv_path = upsert_row(out_dir / "result_table.csv", evaluation.record)
    return json_path, csv_path


def teacher_reference(
    teacher: torch.nn.Module, ctx: StepContext, *, artifact: Path | None = None, options: EvalOptions | None = None,
    scenes: dict | None = None, progress: Callable[[str], None] | None = None,
) -> Record:
    """The teacher's P0 record on this workload: read from <out>/teacher_eval.json when it was
    measured on the same data, measured (and written) otherwise."""
    path = Path(ctx.out_dir) / TEACHER_EVAL
    weights = _weights_hash(teacher)
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
            same_data = payload["details"]["workload"]["data_hash"] == ctx.workload.data_hash
            if same_data and payload["details"].get("weights_sha256") == weights:
                return record_from_row(payload["record"])
        except (KeyError, ValueError, TypeError):
            pass  # unreadable, another workload or another model: measure again
    evaluation = evaluate(teacher, ctx.workload, backend="torch", device=ctx.device, exp_id="P0_teacher_run1",
                          combo="teacher", artifact=artifact, options=options, progress=progress, scenes=scenes)
    evaluation.details["weights_sha256"] = weights
    write_evaluation(evaluation, ctx.out_dir, TEACHER_EVAL)
    return evaluation.record


def _weights_hash(model: torch.nn.Module) -> str:
    """Identity of a model's weights (which teacher a stored reference record measured)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
