"""README's K budget curve (benchmarks/results/budget_curve_k.png) from the measured points in
benchmarks/results/budget_curve_k.json, drawn by the report's own plot (pqk.report.budget_curve).

The points come from several `pqk run configs/plans/budget_curve.yaml --only ...` runs (the JSON
names each run and its date); one run folder rarely holds them all, so the report of a single
run draws only its own points.

    python experiments/budget_curve_figure.py
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pqk.report.budget_curve import plot_budget_curves

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> int:
    data = json.loads((RESULTS / "budget_curve_k.json").read_text())
    curves: dict[str, list] = {}
    for point in data["points"]:
        record = SimpleNamespace(gpu_hours=point["device_h"], delta1=point["delta1"], absrel=point["absrel"])
        curves.setdefault(point["curve"], []).append((point["budget"], record))
    teacher = SimpleNamespace(**data["teacher"])
    plot_budget_curves({k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}, teacher, ["delta1", "absrel"],
                       RESULTS / "budget_curve_k.png")
    print(f"wrote {RESULTS / 'budget_curve_k.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
