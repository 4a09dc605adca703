"""pqk as a library: one call per method, as Torch-Pruning and torchao users expect.

    import pqk
    student = pqk.distill(teacher, pqk.DistillSpec(ratio=0.3), out_dir="runs/api/K")
    pruned = pqk.prune(teacher, pqk.PruneSpec(rho=0.3, allocation="uniform"))
    int8 = pqk.quantize(teacher, pqk.QuantSpec(), out_dir="runs/api/Q")   # -> QuantizedModel
    record = pqk.evaluate(int8, "configs/workload.yaml").record
    statuses = pqk.run_plan("configs/plans/minimal.yaml")

Every spec is the dataclass a config file is read into (`pqk.DistillSpec`, `pqk.PruneSpec`,
`pqk.QuantSpec`), validated on construction. These calls are the methods themselves, without
the plan runner's cache, gates and records; `run_plan` is the runner.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pqk.methods.base import StepContext, StepResult, trainable_copy


def _context(teacher: torch.nn.Module, out_dir: str | Path | None, budget: float, device: str,
             log: Callable[[str], None], workload: Any = None) -> StepContext:
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="pqk-"))
    return StepContext(teacher=teacher, workload=workload, out_dir=folder, device=device, budget=budget, log=log)


def distill(teacher: torch.nn.Module, spec: Any = None, *, out_dir: str | Path | None = None, budget: float = 1.0,
            device: str = "cpu", log: Callable[[str], None] = lambda _m: None) -> torch.nn.Module:
    """A student derived from `teacher` (depth, heads and FFN width cut by `spec.ratio`, weights
    inherited) and distilled from it on generated scenes; saved as `out_dir/student.safetensors`.
    `spec`: a `pqk.DistillSpec` (default: the protocol's K-1); `budget` scales its epochs."""
    from pqk.methods.distill import DistillSpec, distill_step

    ctx = _context(teacher.eval(), out_dir, budget, device, log)
    return distill_step(trainable_copy(teacher), ctx, spec if spec is not None else DistillSpec()).model


def prune(model: torch.nn.Module, spec: Any = None, calib: Sequence[dict] | None = None) -> torch.nn.Module:
    """A structurally pruned copy of `model` (attention heads and FFN channels removed: fewer
    parameters, an ordinary model that saves, loads and exports). `spec`: a `pqk.PruneSpec`
    (ρ, allocation, importance); `calib`: calibration examples for sensitivity allocation and
    Taylor importance (default: the spec's generated pairs). No fine-tuning: `pqk.distill`
    with `DistillSpec(ratio=0)` or `pqk prune` does that."""
    from pqk.methods.prune import PruneSpec, calibration_examples, prune_model

    spec = spec if spec is not None else PruneSpec()
    if calib is None and (spec.allocation == "sensitivity" or spec.importance == "taylor"):
        calib = calibration_examples(spec.calibration, spec.seed)
    return prune_model(trainable_copy(model), spec, calib).model


@dataclass
class QuantizedModel:
    """A W8A8 model: its deployed QDQ ONNX file and the runtimes that run it here."""

    onnx_path: Path
    runtimes: list[str]  # "onnxruntime" always; "onednn" where this PyTorch has INT8 kernels; "openvino" when installed
    float_model: torch.nn.Module
    height: int
    width: int
    record_fields: dict = field(default_factory=dict)  # bits_w, bits_a, keep_list
    _runners: dict = field(default_factory=dict, repr=False)

    def runner(self, runtime: str = "onnxruntime") -> Callable:
        """`runner(view1, view2) -> (res1, res2)` on `runtime`."""
        from pqk.errors import InputError

        if runtime not in self.runtimes:
            raise InputError(f"runtime {runtime!r} is not available; accepted: {', '.join(self.runtimes)}")
        if runtime not in self._runners:
            if runtime in ("onnxruntime", "openvino"):
                from pqk.backends.onnx_export import OrtPairRunner, ShapeRoutedRunner
                from pqk.backends.openvino_runtime import OvPairRunner

                # The QDQ file and its static-shape variants beside it (one per workload shape).
                self._runners[runtime] = ShapeRoutedRunner(
                    self.onnx_path, OrtPairRunner if runtime == "onnxruntime" else OvPairRunner)
            else:
                from pqk.backends.torch_int8 import int8_model_from_qdq

                self._runners[runtime] = int8_model_from_qdq(self.float_model, self.onnx_path)[0]
        return self._runners[runtime]

    def __call__(self, view1: dict, view2: dict, runtime: str = "onnxruntime"):
        return self.runner(runtime)(view1, view2)

    def save(self, path: str | Path) -> Path:
        """Copy the QDQ ONNX file to `path` (what a deployment loads), and its static-shape
        variants beside it under the matching names."""
        from pqk.backends.onnx_export import shape_variant_path, shape_variants

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.onnx_path, path)
        for shapes, variant in shape_variants(self.onnx_path).items():
            shutil.copyfile(variant, shape_variant_path(path, shapes))
        return path

    def step_result(self, runtime: str = "onnxruntime") -> StepResult:
        """What `pqk.evaluate` measures: the artifact on `runtime`, counted as its float model."""
        notes = [f"runtime: {runtime}"]
        if runtime in ("onnxruntime", "openvino"):
            return StepResult(model=None, artifact=self.onnx_path, backend=runtime, onnx_path=self.onnx_path,
                              count_model=self.float_model, fields=dict(self.record_fields), notes=notes)
        return StepResult(model=self.runner(runtime), artifact=self.onnx_path, count_model=self.float_model,
                          fields=dict(self.record_fields), notes=notes)


def quantize(model: torch.nn.Module, spec: Any = None, calib: Sequence[tuple] | None = None, *,
             out_dir: str | Path | None = None, shape: tuple[int, int] = (384, 512),
             other_shapes: Sequence[tuple[int, int]] = ()) -> QuantizedModel:
    """Post-training W8A8 quantization of `model` at input `shape` (height, width; the INT8
    graph is static): exported to ONNX, calibrated, written as `out_dir/ptq_int8.onnx` (int8
    per-channel weights, the spec's keep-list in float). `other_shapes` (height, width) get
    their own static files beside it with the same scales (`ptq_int8.336x512.onnx`); the
    runners pick the file by the pair's shape. `spec`: a `pqk.QuantSpec`; `calib`:
    (img1, img2) float32 arrays of shape (1, 3, H, W) in [-1, 1] (default: the spec's generated
    calibration pairs, never evaluation data)."""
    from pqk.methods.quantize import QuantSpec, calibration_pairs
    from pqk.methods.quantize import quantize as quantize_graph

    spec = spec if spec is not None else QuantSpec()
    height, width = shape
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="pqk-q-"))
    model = model.eval()
    calib = list(calib) if calib is not None else calibration_pairs(spec, width, height)
    result = quantize_graph(model, spec, calib, folder, height, width,
                            other_shapes=[((int(h), int(w)), (int(h), int(w))) for h, w in other_shapes])
    from pqk.backends.openvino_runtime import openvino_available
    from pqk.backends.torch_int8 import onednn_int8_available

    runtimes = ["onnxruntime"] + (["onednn"] if onednn_int8_available() else []) + (["openvino"] if openvino_available() else [])
    return QuantizedModel(Path(result["onnx_int8"]), runtimes, model, height, width, dict(result["record_fields"]))


def evaluate(model: torch.nn.Module | QuantizedModel, workload: str | Path | Any = "configs/workload.yaml", *,
             runtime: str = "onnxruntime", device: str = "cpu", exp_id: str = "P0_teacher_run1", combo: str = "teacher",
             repeats: int = 30, task: str | None = None):
    """Measure `model` (a network or a `QuantizedModel` on `runtime`) on the frozen workload with
    the protocol's one evaluation function; returns the `Evaluation` (`.record`, `.details`)."""
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.evaluate import evaluate as evaluate_once
    from pqk.tasks import get_task

    family = get_task(task)
    workload = family.load_workload(workload) if isinstance(workload, (str, Path)) else workload
    if isinstance(model, QuantizedModel):
        step = model.step_result(runtime)
    else:
        step = StepResult(model=model.eval(), artifact=None)
    return evaluate_once(step.model, workload, device=device, exp_id=exp_id, combo=combo, step=step,
                         options=EvalOptions(repeats=repeats), task=family)


def run_plan(path: str | Path, out: str | Path = "runs", *, budget: float | None = None, only: Sequence[str] | None = None,
             gate_policy: str | None = None, device: str = "cpu", repeats: int = 30,
             log: Callable[[str], None] = print) -> list:
    """Run a plan file as `pqk run` does (cached, resumable, gated; records in
    <out>/<plan name>/result_table.csv, manifest run.json); returns every experiment's status."""
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.plan import load_plan
    from pqk.pipeline.runner import PlanRunner

    plan = load_plan(path)
    if gate_policy is not None:
        plan = plan.with_gate_policy(gate_policy)
    if budget is not None:
        plan = plan.with_budget(budget)
    if only:
        plan = plan.select(list(only))
    return PlanRunner(plan, Path(out), device=device, log=log, eval_options=EvalOptions(repeats=repeats)).run()
