"""DUSt3R as a pqk task: pairwise 3D reconstruction (two images in, two pointmaps out),
measured by depth (AbsRel, RMSE, δ1) on the frozen pair sample and Chamfer distance on the
scene-level reconstructions, with the protocol's 25-field record (protocol.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pqk.pipeline.record import Record
from pqk.tasks.base import Measurement, Task


class Dust3rTask(Task):
    name = "dust3r"
    record_type = Record
    quality_fields = ("chamfer", "absrel", "rmse", "delta1")
    higher_is_better = {"delta1": True, "absrel": False, "rmse": False, "chamfer": False}
    main_metric = "delta1"
    latency_fields = {"p50_ms": "t_pair_p50_ms", "p95_ms": "t_pair_p95_ms", "per_sec": "pairs_per_sec"}
    result_columns = (
        ("exp_id", "exp_id"), ("combo", "combo"), ("rho", "ρ"), ("T", "T"), ("beta", "β"), ("gamma", "γ"),
        ("bits", "bits W/A"), ("params_M", "params (M)"), ("flops_G", "GFLOPs"), ("size_MB", "size (MB)"),
        ("vram_GB", "VRAM (GB)"), ("absrel", "AbsRel ↓"), ("delta1", "δ1 ↑"), ("rmse", "RMSE ↓"), ("chamfer", "Chamfer ↓"),
        ("t_pair_p50_ms", "p50 (ms)"), ("t_pair_p95_ms", "p95 (ms)"), ("pairs_per_sec", "pairs/s"),
        ("t_scene_s", "t_scene (s)"), ("gpu_hours", "GPU-h"),
    )
    latex_columns = ("exp_id", "combo", "params_M", "flops_G", "size_MB", "absrel", "delta1", "chamfer",
                     "t_pair_p50_ms", "pairs_per_sec", "gpu_hours")
    quality_labels = {"delta1": "δ1 (share of pixels within 1.25×)", "absrel": "AbsRel", "rmse": "RMSE",
                      "chamfer": "Chamfer distance"}
    summary_columns = (("delta1", "δ1", ".4f"), ("absrel", "absrel", ".4f"), ("t_pair_p50_ms", "p50 ms", ".1f"),
                       ("params_M", "params M", ".2f"))

    def load_model(self, path: str | Path, device: str = "cpu") -> torch.nn.Module:
        from pqk.models.dust3r import load_checkpoint

        return load_checkpoint(path, device=device)

    def save_model(self, model: torch.nn.Module, path: str | Path, history: list | None = None) -> Path:
        from pqk.models.dust3r import save_model

        return save_model(model, path, history=history)

    def default_model(self, option: str = "--checkpoint") -> tuple[Path, str]:
        from pqk.assets import default_checkpoint

        return default_checkpoint(option)

    def count_parameters(self, model: torch.nn.Module) -> int:
        from pqk.models.dust3r import count_parameters

        return count_parameters(model)

    def load_workload(self, path: str | Path) -> Any:
        from pqk.tasks.dust3r.workload import load_workload

        return load_workload(Path(path))

    def load_data(self, workload: Any) -> dict:
        from pqk.tasks.dust3r.workload import load_scenes

        return load_scenes(workload)

    def data_hash(self, workload: Any) -> str:
        # The arrays and which pairs of them are measured: either changing invalidates a cache.
        return workload.data_hash + (f":{workload.pairs_hash}" if workload.pairs_hash else "")

    def input_shape(self, workload: Any) -> tuple[int, int]:
        """(height, width) of the workload's generated views (4:3 landscape when the data is a
        folder: the generated scenes' aspect at the workload's resolution)."""
        data = workload.data or {}
        if "width" in data and "height" in data:
            return int(data["height"]), int(data["width"])
        res = int(workload.resolution)
        return res * 3 // 4, res

    def measure(self, model: torch.nn.Module | None, workload: Any, data: Any, *, backend: str, device: str,
                onnx_path: Path | None, runtime: str | None, warmup: int, repeats: int, threads: int | None,
                say: Callable[[str], None]) -> Measurement:
        from pqk.tasks.dust3r.measure import measure

        return measure(model, workload, data, backend=backend, device=device, onnx_path=onnx_path, runtime=runtime,
                       warmup=warmup, repeats=repeats, threads=threads, say=say)

    def gflops(self, model: torch.nn.Module, example: Any) -> float:
        from pqk.measure.resources import forward_gflops

        view1, view2 = example
        return forward_gflops(model, view1, view2)

    def example_input(self, batch: int, height: int, width: int) -> tuple:
        gen = torch.Generator().manual_seed(0)
        shape = torch.tensor([[height, width]] * batch, dtype=torch.int32)
        return ({"img": torch.randn(batch, 3, height, width, generator=gen), "true_shape": shape},
                {"img": torch.randn(batch, 3, height, width, generator=gen), "true_shape": shape.clone()})

    def detail_rows(self, details: dict) -> list[tuple[str, str, str]]:
        rows = []
        real = details.get("real_check_motorcycle")
        if real:
            rows.append(("real check", "motorcycle absrel / delta1", f"{real['absrel']:.4f} / {real['delta1']:.4f}"))
        for group, key in (("baseline", "baselines"), ("real baseline", "baselines_motorcycle")):
            for name, base in (details.get(key) or {}).items():
                rows.append((group, f"{name} absrel / delta1", f"{base['absrel']:.4f} / {base['delta1']:.4f}"))
        return rows

    def evaluation_shape(self, workload_path: Path | None, notes: list[str]) -> dict:
        from pqk.tasks.dust3r.workload import evaluation_shape

        return evaluation_shape(workload_path, notes)


TASK = Dust3rTask()
