"""Accuracy-driven keep-list (`pqk quantize --auto-keep`): keep in float the fewest layer
groups that bring INT8 within the quality gate, and only quantize groups where INT8 is
measured faster.

Groups are blocks: each encoder block, each decoder block of either branch, the decoder
embedding, each head. For every group the PTQ model is probed on the oneDNN runtime (the same
integers as the QDQ file) with that one group back in float:

- sensitivity = how much of the quality drop it recovers (δ1 on held-out generated pairs at the
  workload's shape, never the workload's pairs);
- speed gain = how much slower the pair gets with it in float, timed interleaved with the
  all-INT8 model.

Groups whose INT8 form is not faster go to float outright. Then, while the all-INT8 model
misses the gate, the group with the largest recovered quality per millisecond given up goes
to float. The chosen groups become PTQ's `float_modules`, and the result is reported beside
the probe table.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pqk.backends.torch_int8 import int8_model_from_qdq, qdq_linear_params
from pqk.measure.latency import interleaved_latency
from pqk.measure.quality import quality_drop


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Block-level groups of Linear module paths, in network order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        groups[key].append(name)
    return dict(groups)


def _delta1(model: nn.Module, examples: list[dict]) -> float:
    from pqk.train.teacher import validate

    return float(validate(model, examples, batch_size=2)["delta1"])


def probe_groups(
    float_model: nn.Module, qdq_path: str | Path, examples: list[dict], timing_pair: tuple[dict, dict],
    rounds: int = 5, log: Callable[[str], None] = print,
) -> dict:
    """Quality and speed of the all-INT8 model and of each group left float (see module doc)."""
    linears = {n for n, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    params = qdq_linear_params(qdq_path, linears)
    groups = {g: names for g, names in layer_groups(float_model).items() if any(n in params for n in names)}
    float_model = float_model.eval()
    ref = _delta1(float_model, examples)
    all_int8, _ = int8_model_from_qdq(float_model, qdq_path, params=params)
    base = _delta1(all_int8, examples)
    view1, view2 = timing_pair
    table = {}
    for k, (group, names) in enumerate(groups.items()):
        log(f"auto-keep: probing {group} ({k + 1}/{len(groups)})")
        probe, _ = int8_model_from_qdq(float_model, qdq_path, float_modules=names, params=params)
        quality = _delta1(probe, examples)

        def run(m=probe):
            with torch.inference_mode():
                m(view1, view2)

        def run_all():
            with torch.inference_mode():
                all_int8(view1, view2)

        timing = interleaved_latency({"int8": run_all, "float_group": run}, rounds=rounds, warmup=1)["variants"]
        table[group] = {
            "linears": len(names),
            "delta1": quality,
            "recovered": quality - base,
            "int8_gain_ms": timing["float_group"]["p50_ms"] - timing["int8"]["p50_ms"],
        }
    return {"reference_delta1": ref, "int8_delta1": base, "groups": table}


def choose_float_groups(probes: dict, max_drop: float = 0.01) -> tuple[list[str], list[str]]:
    """(groups kept in float, why each was chosen), from `probe_groups`' table."""
    ref, current = probes["reference_delta1"], probes["int8_delta1"]
    chosen, reasons = [], []
    for group, row in probes["groups"].items():
        if row["int8_gain_ms"] <= 0:
            chosen.append(group)
            reasons.append(f"{group}: INT8 not faster ({row['int8_gain_ms']:+.1f} ms)")
            current += max(row["recovered"], 0.0)
    ranked = sorted(
        (g for g in probes["groups"] if g not in chosen and probes["groups"][g]["recovered"] > 0),
        key=lambda g: probes["groups"][g]["recovered"] / max(probes["groups"][g]["int8_gain_ms"], 1e-3),
        reverse=True,
    )
    # Recoveries are measured one group at a time; adding them up is the usual first-order
    # estimate, and the final PTQ model is measured by `evaluate` anyway.
    for group in ranked:
        if quality_drop(current, ref, "delta1") <= max_drop:
            break
        row = probes["groups"][group]
        chosen.append(group)
        current += row["recovered"]
        reasons.append(f"{group}: recovers δ1 {row['recovered']:+.4f} for {row['int8_gain_ms']:.1f} ms")
    return chosen, reasons


def float_modules_of(model: nn.Module, groups: list[str]) -> list[str]:
    by_group = layer_groups(model)
    return [name for g in groups for name in by_group.get(g, [])]
