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


def interleaved_latency(calls: dict[str, Callable[[], object]], rounds: int = 10, warmup: int = 2,
                        reference: str | None = None) -> dict:
    """Time several variants of one call side by side: each round runs every variant once, so
    a slow spell of a shared machine hits them all alike. Returns per-variant p50/p95 (ms)
    and, when `reference` names a variant, each variant's speed-up over it (ratio of p50s)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, values in samples.items():
        arr = np.asarray(values)
        out[name] = {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
                     "p10_ms": float(np.percentile(arr, 10)), "p90_ms": float(np.percentile(arr, 90))}
    if reference is not None:
        ref = out[reference]["p50_ms"]
        for name in out:
            out[name]["speedup"] = ref / out[name]["p50_ms"] if out[name]["p50_ms"] > 0 else float("nan")
    return {"rounds": rounds, "warmup": warmup, "reference": reference, "variants": out}
