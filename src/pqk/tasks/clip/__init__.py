"""CLIP-style image–text dual encoders as a pqk task: retrieval (R@1/5/10 both ways and their
mean), zero-shot classification and VQA on the frozen caption workload, latency per image and
per text, with the family's own record (`ClipRecord`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pqk.tasks.base import Measurement, Task
from pqk.tasks.clip.record import ClipRecord

QUALITY = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean",
           "zs_top1", "zs_top5", "vqa_acc", "vqa_yesno", "vqa_number", "vqa_other")
DEFAULT_WORKLOAD = "configs/workload_clip.yaml"


class ClipTask(Task):
    name = "clip"
    record_type = ClipRecord
    quality_fields = QUALITY
    higher_is_better = dict.fromkeys(QUALITY, True)
    main_metric = "r_mean"
    latency_fields = {"p50_ms": "t_image_p50_ms", "p95_ms": "t_image_p95_ms", "per_sec": "images_per_sec"}
    default_workload = DEFAULT_WORKLOAD
    result_columns = (
        ("exp_id", "exp_id"), ("combo", "combo"), ("rho", "ρ"), ("T", "T"), ("bits", "bits W/A"),
        ("params_M", "params (M)"), ("flops_G", "GFLOPs"), ("size_MB", "size (MB)"),
        ("r1_i2t", "R@1 i→t"), ("r5_i2t", "R@5 i→t"), ("r10_i2t", "R@10 i→t"), ("r1_t2i", "R@1 t→i"),
        ("r5_t2i", "R@5 t→i"), ("r10_t2i", "R@10 t→i"), ("r_mean", "R mean ↑"), ("zs_top1", "ZS top-1"),
        ("zs_top5", "ZS top-5"), ("vqa_acc", "VQA"), ("t_image_p50_ms", "image p50 (ms)"),
        ("t_text_p50_ms", "text p50 (ms)"), ("images_per_sec", "images/s"), ("gpu_hours", "GPU-h"),
    )
    latex_columns = ("exp_id", "combo", "params_M", "flops_G", "size_MB", "r1_i2t", "r1_t2i", "r_mean", "zs_top1",
                     "vqa_acc", "t_image_p50_ms", "gpu_hours")
    quality_labels = {"r_mean": "mean of R@1/5/10 both ways", "r1_i2t": "R@1 image→text", "r1_t2i": "R@1 text→image",
                      "zs_top1": "zero-shot top-1", "vqa_acc": "VQA accuracy"}
    # What a one-screen summary shows (column, label, format): `pqk eval`, `pqk run`'s table.
    summary_columns = (("r_mean", "R mean", ".4f"), ("zs_top1", "ZS top-1", ".4f"), ("t_image_p50_ms", "img p50 ms", ".2f"),
                       ("params_M", "params M", ".2f"))

    def load_model(self, path: str | Path, device: str = "cpu") -> torch.nn.Module:
        from pqk.models.clip.family import load_family_model

        return load_family_model(path, device=device)

    def save_model(self, model: torch.nn.Module, path: str | Path, history: list | None = None) -> Path:
        from pqk.models.clip.family import save_family_model

        return save_family_model(model, path, history=history)

    def default_model(self, option: str = "--checkpoint") -> tuple[Path, str]:
        from pqk.assets import default_clip_checkpoint

        return default_clip_checkpoint(option)

    def count_parameters(self, model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def load_workload(self, path: str | Path) -> Any:
        from pqk.tasks.clip.workload import load_workload

        return load_workload(Path(path))

    def load_data(self, workload: Any) -> dict:
        from pqk.tasks.clip.workload import load_sets

        return load_sets(workload)

    def data_hash(self, workload: Any) -> str:
        return workload.data_hash

    def input_shape(self, workload: Any) -> tuple[int, int]:
        return int(workload.image_size), int(workload.image_size)

    def measure(self, model: torch.nn.Module | None, workload: Any, data: Any, *, backend: str, device: str,
                onnx_path: Path | None, runtime: str | None, warmup: int, repeats: int, threads: int | None,
                say: Callable[[str], None]) -> Measurement:
        from pqk.tasks.clip.measure import measure

        return measure(model, workload, data, backend=backend, device=device, onnx_path=onnx_path, runtime=runtime,
                       warmup=warmup, repeats=repeats, threads=threads, say=say)

    def gflops(self, model: torch.nn.Module, example: Any) -> float:
        """One image through the image tower plus one caption through the text tower."""
        from torch.utils.flop_counter import FlopCounterMode

        image, text = example
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.encode_image(image)
            model.encode_text(text)
        return counter.get_total_flops() / 1e9

    def example_input(self, batch: int, height: int, width: int) -> tuple:
        """(image, text ids) of the bundled teacher's shapes; models take their own tokens, so the
        ids are zeros with SOT/EOT-free content (only shapes and FLOPs use them)."""
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, height, width, generator=gen), torch.zeros(batch, 32, dtype=torch.long))

    def deployed_megabytes(self, model: torch.nn.Module | None, artifact: Path | None) -> float | None:
        """The artifact, plus the locked MiniLM weights a LiT model's file refers to (deploying it
        takes both; counting only the trained part would flatter the teacher by 87 MB)."""
        from pqk.measure.resources import artifact_megabytes
        from pqk.models.clip.lit import LiTCLIP

        size = artifact_megabytes(artifact)
        if size is not None and isinstance(model, LiTCLIP) and str(artifact).endswith(".safetensors"):
            from pqk.models.minilm import minilm_files

            size += artifact_megabytes(minilm_files() / "model.safetensors")
        return size

    def detail_rows(self, details: dict) -> list[tuple[str, str, str]]:
        def figures(q: dict) -> str:
            return " / ".join("—" if q.get(k) is None else f"{q[k]:.3f}" for k in ("r_mean", "r1_i2t", "zs_top1", "vqa_acc"))

        label = "R mean / R@1 i→t / ZS top-1 / VQA"
        rows = [("real check", f"{name}: {label}", figures(q)) for name, q in (details.get("real_check") or {}).items()]
        for set_name, baselines in (details.get("baselines") or {}).items():
            for name, q in baselines.items():
                rows.append(("baseline", f"{set_name} {name}: {label}", figures(q)))
        return rows

    def evaluation_shape(self, workload_path: Path | None, notes: list[str]) -> dict:
        from pqk.tasks.clip.workload import evaluation_shape

        return evaluation_shape(workload_path, notes)


TASK = ClipTask()
