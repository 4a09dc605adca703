"""Tables of the report, built once as plain cells and written as Markdown, LaTeX (booktabs)
and HTML, so the three never disagree."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from pqk.pipeline.record import Record

_LATEX_HEADERS = {"rho": r"$\rho$", "beta": r"$\beta$", "gamma": r"$\gamma$", "absrel": r"AbsRel $\downarrow$",
                  "delta1": r"$\delta_1$ $\uparrow$", "rmse": r"RMSE $\downarrow$", "chamfer": r"Chamfer $\downarrow$"}


def _task(task):
    from pqk.tasks import get_task

    return task or get_task()


def fmt(value: Any, digits: int = 4) -> str:
    """A cell: None/'' -> '—', NaN stays visible, floats in `digits` significant digits."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_pct(value: Any) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:+.1%}"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-aligned columns
    latex_headers: list[str] | None = None
    caption: str = ""

    def __post_init__(self) -> None:
        if not self.numeric:
            self.numeric = [False] * len(self.headers)

    # -- Markdown
    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(cell(h) for h in self.headers) + " |",
                 "|" + "|".join("---:" if n else "---" for n in self.numeric) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    # -- HTML
    def html(self, css_class: str = "") -> str:
        def td(text: str, numeric: bool, tag: str = "td") -> str:
            return f"<{tag}{' class=num' if numeric else ''}>{html.escape(text)}</{tag}>"

        head = "".join(td(h, n, "th") for h, n in zip(self.headers, self.numeric))
        body = "\n".join("<tr>" + "".join(td(c, n) for c, n in zip(row, self.numeric)) + "</tr>" for row in self.rows)
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        cls = f' class="{css_class}"' if css_class else ""
        return f'<div class="scroll"><table{cls}>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>\n'

    # -- LaTeX (booktabs)
    def latex(self, label: str = "") -> str:
        headers = self.latex_headers or [latex_escape(h) for h in self.headers]
        spec = "".join("r" if n else "l" for n in self.numeric)
        lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(headers) + r" \\", r"\midrule"]
        lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        if self.caption:
            lines.append(rf"\caption{{{latex_escape(self.caption)}}}")
        if label:
            lines.append(rf"\label{{{label}}}")
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "—": "---", "–": "--", "→": r"$\rightarrow$", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
                  "δ": r"$\delta$", "ρ": r"$\rho$", "β": r"$\beta$", "γ": r"$\gamma$", "≤": r"$\le$", "≥": r"$\ge$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _cell(rec: Record, key: str) -> str:
    if key == "bits":
        return "—" if rec.bits_w is None and rec.bits_a is None else f"{fmt(rec.bits_w)}/{fmt(rec.bits_a)}"
    return fmt(getattr(rec, key))


def results_table(records: list, columns: list[tuple[str, str]] | None = None, latex: bool = False,
                  task=None) -> Table:
    """The results: one row per record, the family's readable columns (its LaTeX subset for the paper)."""
    task = _task(task)
    cols = columns or list(task.result_columns)
    if latex:
        names = dict(task.result_columns)
        cols = [(k, names[k]) for k in task.latex_columns]
    text = {"exp_id", "combo", "bits"}
    return Table(
        headers=[h for _, h in cols],
        rows=[[_cell(r, k) for k, _ in cols] for r in records],
        numeric=[k not in text for k, _ in cols],
        latex_headers=[_LATEX_HEADERS.get(k, latex_escape(h)) for k, h in cols],
    )


def full_table(records: list, task=None) -> Table:
    """Every field of the family's record, as result_table.csv has them."""
    names = _task(task).record_fields
    text = {"exp_id", "combo", "keep_list", "notes", "datetime"}
    return Table(headers=list(names), rows=[[fmt(getattr(r, f)) for f in names] for r in records],
                 numeric=[f not in text for f in names])
