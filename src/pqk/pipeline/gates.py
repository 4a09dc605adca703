"""The protocol's stop-loss gates (protocol.md, "Stages, outputs and gates").

A gate compares an experiment's record with its reference record (the teacher for P1, P2
and P4; the FP32 student for P3) and returns a verdict. A failed gate is a result: it is
written into the record's notes and the eval JSON, and the plan runner marks dependents
"stopped"; nothing raises.

Quality drop is relative, on one main metric (δ1 by default): for a higher-is-better metric
``(ref - new) / ref``, for a lower-is-better one ``(new - ref) / ref``. So "drop ≤ 1%" lets
δ1 go from 0.890 to 0.881, or absrel from 0.107 to 0.108.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from pqk.errors import ConfigError
from pqk.measure.quality import quality_drop  # noqa: F401 (gates' convention, re-exported)
from pqk.pipeline.record import Record, nan_fields

if TYPE_CHECKING:
    from pqk.tasks.base import Task


def _task(task: Task | None) -> Task:
    from pqk.tasks import get_task

    return task or get_task()


@dataclass(frozen=True)
class GateRule:
    """One stage's thresholds (fractions: 0.01 = 1%). None = not part of this gate."""

    max_quality_drop: float
    min_latency_cut: float | None = None  # t_pair_p50 reduction vs the reference
    min_size_cut: float | None = None  # params and size reduction vs the reference


GATES: dict[str, GateRule] = {
    "P0": GateRule(max_quality_drop=math.inf),  # no NaN, record complete
    "P1": GateRule(max_quality_drop=0.01),
    "P2": GateRule(max_quality_drop=0.01, min_latency_cut=0.50),
    "P3": GateRule(max_quality_drop=0.01, min_latency_cut=0.50),
    "P4": GateRule(max_quality_drop=0.03, min_size_cut=0.25),
}


@dataclass
class GateVerdict:
    stage: str
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it stopped (empty when passed)
    figures: dict = field(default_factory=dict)  # the measured drops and cuts
    # What could not be judged (a latency timed while other processes took the cores): with no
    # reason to stop, the verdict is "inconclusive", never a pass or a stop the load decided.
    undecided: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.reasons:
            return "stop"
        return "inconclusive" if self.undecided else "pass"

    def note(self) -> str:
        """One line for the record's notes."""
        if self.verdict == "pass":
            return f"gate {self.stage}: pass"
        return f"gate {self.stage}: {self.verdict} ({'; '.join(self.reasons or self.undecided)})"

    def to_json(self) -> dict:
        return {"stage": self.stage, "verdict": self.verdict, "reasons": self.reasons, "figures": self.figures,
                "undecided": self.undecided}


def _cut(new: float | None, ref: float | None) -> float | None:
    if new is None or ref is None or ref == 0:
        return None
    return 1.0 - new / ref


def check_gate(
    stage: str, record: Record, reference: Record, metric: str | None = None, rule: GateRule | None = None,
    latency_cut: float | None = None, task: Task | None = None, latency_contended: bool = False,
) -> GateVerdict:
    """The verdict of `stage`'s gate for `record` against `reference` (records of `task`'s
    family; `metric`: default its main metric).

    `latency_cut`, when given, is the p50 reduction measured side by side in one process
    (`interleaved_latency`) and replaces the ratio of the two records' separately timed p50s;
    `latency_contended`: that timing ran on a contended machine, so the latency criterion is
    not judged (the verdict is "inconclusive" unless another criterion stops it)."""
    task = _task(task)
    metric = metric or task.main_metric
    if rule is None:
        if stage not in GATES:
            raise ConfigError(f"no gate for stage {stage!r}; expected one of {', '.join(GATES)}")
        rule = GATES[stage]
    reasons: list[str] = []
    bad = nan_fields(record)
    if bad:
        reasons.append(f"NaN in {', '.join(bad)}")
    if metric not in task.quality_fields:
        raise ConfigError(f"unknown main metric {metric!r}; expected one of {', '.join(task.quality_fields)}")
    if getattr(record, metric) is None:
        reasons.append(f"{metric} not measured")
    figures: dict = {"metric": metric}
    new, ref = getattr(record, metric), getattr(reference, metric)
    if new is not None and ref is not None and not bad:
        drop = quality_drop(float(new), float(ref), metric, task)
        figures.update(quality_drop=drop, max_quality_drop=rule.max_quality_drop, value=new, reference=ref)
        if drop > rule.max_quality_drop:
            reasons.append(f"{metric} {new:.4f} vs {ref:.4f}: drop {drop:.1%} > {rule.max_quality_drop:.0%}")
    undecided: list[str] = []
    if rule.min_latency_cut is not None:
        p50 = task.latency_fields["p50_ms"]
        cut = latency_cut if latency_cut is not None else _cut(getattr(record, p50), getattr(reference, p50))
        figures.update(latency_cut=cut, min_latency_cut=rule.min_latency_cut,
                       latency_source="side by side" if latency_cut is not None else "records",
                       latency_contended=latency_contended)
        if latency_contended:
            undecided.append(f"{p50.removesuffix('_p50_ms')} p50 timed while other processes used the cores: "
                             "rerun on a quiet machine")
        elif cut is None or cut < rule.min_latency_cut:
            shown = "not measured" if cut is None else f"{cut:.0%}"
            reasons.append(f"{p50.removesuffix('_p50_ms')} p50 down {shown} < {rule.min_latency_cut:.0%}")
    if rule.min_size_cut is not None:
        params_cut = _cut(record.params_M, reference.params_M)
        size_cut = _cut(record.size_MB, reference.size_MB)
        figures.update(params_cut=params_cut, size_cut=size_cut, min_size_cut=rule.min_size_cut)
        best = max((c for c in (params_cut, size_cut) if c is not None), default=None)
        if best is None or best < rule.min_size_cut:
            shown = "not measured" if best is None else f"{best:.0%}"
            reasons.append(f"params/size down {shown} < {rule.min_size_cut:.0%}")
    return GateVerdict(stage, not reasons and not undecided, reasons, figures, undecided)


def record_from_row(row: dict, record_type: type = Record):
    """A record (default: the protocol's DUSt3R Record) from a result_table.csv row or an eval
    JSON's "record" (strings accepted)."""
    from dataclasses import fields as dc_fields

    values = {}
    for f in dc_fields(record_type):
        raw = row.get(f.name, None)
        if raw is None or raw == "":
            values[f.name] = None if f.name not in ("exp_id", "combo", "keep_list", "notes", "datetime") else ""
            continue
        if f.name in ("exp_id", "combo", "keep_list", "notes", "datetime"):
            values[f.name] = str(raw)
        elif f.name in ("bits_w", "bits_a", "seed"):
            values[f.name] = int(float(raw))
        else:
            values[f.name] = float(raw)
    if values.get("seed") is None:
        values["seed"] = 42
    return record_type(**values)
