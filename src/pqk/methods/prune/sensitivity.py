"""The sensitivity trials: each unit alone loses a share of its heads/channels, applied by
masking weights (`masked`, exactly the effect of removal), and the quality drop on the
calibration pairs is recorded in a JSON-ready table."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict

import torch
import torch.nn as nn

from pqk.methods.prune.calibration import calibration_quality
from pqk.methods.prune.importance import least_important
from pqk.methods.prune.spec import SENSITIVITY_METRICS, PruneSpec
from pqk.methods.prune.units import Unit, _round_half_up, channel_indices, max_removable
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo


@contextlib.contextmanager
def masked(model: nn.Module, removals: Mapping[str, Sequence[int]], units: Mapping[str, Unit]) -> Iterator[None]:
    """Within the block, the model computes exactly what it computes once `removals` (unit name ->
    removed heads/channels) are pruned: a removed head's only path to the output is its columns
    of proj, an FFN channel's its column of fc2; zeroing those is removal (biases stay in both)."""
    saved = []
    try:
        with torch.no_grad():
            for name, removed in removals.items():
                if not len(removed):
                    continue
                module = model.get_submodule(name)
                out_layer = module.proj if units[name].kind == "heads" else module.fc2
                cols = torch.tensor(channel_indices(units[name], removed), dtype=torch.long)
                saved.append((out_layer.weight, cols, out_layer.weight[:, cols].clone()))
                out_layer.weight[:, cols] = 0.0
        yield
    finally:
        with torch.no_grad():
            for weight, cols, values in saved:
                weight[:, cols] = values


def relative_drop(new: float, ref: float, metric: str) -> float:
    """Positive = worse than the reference; the gates' definition, with 'loss' lower-is-better."""
    if metric != "loss":
        from pqk.measure.quality import quality_drop

        return quality_drop(new, ref, metric)
    if ref == 0:
        return 0.0 if new == ref else math.inf
    return (new - ref) / abs(ref)


def sensitivity_analysis(
    model: AsymmetricCroCo3DStereo,
    units: Sequence[Unit],
    scores: Mapping[str, torch.Tensor],
    calib: Sequence[dict],
    spec: PruneSpec,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Each unit alone loses each ratio of its heads/channels (least important first); the
    quality on the calibration pairs is measured. Returns the JSON-ready table."""
    by_name = {u.name: u for u in units}
    start = time.perf_counter()
    model.eval()
    base = calibration_quality(model, calib, spec.calibration.batch_size)
    rows = []
    for k, unit in enumerate(units):
        done = set()
        for ratio in spec.sensitivity_ratios:
            n = min(_round_half_up(ratio * unit.count), max_removable(unit, spec))
            if n <= 0 or n in done:
                continue
            done.add(n)
            removed = least_important(scores[unit.name], n)
            with masked(model, {unit.name: removed}, by_name):
                q = calibration_quality(model, calib, spec.calibration.batch_size)
            rows.append({
                "unit": unit.name, "kind": unit.kind, "ratio": ratio, "n_removed": n, "count": unit.count,
                "params_removed": n * unit.params_per, **q,
                "drop": {m: relative_drop(q[m], base[m], m) for m in SENSITIVITY_METRICS},
            })
        log(f"sensitivity {k + 1}/{len(units)} {unit.name}: "
            + ", ".join(f"-{r['n_removed']} {spec.sensitivity_metric} drop {r['drop'][spec.sensitivity_metric]:+.2%}"
                        for r in rows if r["unit"] == unit.name))
    return {
        "baseline": base,
        "metric": spec.sensitivity_metric,
        "ratios": spec.sensitivity_ratios,
        "importance": spec.importance,
        "calibration": asdict(spec.calibration),
        "units": [asdict(u) | {"prunable_params": u.prunable_params} for u in units],
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
