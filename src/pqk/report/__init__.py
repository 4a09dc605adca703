"""The report of a plan's run (`pqk report RUN_DIR`): results, gate, budget and daily-log tables
as Markdown / LaTeX / HTML, a Pareto plot and a per-stage resource plot, one self-contained
HTML page."""

from pqk.report.build import Report, build_report
from pqk.report.plots import pareto_front

__all__ = ["Report", "build_report", "pareto_front"]
