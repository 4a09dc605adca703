"""Latency of one pair at batch 1: warm-up excluded, many repeats, p50/p95."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_calls(call: Callable[[int], object], n_inputs: int, warmup: int = 3, repeats: int = 30,
               sync: Callable[[], None] | None = None) -> dict:
    """Time `call(k)` cycling over `n_inputs` inputs; returns ms percentiles and the samples."""
    for k in range(warmup):
        call(k % n_inputs)
    if sync:
        sync()
    samples = []
    for k in range(repeats):
        start = time.perf_counter()
        call(k % n_inputs)
        if sync:
            sync()
        samples.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(samples)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "repeats": repeats,
        "warmup": warmup,
        "samples_ms": [round(s, 3) for s in samples],
    }
