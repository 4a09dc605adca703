"""The one evaluation function: every figure of a record is measured here, on the frozen
workload, for any model, backend and family.

The family's adapter measures what is its own (quality on its workload, latency over its
inputs, e.g. DUSt3R's scene time: `Task.measure`); this module adds what is the same for
every family (parameters, FLOPs, size, peak memory, device-hours and money) and assembles
the record, so no other code writes a quality or speed figure.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pqk.measure.machine import Contention, machine_info
from pqk.measure.resources import cuda_peak_gigabytes, peak_rss_megabytes
from pqk.pipeline.record import nan_fields, now_iso

if TYPE_CHECKING:
    from pqk.methods.base import StepResult
    from pqk.tasks.base import Task

from pqk.measure.money import DEFAULT_RATE_USD_PER_H  # noqa: E402,F401 (the one place it is set)


@dataclass
class EvalOptions:
    warmup: int = 3
    repeats: int = 30
    rate_usd_per_h: float = DEFAULT_RATE_USD_PER_H
    threads: int | None = None


@dataclass
class Evaluation:
    record: Any  # the family's record dataclass (pqk.pipeline.record.Record for DUSt3R)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"record": self.record.as_row(), "details": self.details}


def _resources(task: Task, model, example, artifact: Path | None, device: str) -> dict:
    out = {"params_M": None, "flops_G": None, "size_MB": None}
    if model is not None:
        out["params_M"] = task.count_parameters(model) / 1e6
        out["flops_G"] = task.gflops(model.to(device).eval(), example)
    if artifact is None and model is not None:
        with tempfile.TemporaryDirectory() as tmp:
            out["size_MB"] = task.deployed_megabytes(model, task.save_model(model, Path(tmp) / "model.safetensors"))
    else:
        out["size_MB"] = task.deployed_megabytes(model, artifact)
    return out


def evaluate(
    model: torch.nn.Module | None,
    workload: Any,
    backend: str = "torch",
    device: str = "cpu",
    *,
    exp_id: str = "P0_teacher_run1",
    combo: str = "teacher",
    step: StepResult | None = None,
    options: EvalOptions | None = None,
    data: Any = None,
    task: Task | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Measure a model on the workload and fill its record (quality, efficiency, resources, cost).

    `model` is the network to run (None when only an ONNX file is evaluated). `step`, when
    given, is what a method step produced and supplies everything about the subject instead:
    the model, how to run it (backend, ONNX file, runtime label), the saved artifact whose size
    is reported, the float model counted for parameters and FLOPs (quantization changes
    neither), the method's slice of the record and the device-hours its steps spent.
    `data` is the workload's data when the caller already loaded (and hash-checked) it;
    `task` the model family (default DUSt3R)."""
    from pqk.methods.base import StepResult
    from pqk.tasks import get_task

    task = task or get_task()
    options = options or EvalOptions()
    step = step or StepResult(model=model, artifact=None, backend=backend)
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    data = data if data is not None else task.load_data(workload)
    with Contention() as contention:  # quality is not affected by a shared machine; latency is
        measured = task.measure(step.model, workload, data, backend=step.backend, device=device, onnx_path=step.onnx_path,
                                runtime=step.runtime, warmup=options.warmup, repeats=options.repeats, threads=options.threads,
                                say=say)
    say("resources")
    counted = step.count_model if step.count_model is not None else step.model
    resources = _resources(task, counted, measured.example, None if step.artifact is None else Path(step.artifact), device)
    eval_hours = (time.perf_counter() - start) / 3600.0
    device_hours = step.device_hours + eval_hours
    vram = cuda_peak_gigabytes(device)
    notes = list(measured.notes)
    if contention.contended:
        notes.append(f"contended: other processes took {contention.others_share:.0%} of the cores while this was timed; "
                     "latency not trustworthy")
    if vram is None:
        notes.append("CPU run: vram_GB empty, peak RSS in details")
    record = _record(task, exp_id, combo, step.fields, resources, vram, measured, device_hours, notes)
    bad = nan_fields(record)
    if bad:
        record.notes = "; ".join(filter(None, [record.notes, f"gate failed: NaN in {', '.join(bad)}"]))
    details = {
        **measured.details,
        "latency": measured.latency,
        "resources": {**resources, "peak_rss_MB": peak_rss_megabytes(),
                      "vram_note": None if vram is not None else "CPU: no device memory; see peak_rss_MB"},
        "cost": {"device_hours_steps": step.device_hours, "device_hours_eval": eval_hours,
                 "device_hours": device_hours, "rate_usd_per_h": options.rate_usd_per_h,
                 "usd": device_hours * options.rate_usd_per_h,
                 "device_kind": "cuda" if device.startswith("cuda") else "cpu"},
        "nan_fields": bad,
        "machine": machine_info(),
        "contention": contention.to_json(),
    }
    return Evaluation(record, details)


def _record(task: Task, exp_id: str, combo: str, fields: dict, resources: dict, vram: float | None, measured,
            device_hours: float, notes: list[str]):
    """The family's record: quality to 5 digits, latency to 2, other efficiency figures to 3."""
    latency = measured.latency
    columns = task.latency_fields
    return task.record_type(
        exp_id=exp_id, combo=combo, **(fields or {}),
        params_M=_round(resources["params_M"], 4), flops_G=_round(resources["flops_G"], 3),
        size_MB=_round(resources["size_MB"], 3), vram_GB=_round(vram, 3),
        **{k: _round(measured.quality.get(k), 5) for k in task.quality_fields},
        **{columns["p50_ms"]: _round(latency["p50_ms"], 2), columns["p95_ms"]: _round(latency["p95_ms"], 2),
           columns["per_sec"]: _round(1000.0 / latency["mean_ms"], 3)},
        **{k: _round(v, 3) for k, v in measured.efficiency.items()},
        gpu_hours=_round(device_hours, 5), notes="; ".join(notes), datetime=now_iso(),
    )


def _round(value: float | None, digits: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return round(float(value), digits)
