"""The report's budget-vs-quality section: when a plan runs the same steps at several budgets
(experiments with their own `budget:`, exp_id part `_bud<b>`), each such experiment's quality
against the device-hours it spent, with the teacher as a horizontal line, so a user can read
how much training a student needs before it reaches the teacher.

A record's budget is its plan experiment's `budget:` (else the plan's); records whose exp_id
differs only by the `_bud<b>` part are one curve. Drawn with two panels: the main metric and
the second quality field the family reports (DUSt3R: δ1 and AbsRel).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from pqk.pipeline.record import Record
from pqk.report.rundata import RunData, finite
from pqk.report.tables import Table

SECTION_TITLE = "Quality against training budget"
FIGURE = "budget_curve.png"
_TAG = re.compile(r"_bud\d+(?:p\d+)?(?=_run\d+$)")


def curve_key(exp_id: str) -> str:
    """The exp_id without its budget part: K_K1_bud0p5_run1 -> K_K1_run1."""
    return _TAG.sub("", exp_id)


def record_budget(data: RunData, rec: Record) -> float | None:
    """The budget `rec` was trained at: its plan experiment's own, else the plan's."""
    plan_budget = data.plan_raw.get("budget")
    exp = data.experiments.get(rec.exp_id)
    for raw in data.plan_raw.get("experiments") or []:
        if isinstance(raw, dict) and str(raw.get("id")) == exp and raw.get("budget") is not None:
            return float(raw["budget"])
    return float(plan_budget) if isinstance(plan_budget, (int, float)) and not isinstance(plan_budget, bool) else None


def budget_curves(data: RunData) -> dict[str, list[tuple[float, Record]]]:
    """curve key -> [(budget, record)] by budget, for the keys measured at two budgets or more."""
    groups: dict[str, dict[float, Record]] = {}
    for rec in data.records:
        if rec is data.teacher:
            continue
        budget = record_budget(data, rec)
        if budget is not None:
            groups.setdefault(curve_key(rec.exp_id), {})[budget] = rec
    return {k: sorted(v.items()) for k, v in groups.items() if len(v) >= 2}


def _metrics(data: RunData) -> list[str]:
    main = data.task.main_metric
    others = [f for f in data.task.quality_fields if f != main and f != "chamfer"]
    return [main, *others[:1]]


def plot_budget_curves(curves: dict[str, list[tuple[float, Record]]], teacher: Record | None, metrics: list[str],
                       path: Path) -> None:
    from pqk.report.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key, points in curves.items():
            xs = [finite(r.gpu_hours) for _, r in points]
            ys = [finite(getattr(r, metric)) for _, r in points]
            pts = [(x, y, b) for x, y, (b, _) in zip(xs, ys, points) if x is not None and y is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            for x, y, b in pts:
                ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ref = finite(getattr(teacher, metric)) if teacher is not None else None
        if ref is not None:
            ax.axhline(ref, color="k", linestyle="--", linewidth=1, label="teacher")
        ax.set_xlabel("device-hours spent (record's gpu_hours)")
        ax.set_ylabel(metric)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("quality against training budget (points labelled by budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_table(curves: dict[str, list[tuple[float, Record]]], teacher: Record | None, metrics: list[str]) -> Table:
    rows = []
    for key, points in curves.items():
        for budget, rec in points:
            row = [key, f"{budget:g}", rec.exp_id, "" if rec.gpu_hours is None else f"{rec.gpu_hours:.3g}"]
            for m in metrics:
                value, ref = finite(getattr(rec, m)), finite(getattr(teacher, m)) if teacher is not None else None
                row.append("" if value is None else f"{value:.4f}")
                row.append("" if value is None or not ref else f"{(value - ref) / ref:+.1%}")
            rows.append(row)
    headers = ["experiment", "budget", "exp_id", "device-h"]
    for m in metrics:
        headers += [m, f"{m} vs teacher"]
    return Table(headers, rows, [False, True, False, True] + [True, True] * len(metrics),
                 caption="Each experiment at every budget the plan ran it at; device-hours as recorded")


def budget_section(data: RunData, folder: Path, files: dict) -> tuple[str, str, str, list[str]] | None:
    """(markdown, latex, html, notes) of the section, or None when no experiment has two budgets."""
    curves = budget_curves(data)
    if not curves:
        return None
    metrics = _metrics(data)
    plot_budget_curves(curves, data.teacher, metrics, folder / FIGURE)
    files[FIGURE] = folder / FIGURE
    table = budget_table(curves, data.teacher, metrics)
    md = f"![budget curve]({FIGURE})\n\n" + table.markdown() + f"\n{table.caption}\n"
    from pqk.report.build import _img

    page = _img(folder / FIGURE, "budget curve") + table.html() + f"<p>{html.escape(table.caption)}</p>"
    return md, table.latex("tab:budget-curve"), page, []
