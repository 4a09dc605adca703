"""Allocation of the cut: how many heads / channels each unit loses so that ρ of the prunable
parameters go, uniformly or cheapest measured drop first (sensitivity)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pqk.errors import ConfigError
from pqk.methods.prune.spec import ALLOCATIONS, PruneSpec, check_choice, check_rho
from pqk.methods.prune.units import Unit, _round_half_up, max_removable, total_prunable


def allocate_uniform(units: Sequence[Unit], rho: float, spec: PruneSpec) -> dict[str, int]:
    """ρ of every unit: whole heads by rounding, the rounding error made up in the FFN widths
    (the same share of each), so the total removed is ρ of the prunable parameters."""
    target = rho * total_prunable(units)
    out: dict[str, int] = {}
    floor = {u.name: (spec.min_heads if u.kind == "heads" else 1) for u in units}
    for u in units:
        if u.kind == "heads":
            out[u.name] = min(_round_half_up(rho * u.count), u.count - floor[u.name])
    head_removed = sum(out[u.name] * u.params_per for u in units if u.kind == "heads")
    ffn = [u for u in units if u.kind == "ffn"]
    ffn_total = sum(u.prunable_params for u in ffn)
    share = min(1.0, max(0.0, (target - head_removed) / ffn_total)) if ffn_total else 0.0
    for u in ffn:
        out[u.name] = min(_round_half_up(share * u.count), u.count - floor[u.name])
    return out


def _lower_hull(points: list[tuple]) -> list[tuple]:
    """Lower convex hull of (params, n, drop, ...) from (0, 0, 0, ...), in params order: the
    steps a cost-per-parameter greedy may take in sequence."""
    pts = sorted(points)
    hull: list[tuple] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, _, y1, *_), (x2, _, y2, *_) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment hull[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[2] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_sensitivity(units: Sequence[Unit], rho: float, table: Mapping, spec: PruneSpec) -> dict[str, int]:
    """Remove ρ of the prunable parameters where the measured drop per removed parameter is
    lowest: each unit's curve is reduced to its lower convex hull, the segments are taken
    cheapest first; an FFN segment may be taken in part (any channel count), a head segment only
    whole; a head step that would overshoot ρ is skipped, with its unit's later steps, while FFN
    steps remain.

    A drop counts as at least `spec.sensitivity_floor` x the share of the unit removed. Without
    the floor, units whose trials measured a small gain (noise on a few pairs) cost nothing and
    are cut to the maximum first; their damage together is not the sum of their single-unit
    drops (teacher, ρ = 0.1, held-out validation pairs: δ1 0.65 without the floor, 0.76 with 1%).
    Equal costs are ordered by the drop as measured."""
    metric = table["metric"]
    by_name = {u.name: u for u in units}
    floor = float(spec.sensitivity_floor)
    # (params removed, heads/channels removed, drop used, drop as measured)
    curves: dict[str, list[tuple[int, int, float, float]]] = {u.name: [(0, 0, 0.0, 0.0)] for u in units}
    for row in table["rows"]:
        if row["unit"] in curves:
            drop, n = float(row["drop"][metric]), int(row["n_removed"])
            used = max(drop, floor * n / by_name[row["unit"]].count)
            curves[row["unit"]].append((int(row["params_removed"]), n, used, drop))
    missing = [u.name for u in units if len(curves[u.name]) == 1 and max_removable(u, spec) > 0]
    if missing:
        raise ConfigError(f"the sensitivity table has no rows for {', '.join(missing[:3])}; recompute it for this model")
    segments = []
    for name, pts in curves.items():
        hull = _lower_hull(pts)
        for order, (a, b) in enumerate(zip(hull, hull[1:])):
            span = max(1, b[0] - a[0])
            segments.append(((b[2] - a[2]) / span, (b[3] - a[3]) / span, order, name, a, b))
    segments.sort(key=lambda s: s[:4])
    target = rho * total_prunable(units)
    removed_params = 0.0
    out = {u.name: 0 for u in units}
    closed: set[str] = set()
    has_ffn_after = [any(by_name[s[3]].kind == "ffn" for s in segments[k + 1:]) for k in range(len(segments))]
    for k, (_, _, _, name, a, b) in enumerate(segments):
        if removed_params >= target:
            break
        if name in closed or out[name] != a[1]:
            continue  # an earlier step of this unit was skipped
        unit = by_name[name]
        need = target - removed_params
        gain = (b[1] - a[1]) * unit.params_per
        if gain <= need:
            out[name] = b[1]
            removed_params += gain
        elif unit.kind == "ffn":
            out[name] = a[1] + math.ceil(need / unit.params_per)
            removed_params += (out[name] - a[1]) * unit.params_per
        elif has_ffn_after[k]:
            closed.add(name)  # a whole head would overshoot: let FFN channels make up the rest
        else:
            out[name] = b[1]
            removed_params += gain
    return out


def allocate(units: Sequence[Unit], rho: float, spec: PruneSpec, table: Mapping | None = None) -> dict[str, int]:
    """Heads / channels to remove per unit so that ρ of the prunable parameters go."""
    rho = check_rho(rho)
    check_choice("allocation", spec.allocation, ALLOCATIONS)
    if spec.allocation == "uniform":
        return allocate_uniform(units, rho, spec)
    if table is None:
        raise ConfigError("allocation 'sensitivity' needs a sensitivity table (sensitivity_analysis)")
    return allocate_sensitivity(units, rho, table, spec)
