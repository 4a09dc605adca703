"""`pqk report RUN_DIR`: tables, figures and one self-contained HTML page for a plan's run.

Writes into RUN_DIR/report/:
- results.md  — every table below in Markdown (figures linked), full CSV linked;
- results.tex — the results and gate tables as LaTeX booktabs tables;
- pareto.png  — quality vs pair latency, marker area ∝ size, Pareto front, teacher reference;
- budget_curve.png — quality against device-hours when the plan runs an experiment at several
  budgets (pqk.report.budget_curve);
- stages.png  — params, FLOPs, size and p50 latency per experiment relative to the teacher;
- report.html — all of it on one page: images as base64 data URIs, no external asset;
- budget_estimate.json — the `pqk budget` figures the budget table used (reused next time
  while the plan, device, rate and budget are the same);
- fig3-fig6 PNGs and a CMAPKD section (seed 004's Tables 2-5) when the run has cmapkd records
  (pqk.report.cmapkd);
- scene_scale.png and a scene-scale section when RUN_DIR holds scene_scale.json (or
  `scene_scale` names one): benchmarks/scene_scale.py's growth curves, cache and cascade
  (pqk.report.scene_scale);
- the accelerations' measured ROI table (seed 003) when the plan has attn8, rotate or teal
  steps, with full-size speed from `benchmarks` (default benchmarks/results; pqk.report.accel_roi).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pqk.errors import InputError
from pqk.pipeline.record import Record, atomic_write_text, ensure_writable_dir, write_json
from pqk.report.accel_roi import SECTION_TITLE as ACCEL_TITLE, accel_section, has_accel_records
from pqk.report.budget_curve import SECTION_TITLE as BUDGET_CURVE_TITLE, budget_section
from pqk.report.cmapkd import SECTION_TITLE as CMAPKD_TITLE, cmapkd_section
from pqk.report.scene_scale import FILE_NAME as SCENE_SCALE_FILE
from pqk.report.scene_scale import SECTION_TITLE as SCENE_SCALE_TITLE
from pqk.report.scene_scale import load_scene_scale, scene_scale_section
from pqk.report.plots import plot_pareto, plot_stages
from pqk.report.rundata import REPORT_DIR, Gate, RunData, finite, load_run
from pqk.report.tables import Table, fmt, fmt_pct, full_table, results_table

ESTIMATE_FILE = "budget_estimate.json"


@dataclass
class Report:
    folder: Path
    files: dict[str, Path]
    pareto: dict
    gates: list[Gate]
    notes: list[str] = field(default_factory=list)


# --- the tables ---------------------------------------------------------------------------------


def gate_table(data: RunData) -> Table:
    rows = []
    for g in data.gates():
        f = g.figures
        size_cut = max((c for c in (f.get("params_cut"), f.get("size_cut")) if isinstance(c, (int, float))), default=None)
        rows.append([g.exp_id or "—", g.experiment or data.experiments.get(g.exp_id, "—"), g.stage or "—", g.verdict, g.reference or "—",
                     fmt_pct(f.get("quality_drop")), fmt_pct(f.get("latency_cut")), fmt_pct(size_cut),
                     "; ".join(g.reasons) or "—"])
    return Table(["exp_id", "experiment", "stage", "verdict", "reference", "quality drop", "latency cut", "size cut",
                  "reasons"], rows, [False, False, False, False, False, True, True, True, False],
                 caption="Gate verdicts (protocol stop-loss): drop of the main metric vs the reference, p50 and size cuts")


_JOINT_FIELDS = [("params_M", "params (M)"), ("size_MB", "size (MB)"), ("t_pair_p50_ms", "p50 (ms)"),
                 ("absrel", "AbsRel ↓"), ("delta1", "δ1 ↑"), ("chamfer", "Chamfer ↓"), ("gpu_hours", "GPU-h")]


def joint_table(records: list[Record]) -> Table | None:
    """Joint PQK (one training run) beside the sequential paths, when the run has both: P→K→Q
    (ρ applied to the teacher, so it ends larger) and K→P→Q (ρ applied to the student, the
    matched comparison: the same final architecture as joint)."""
    joint = [r for r in records if r.combo == "PQK" and "_FP32" not in r.exp_id]
    sequential = [r for r in records if r.combo == "PKQ"]
    matched = [r for r in records if r.combo == "KPQ"]
    if not joint or not (sequential or matched):
        return None
    groups = (("joint (1 run)", joint), ("sequential P→K→Q (ρ on the teacher)", sequential),
              ("sequential K→P→Q (ρ on the student: matched)", matched))
    rows = [[r.exp_id, label, *(fmt(getattr(r, k)) for k, _ in _JOINT_FIELDS)] for label, group in groups for r in group]
    j = joint[0]
    for label, group in (("joint − P→K→Q", sequential), ("joint − K→P→Q", matched)):
        if group:
            rows.append([label, "", *(fmt(_diff(getattr(j, k), getattr(group[0], k))) for k, _ in _JOINT_FIELDS)])
    return Table(["exp_id", "path", *(h for _, h in _JOINT_FIELDS)], rows,
                 [False, False] + [True] * len(_JOINT_FIELDS),
                 caption="Joint PQK vs the sequential paths: the same student derivation, loss, ρ and W8A8 spec. Joint prunes "
                         "the student during its one run; P→K→Q prunes the teacher before deriving the student (a larger "
                         "end model); K→P→Q prunes the distilled student, the same final size as joint. GPU-h counts every "
                         "step each needed")


def _diff(a: Any, b: Any) -> float | None:
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _date(value: Any) -> str:
    text = str(value or "")
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text or "—"


def log_table(data: RunData) -> Table:
    """The daily execution log (document 001 §9): date | task id | input/config | output |
    verdict | GPU-h | notes."""
    rows = [[_date(e.get("date")), str(e.get("task_id", "—")), str(e.get("input", "") or "—"),
             str(e.get("output", "") or "—"), str(e.get("verdict", "") or "—"), fmt(finite(e.get("gpu_hours")), 3),
             str(e.get("notes", "") or "—")] for e in data.log]
    return Table(["date", "task id", "input/config", "output", "verdict", "GPU-h", "notes"], rows,
                 [False, False, False, False, False, True, False], caption="Daily execution log")


def _spent(data: RunData) -> tuple[dict[str, float], float | None, str]:
    """Device-hours spent per plan experiment (Σ gpu_hours of its records) and in all: every
    step once (the log's step lines) plus every evaluation, when the log says which is which."""
    per_exp: dict[str, float] = {}
    for rec in data.records:
        exp = data.experiments.get(rec.exp_id)
        if exp is not None and finite(rec.gpu_hours) is not None:
            per_exp[exp] = per_exp.get(exp, 0.0) + float(rec.gpu_hours)
    steps = [finite(e.get("gpu_hours")) or 0.0 for e in data.log if "/" in str(e.get("task_id", ""))]
    evals = [finite(((p.get("details") or {}).get("cost") or {}).get("device_hours_eval")) for p in data.evals.values()]
    if data.log and all(v is not None for v in evals):
        return per_exp, sum(steps) + sum(evals), "every step once (log step lines) + every evaluation"
    total = sum(finite(r.gpu_hours) or 0.0 for r in data.records)
    return per_exp, total, "Σ records' gpu_hours (a step shared by experiments counts in each)"


def budget_table(data: RunData, estimate: dict) -> Table:
    from pqk.pipeline.budget import format_range, human_hours, human_range

    per_exp, total_spent, how = _spent(data)
    rows = []
    for exp in estimate["experiments"]:
        spent = per_exp.get(exp["id"])
        est = exp.get("hours_with_shared") or exp["hours"]
        ratio = "—"
        if spent is not None and est and est[1] > 0:
            ratio = f"{spent / est[1]:.2g}–{spent / est[0]:.2g}×" if est[0] != est[1] else f"{spent / est[0]:.2g}×"
        doc = exp.get("plan_estimate_h100_hours")
        rows.append([exp["id"], exp["steps"], human_range(est), "—" if spent is None else human_hours(spent), ratio,
                     (format_range(doc) + " h") if doc else "—"])
    total = estimate["total"]
    doc = total.get("plan_estimate_h100_hours")
    rows.append(["total", "cached steps counted once", human_range(total["hours"]),
                 "—" if total_spent is None else human_hours(total_spent), "—", (format_range(doc) + " h") if doc else "—"])
    dev = estimate["gpu"]
    return Table(["experiment", "steps", f"estimate ({dev}, budget {estimate['budget']:g})", "spent (records)",
                  "spent / estimate", "plan doc (H100)"], rows, [False, False, True, True, True, True],
                 caption=f"Budget estimate (pqk budget, incl. shared steps per experiment) vs device-hours spent; total spent = {how}")


# --- the estimate the budget table compares with ----------------------------------------------


def _auto_gpu(data: RunData) -> str:
    kinds = {((p.get("details") or {}).get("cost") or {}).get("device_kind") for p in data.evals.values()}
    return "h100" if "cuda" in kinds else "cpu"


def _auto_rate(data: RunData) -> float:
    from pqk.pipeline.budget import DEFAULT_RATE_USD_PER_H

    for p in data.evals.values():
        rate = finite(((p.get("details") or {}).get("cost") or {}).get("rate_usd_per_h"))
        if rate is not None:
            return rate
    return DEFAULT_RATE_USD_PER_H


def resolve_estimate(data: RunData, folder: Path, estimate: dict | str | Path | None, *, gpu: str | None,
                     rate: float | None, budget: float | None, compute: bool, log: Callable[[str], None]) -> dict | None:
    """The estimate given (dict or `pqk budget --json` file), else the cached one in the report
    folder, else computed now with `estimate_plan` (a probe of seconds to a minute)."""
    if isinstance(estimate, dict):
        return estimate
    if estimate is not None:
        path = Path(estimate)
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InputError(f"--estimate {path} is not a readable `pqk budget --json` file") from None
        if not isinstance(loaded, dict) or "experiments" not in loaded or "total" not in loaded:
            raise InputError(f"--estimate {path} is not a `pqk budget --json` file (no 'experiments'/'total')")
        return loaded
    if not compute or data.plan_path is None:
        if data.plan_path is None:
            data.notes.append("no plan file (RUN_DIR/plan.yaml or --plan): budget comparison left out")
        return None
    from pqk.pipeline.budget import check_gpu, estimate_plan

    gpu = check_gpu(gpu) if gpu else _auto_gpu(data)
    rate = _auto_rate(data) if rate is None else rate
    budget = budget if budget is not None else float(data.plan_raw.get("budget", 1.0) or 1.0)
    key = {"plan_sha256": hashlib.sha256(data.plan_path.read_bytes()).hexdigest(), "gpu": gpu, "rate": rate, "budget": budget}
    cache = folder / ESTIMATE_FILE
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("cache_key") == key:
                return cached
        except ValueError:
            pass
    log(f"estimating the plan's budget on {gpu} (budget {budget:g}): a short probe on this machine")
    try:
        result = estimate_plan(data.plan_path, gpu, rate, budget, log=log)
    except Exception as exc:  # the report is still worth having without this one table
        data.notes.append(f"budget estimate failed ({type(exc).__name__}: {exc}); run pqk budget and pass --estimate")
        return None
    result["cache_key"] = key
    write_json(cache, result)
    return result


# --- the page ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.9rem}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.82rem;margin:.5rem 0}
th,td{border-bottom:1px solid #e3e3e3;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{border-bottom:2px solid #999;background:#fafafa}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;color:#666;font-size:.8rem;text-align:left;padding-top:.3rem}
img{max-width:100%;border:1px solid #eee}.note{color:#8a5a00}
tr.pass td:nth-child(4){color:#17703a;font-weight:600}tr.stop td:nth-child(4){color:#b00020;font-weight:600}
details{margin:.5rem 0}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _gate_html(table: Table) -> str:
    # The verdict column coloured by row class (pass green, stop red).
    text = table.html()
    for row in table.rows:
        cls = "pass" if row[3] == "pass" else ("stop" if row[3].startswith("stop") else "")
        if cls:
            first = f"<tr><td>{html.escape(row[0])}</td>"
            text = text.replace(first, f'<tr class="{cls}"><td>{html.escape(row[0])}</td>', 1)
    return text


def _page(title: str, meta: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f'<h2 id="{html.escape(anchor(h))}">{html.escape(h)}</h2>\n{content}' for h, content in sections)
    toc = " · ".join(f'<a href="#{html.escape(anchor(h))}">{html.escape(h)}</a>' for h, _ in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{meta}</p>\n"
            f"<p class=\"meta\">{toc}</p>\n{body}\n</body></html>\n")


def anchor(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def build_report(
    run_dir: str | Path,
    *,
    plan: str | Path | None = None,
    metric: str | None = None,
    estimate: dict | str | Path | None = None,
    compute_estimate: bool = True,
    gpu: str | None = None,
    rate: float | None = None,
    budget: float | None = None,
    log: Callable[[str], None] | None = None,
    scene_scale: str | Path | None = None,
    benchmarks: str | Path = Path("benchmarks/results"),
    tests_dir: str | Path = Path("tests"),
) -> Report:
    """Read RUN_DIR and write RUN_DIR/report/ (see the module docstring)."""
    say = log or (lambda _m: None)
    data = load_run(run_dir, plan)
    metric = metric or data.task.main_metric
    if metric not in data.task.quality_fields:
        raise InputError(f"--metric {metric!r} is not accepted; accepted: {', '.join(data.task.quality_fields)}")
    folder = Path(run_dir) / REPORT_DIR
    ensure_writable_dir(folder)
    teacher = data.teacher
    if teacher is None:
        data.notes.append("no teacher record (P0): no reference in the figures, no relative resources plot")
    files: dict[str, Path] = {}
    pareto = plot_pareto(data.records, teacher, metric, folder / "pareto.png", higher=data.task.direction(metric),
                         task=data.task)
    files["pareto.png"] = folder / "pareto.png"
    if pareto["skipped"]:
        data.notes.append(f"not in the Pareto plot (no finite latency or {metric}): {', '.join(pareto['skipped'])}")
    if teacher is not None:
        plot_stages(data.records, teacher, folder / "stages.png", task=data.task)
        files["stages.png"] = folder / "stages.png"
    est = resolve_estimate(data, folder, estimate, gpu=gpu, rate=rate, budget=budget, compute=compute_estimate, log=say)
    if not data.log:
        data.notes.append("no execution_log.jsonl in the run folder: the daily log is empty")
    cmapkd = cmapkd_section(run_dir, data.records, folder, evals=data.evals, files=files)  # None: no cmapkd records
    data.notes.extend(cmapkd[3] if cmapkd else [])
    page = _Page(data, run_dir, metric, pareto, files, est)
    page.cmapkd = cmapkd
    scene_file = Path(scene_scale) if scene_scale is not None else Path(run_dir) / SCENE_SCALE_FILE
    if scene_scale is not None or scene_file.is_file():
        page.scene_scale = scene_scale_section(load_scene_scale(scene_file), folder, files)
    if has_accel_records(data):
        page.accel = accel_section(data, Path(benchmarks), Path(tests_dir))
        data.notes.extend(page.accel[3])
    page.budget_curve = budget_section(data, folder, files)  # None: no experiment run at two budgets
    files["results.md"] = folder / "results.md"
    atomic_write_text(files["results.md"], page.markdown())
    files["results.tex"] = folder / "results.tex"
    atomic_write_text(files["results.tex"], page.latex())
    files["report.html"] = folder / "report.html"
    atomic_write_text(files["report.html"], page.html())
    if est is not None:
        files[ESTIMATE_FILE] = write_json(folder / ESTIMATE_FILE, est)  # what the budget table used
    return Report(folder, files, pareto, data.gates(), data.notes)


class _Page:
    """The report's tables and texts, written as Markdown, LaTeX and one self-contained HTML page."""

    cmapkd: tuple[str, str, str, list[str]] | None = None  # the CMAPKD section (markdown, latex, html, notes)
    scene_scale: tuple[str, str, str, list[str]] | None = None  # the scene-scale section, same form
    accel: tuple[str, str, str, list[str]] | None = None  # the accelerations' ROI section, same form
    budget_curve: tuple[str, str, str, list[str]] | None = None  # quality against budget, same form

    def __init__(self, data: RunData, run_dir: str | Path, metric: str, pareto: dict, files: dict, est: dict | None):
        self.data, self.run_dir, self.metric, self.pareto, self.files = data, run_dir, metric, pareto, files
        self.results = results_table(data.records, task=data.task)
        self.results.caption = (f"Results ({len(data.records)} records); ↓ lower is better, ↑ higher is better; "
                                f"all {len(data.task.record_fields)} fields in result_table.csv")
        self.gates = gate_table(data)
        self.logs = log_table(data)
        self.budget_tab = budget_table(data, est) if est is not None else None
        self.joint = joint_table(data.records)
        self.plan_name = str(data.plan_raw.get("name") or Path(run_dir).resolve().name)
        self.direction = "higher" if data.task.direction(metric) else "lower"
        self.front = ", ".join(pareto["front"]) or "—"
        self.generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def markdown(self) -> str:
        data = self.data
        md = [f"# Report: plan {self.plan_name}\n", f"{data.plan_raw.get('description', '')}\n" if data.plan_raw.get("description") else "",
              f"Run folder `{self.run_dir}`, generated {self.generated}. Full table: [result_table.csv](../result_table.csv).\n",
              "## Results\n", self.results.markdown(),
              f"\n## Quality vs latency\n\n![pareto](pareto.png)\n\nQuality: {self.metric} ({self.direction} is better). "
              f"Pareto front: {self.front}.\n"]
        if "stages.png" in self.files:
            md.append("\n## Resources relative to the teacher\n\n![stages](stages.png)\n")
        if self.joint is not None:
            md += ["\n## Joint PQK vs sequential P→K→Q\n", self.joint.markdown(), f"\n{self.joint.caption}\n"]
        if self.cmapkd is not None:
            md += [f"\n## {CMAPKD_TITLE}\n", self.cmapkd[0]]
        if self.scene_scale is not None:
            md += [f"\n## {SCENE_SCALE_TITLE}\n", self.scene_scale[0]]
        if self.accel is not None:
            md += [f"\n## {ACCEL_TITLE}\n", self.accel[0]]
        if self.budget_curve is not None:
            md += [f"\n## {BUDGET_CURVE_TITLE}\n", self.budget_curve[0]]
        md += ["\n## Gate verdicts\n", self.gates.markdown()]
        if self.budget_tab is not None:
            md += ["\n## Budget: estimate vs spent\n", self.budget_tab.markdown(), f"\n{self.budget_tab.caption}\n"]
        md += ["\n## Daily execution log\n", self.logs.markdown() if self.logs.rows else "(no execution_log.jsonl)\n"]
        if data.notes:
            md += ["\n## Notes\n", "".join(f"- {n}\n" for n in data.notes)]
        return "\n".join(m for m in md if m)

    def latex(self) -> str:
        tex_results = results_table(self.data.records, latex=True, task=self.data.task)
        tex_results.caption = f"Results of plan {self.plan_name} on the frozen workload"
        return ("% pqk report: needs \\usepackage{booktabs}\n" + tex_results.latex(f"tab:{anchor(self.plan_name)}-results")
                + "\n" + _latex_gates(self.gates, self.plan_name) + ("\n" + self.cmapkd[1] if self.cmapkd else "")
                + ("\n" + self.scene_scale[1] if self.scene_scale else "") + ("\n" + self.accel[1] if self.accel else "")
                + ("\n" + self.budget_curve[1] if self.budget_curve else ""))

    def html(self) -> str:
        data, files = self.data, self.files
        sections = [("Results", self.results.html() + f"<details><summary>All {len(data.task.record_fields)} protocol fields</summary>"
                     + full_table(data.records, task=data.task).html() + "</details>"),
                    ("Quality vs latency", _img(files["pareto.png"], "Pareto plot")
                     + f"<p>Quality: <b>{html.escape(self.metric)}</b> ({self.direction} is better); marker area ∝ size on disk; "
                     f"teacher = star and dashed lines. Pareto front: <b>{html.escape(self.front)}</b>.</p>")]
        if "stages.png" in files:
            sections.append(("Resources relative to the teacher", _img(files["stages.png"], "relative resources")))
        if self.joint is not None:
            sections.append(("Joint PQK vs sequential P→K→Q", self.joint.html()))
        if self.cmapkd is not None:
            sections.append((CMAPKD_TITLE, self.cmapkd[2]))
        if self.scene_scale is not None:
            sections.append((SCENE_SCALE_TITLE, self.scene_scale[2]))
        if self.accel is not None:
            sections.append((ACCEL_TITLE, self.accel[2]))
        if self.budget_curve is not None:
            sections.append((BUDGET_CURVE_TITLE, self.budget_curve[2]))
        sections.append(("Gate verdicts", _gate_html(self.gates)))
        if self.budget_tab is not None:
            sections.append(("Budget: estimate vs spent", self.budget_tab.html()))
        sections.append(("Daily execution log", self.logs.html() if self.logs.rows else "<p>(no execution_log.jsonl)</p>"))
        if data.notes:
            sections.append(("Notes", "<ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in data.notes) + "</ul>"))
        meta = (html.escape(str(data.plan_raw.get("description", ""))) + (" — " if data.plan_raw.get("description") else "")
                + f"run folder <code>{html.escape(str(self.run_dir))}</code>, {len(data.records)} records, generated {self.generated}")
        return _page(f"pqk report: plan {self.plan_name}", meta, sections)


def _latex_gates(gates: Table, plan_name: str) -> str:
    # The reasons column is long prose: the paper's table keeps the figures.
    short = Table(gates.headers[:8], [r[:8] for r in gates.rows], gates.numeric[:8], caption=f"Gate verdicts of plan {plan_name}")
    return short.latex(f"tab:{anchor(plan_name)}-gates")
