"""The task-adapter seam: what a model family (DUSt3R, CLIP, ...) is to the rest of pqk.

The pipeline (plans, the runner, `evaluate`, gates, records, the report, the budget) knows
models only through an adapter: how to build, load and save one, what its frozen workload is,
how its quality is measured and which quality columns its record has, which metric the gates
read and in which direction it improves, and an example input for export, FLOPs and latency.
A new family is one new adapter registered in `pqk.tasks`; nothing outside `models/` and its
adapter imports the family's own modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError


@dataclass
class Measurement:
    """What a family's measurement of one model on its workload found, before the record is
    assembled: quality columns, the timed inputs' latency, the family's own efficiency columns
    (e.g. DUSt3R's scene time), an example input for FLOPs, notes and the eval JSON's details."""

    quality: dict[str, float | None]
    latency: dict  # time_calls(...): p50_ms, p95_ms, mean_ms, samples
    efficiency: dict[str, float | None] = field(default_factory=dict)
    example: Any = None  # one input the model is called with (FLOPs are counted on it)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


class Task(ABC):
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str
    record_type: type  # the record dataclass: exp_id, combo, method fields, resources, quality, efficiency, ...
    quality_fields: tuple[str, ...]  # the record's quality columns
    higher_is_better: Mapping[str, bool]  # direction of every quality column
    main_metric: str  # the column the gates and the Pareto plot read by default
    latency_fields: Mapping[str, str]  # "p50_ms" / "p95_ms" / "per_sec" -> the record's column
    # How the family's records are shown: the report's results table (field, label), its LaTeX
    # subset, the plot label of each quality column, and the one-screen summary of `pqk run` /
    # `pqk eval` (field, label, format).
    result_columns: tuple[tuple[str, str], ...] = ()
    latex_columns: tuple[str, ...] = ()
    quality_labels: Mapping[str, str] = {}
    summary_columns: tuple[tuple[str, str, str], ...] = ()

    # -- models -----------------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, path: str | Path, device: str = "cpu") -> torch.nn.Module: ...

    @abstractmethod
    def save_model(self, model: torch.nn.Module, path: str | Path, history: list | None = None) -> Path: ...

    @abstractmethod
    def default_model(self, option: str = "--checkpoint") -> tuple[Path, str]:
        """The checkpoint used when the user names none, and the notice to print with it."""

    @abstractmethod
    def count_parameters(self, model: torch.nn.Module) -> int: ...

    # -- the frozen workload --------------------------------------------------------------------
    @abstractmethod
    def load_workload(self, path: str | Path) -> Any: ...

    @abstractmethod
    def load_data(self, workload: Any) -> Any:
        """The workload's data, checked against its frozen content hash (refused on mismatch)."""

    @abstractmethod
    def data_hash(self, workload: Any) -> str: ...

    @abstractmethod
    def input_shape(self, workload: Any) -> tuple[int, int]:
        """(height, width) of the workload's inputs: the static shape of exported models."""

    # -- measuring --------------------------------------------------------------------------------
    @abstractmethod
    def measure(self, model: torch.nn.Module | None, workload: Any, data: Any, *, backend: str, device: str,
                onnx_path: Path | None, runtime: str | None, warmup: int, repeats: int, threads: int | None,
                say: Callable[[str], None]) -> Measurement:
        """Quality on the workload, latency at batch 1, the family's efficiency figures."""

    @abstractmethod
    def gflops(self, model: torch.nn.Module, example: Any) -> float:
        """Counted FLOPs (1 MAC = 2) of one forward on `example`."""

    @abstractmethod
    def example_input(self, batch: int, height: int, width: int) -> tuple:
        """Positional arguments of one forward on random inputs (probes, export, FLOPs)."""

    @abstractmethod
    def evaluation_shape(self, workload_path: Path | None, notes: list[str]) -> dict:
        """What one evaluation of the workload costs, read without loading its data: `width`,
        `height` and `passes` (forward passes of batch 1) and `what` (a few words saying which)."""

    def deployed_megabytes(self, model: torch.nn.Module | None, artifact: Path | None) -> float | None:
        """Size on disk of what deploying the model takes: its saved artifact (a family whose
        files leave out weights read from elsewhere adds them here)."""
        from pqk.measure.resources import artifact_megabytes

        return artifact_megabytes(artifact)

    def detail_rows(self, details: dict) -> list[tuple[str, str, str]]:
        """Extra (group, field, value) rows `pqk eval` prints from the eval JSON's details (real
        check, trivial baselines)."""
        return []

    # -- shared helpers ---------------------------------------------------------------------------
    def direction(self, metric: str) -> bool:
        """True when a higher `metric` is better; one-line error for a column the family lacks."""
        if metric not in self.higher_is_better:
            raise ConfigError(f"unknown main metric {metric!r}; expected one of {', '.join(self.higher_is_better)}")
        return self.higher_is_better[metric]

    @property
    def record_fields(self) -> list[str]:
        from dataclasses import fields

        return [f.name for f in fields(self.record_type)]
