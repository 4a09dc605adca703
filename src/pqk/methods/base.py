"""The seam between methods and the plan runner (architecture.md, "The one flow").

A method step takes a model and a `StepContext` and returns a `StepResult`: the new model,
the artifact it saved, and its slice of the record. Distillation, pruning and quantization
all have this shape, so the runner composes them (P→K→Q) without knowing which is which, and
each CLI command is "run one step, then `evaluate`".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pqk.pipeline.workload import Workload


@dataclass
class StepContext:
    teacher: torch.nn.Module  # the FP32 reference (P0 teacher): distillation target, gate reference
    workload: Workload  # the frozen evaluation workload (never trained or calibrated on)
    out_dir: Path  # this step's folder: checkpoints, logs, artifacts
    device: str = "cpu"
    budget: float = 1.0  # multiplies epochs / steps / calibration size (embedded default < 1)
    seed: int = 42
    resume: bool = True  # continue from the step's own last checkpoint when present
    log: Callable[[str], None] = print


@dataclass
class StepResult:
    model: torch.nn.Module | None  # the PyTorch model after the step (None: only an ONNX artifact)
    artifact: Path  # the saved model file whose size is reported
    fields: dict = field(default_factory=dict)  # record slice: rho, T, beta, gamma, bits_w, bits_a, keep_list
    device_hours: float = 0.0  # wall time the step spent on its device
    backend: str = "torch"  # how `evaluate` should run the artifact
    onnx_path: Path | None = None  # the deployed ONNX model, for backend "onnxruntime"
    notes: list[str] = field(default_factory=list)
    count_model: torch.nn.Module | None = None  # float model counted for params/FLOPs (quantized steps)
    runtime: str | None = None  # names a non-default torch runtime for the record (e.g. oneDNN INT8)
    details: dict = field(default_factory=dict)  # method-specific figures for the eval JSON
