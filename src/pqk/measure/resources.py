"""Parameters, FLOPs, size on disk and peak memory."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_gflops(model: torch.nn.Module, view1: dict, view2: dict) -> float:
    """Counted matmul/conv FLOPs of one forward (1 MAC = 2 FLOPs), as the conformance tables."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(view1, view2)
    return counter.get_total_flops() / 1e9


def artifact_megabytes(path: str | Path | None) -> float | None:
    """Size on disk of a saved artifact (an ONNX file with external data counts its side file)."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return None
    files = [path]
    if path.name.endswith(".image.onnx"):  # a CLIP-family pair: the text tower is deployed too
        files.append(path.with_name(path.name.removesuffix(".image.onnx") + ".text.onnx"))
    total = 0
    for f in files:
        side = f.with_name(f.name + ".data")
        total += sum(p.stat().st_size for p in (f, side) if p.exists() and (p is f or f.suffix == ".onnx"))
    return total / 2**20


def peak_rss_megabytes() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cuda_peak_gigabytes(device: str | torch.device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


