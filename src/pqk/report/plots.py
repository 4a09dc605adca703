"""The report's two figures: quality against latency with the Pareto front, and each
experiment's resources relative to the teacher. Matplotlib with the Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pqk.pipeline.record import Record
from pqk.report.rundata import finite

RESOURCE_FIELDS = (("params_M", "parameters"), ("flops_G", "FLOPs / input"), ("size_MB", "size on disk"))


def _p50(task) -> str:
    """The record column of the family's main latency (DUSt3R: t_pair_p50_ms)."""
    from pqk.tasks import get_task

    return (task or get_task()).latency_fields["p50_ms"]


def stage_fields(task=None) -> tuple[tuple[str, str], ...]:
    return (*RESOURCE_FIELDS, (_p50(task), "latency p50"))


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates, in order of latency.

    A point is (latency, quality); lower latency is better, quality is better when higher
    (`higher_is_better`) or lower. `a` dominates `b` when it is at least as good in both and
    strictly better in one; equal points do not dominate each other (both stay)."""

    def better_or_equal(qa: float, qb: float) -> bool:
        return qa >= qb if higher_is_better else qa <= qb

    front = []
    for i, (ti, qi) in enumerate(points):
        dominated = any(
            tj <= ti and better_or_equal(qj, qi) and (tj < ti or qj != qi)
            for j, (tj, qj) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], i))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never look for a display
    import matplotlib.pyplot as plt

    return plt


def quality_points(records: Sequence[Record], metric: str, task=None) -> list[tuple[Record, float, float]]:
    """(record, latency p50, quality) for every record that has both, finite."""
    out = []
    for rec in records:
        t, q = finite(getattr(rec, _p50(task))), finite(getattr(rec, metric))
        if t is not None and q is not None:
            out.append((rec, t, q))
    return out


def plot_pareto(records: Sequence[Record], teacher: Record | None, metric: str, path: Path,
                higher: bool = True, task=None) -> dict:
    """pareto.png: quality vs t_pair_p50_ms, marker area ∝ size_MB, labelled by exp_id, the teacher
    as a reference (star and dashed lines), the Pareto front joined and ringed. Returns what
    was plotted (front exp_ids, metric, skipped records). `higher`: the metric's direction."""
    plt = _pyplot()
    pts = quality_points(records, metric, task)
    skipped = [r.exp_id for r in records if r not in [p[0] for p in pts]]
    front = [pts[i][0].exp_id for i in pareto_front([(t, q) for _, t, q in pts], higher)]
    sizes = [finite(r.size_MB) for r, _, _ in pts]
    biggest = max([s for s in sizes if s is not None], default=1.0) or 1.0

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    if teacher is not None and finite(getattr(teacher, metric)) is not None:
        ax.axhline(float(getattr(teacher, metric)), color="0.55", ls="--", lw=1, zorder=1)
    if teacher is not None and finite(getattr(teacher, _p50(task))) is not None:
        ax.axvline(float(getattr(teacher, _p50(task))), color="0.55", ls=":", lw=1, zorder=1)
    on_front = sorted((t, q) for r, t, q in pts if r.exp_id in front)
    if len(on_front) > 1:
        # The front as a staircase: what the best model at each latency budget achieves.
        ax.step([t for t, _ in on_front], [q for _, q in on_front], where="post", color="tab:red", lw=1.5,
                alpha=0.8, zorder=2, label="Pareto front")
    for (rec, t, q), size in zip(pts, sizes):
        area = 60 + 500 * ((size or 0.0) / biggest)
        is_teacher = teacher is not None and rec.exp_id == teacher.exp_id
        ax.scatter([t], [q], s=area * (1.6 if is_teacher else 1.0), marker="*" if is_teacher else "o",
                   color="0.3" if is_teacher else "tab:blue", alpha=0.75,
                   edgecolors="tab:red" if rec.exp_id in front else "white", linewidths=2 if rec.exp_id in front else 0.8,
                   zorder=3)
        label = rec.exp_id + (" (teacher)" if is_teacher else "") + (f", {size:.3g} MB" if size is not None else "")
        ax.annotate(label, (t, q), textcoords="offset points", xytext=(7, 6), fontsize=8)
    ax.set_xlabel("pair latency p50 (ms, batch 1) — lower is better")
    from pqk.tasks import get_task

    label = (task or get_task()).quality_labels.get(metric, metric)
    ax.set_ylabel(f"{label} — {'higher' if higher else 'lower'} is better")
    ax.set_title(f"Quality vs latency ({metric}); marker area ∝ size on disk; ringed red = Pareto front")
    ax.grid(alpha=0.3)
    if len(on_front) > 1:
        ax.legend(loc="best", fontsize=8)
    if not pts:
        ax.text(0.5, 0.5, "no record has both latency and quality", ha="center", va="center", transform=ax.transAxes)
    ax.margins(x=0.15, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"metric": metric, "front": front, "skipped": skipped}


def relative_resources(records: Sequence[Record], teacher: Record, task=None) -> dict[str, dict[str, float | None]]:
    """exp_id -> {field: value / teacher's value} for the stage fields (None when unknown)."""
    out = {}
    for rec in records:
        rel = {}
        for key, _ in stage_fields(task):
            v, ref = finite(getattr(rec, key)), finite(getattr(teacher, key))
            rel[key] = None if v is None or not ref else v / ref
        out[rec.exp_id] = rel
    return out


def plot_stages(records: Sequence[Record], teacher: Record, path: Path, task=None) -> dict:
    """stages.png: per experiment, bars for params, FLOPs, size and p50 latency relative to the
    teacher (= 1.0, the dashed line). Returns the plotted ratios."""
    plt = _pyplot()
    others = [r for r in records if r.exp_id != teacher.exp_id]
    rel = relative_resources(others, teacher, task)
    fields = stage_fields(task)
    n = max(1, len(others))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * n + 3), 4.8), dpi=110)
    width = 0.8 / len(fields)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
    for k, ((key, label), color) in enumerate(zip(fields, colors)):
        xs = [i + (k - (len(fields) - 1) / 2) * width for i in range(len(others))]
        ys = [rel[r.exp_id][key] for r in others]
        bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                      label=label, color=color)
        for bar in bars:
            ax.annotate(f"{bar.get_height():.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.axhline(1.0, color="0.3", ls="--", lw=1)
    ax.text(len(others) - 0.5 if others else 0.5, 1.0, f"teacher {teacher.exp_id} = 1.0", va="bottom", ha="right", fontsize=8, color="0.3")
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels([r.exp_id for r in others], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("relative to the teacher")
    ax.set_title("Resources per experiment, relative to the teacher (lower is lighter)")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.grid(axis="y", alpha=0.3)
    if not others:
        ax.text(0.5, 0.5, "no experiment besides the teacher yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return rel
