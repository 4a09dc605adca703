"""What a plan's run folder holds, read once: the run manifest (run.json: the family, every
experiment's state and typed gate verdicts), the records (result_table.csv), their eval JSONs,
the daily execution log and the plan. Tolerant of partial runs: every piece but the records is
optional, and what is missing becomes a note, not an error. Folders written before run.json
existed are read the old way (gates from the eval JSONs or the records' notes, status.json)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqk.errors import InputError
from pqk.pipeline.gates import record_from_row
from pqk.pipeline.record import Record, read_table

LOG_FILE = "execution_log.jsonl"
REPORT_DIR = "report"


@dataclass
class Gate:
    exp_id: str
    stage: str
    verdict: str  # pass | stop | stopped (not run) | reference | —
    reasons: list[str] = field(default_factory=list)
    reference: str = ""
    figures: dict = field(default_factory=dict)
    source: str = ""  # run.json | eval JSON | notes | status.json
    experiment: str = ""  # the plan experiment, when the gate row knows it (stopped experiments)


@dataclass
class RunData:
    run_dir: Path
    rows: list[dict[str, str]]  # result_table.csv, file order
    records: list[Record]
    evals: dict[str, dict]  # exp_id -> eval JSON payload
    eval_paths: dict[str, Path]
    experiments: dict[str, str]  # exp_id -> plan experiment id, where known
    log: list[dict]
    plan_path: Path | None
    plan_raw: dict
    status: dict  # run.json (or a legacy status.json): {"experiments": [{id, exp_id, state, reasons, ...}]}
    notes: list[str] = field(default_factory=list)
    task: Any = None  # the family's adapter (pqk.tasks.Task)
    manifest: bool = False  # `status` is a run.json manifest with typed verdicts

    @property
    def teacher(self) -> Record | None:
        """The reference record: the P0 teacher (combo 'teacher' or an exp_id starting P0_)."""
        for rec in self.records:
            if rec.combo == "teacher" or rec.exp_id.startswith("P0_"):
                return rec
        return None

    def gates(self) -> list[Gate]:
        """One verdict per record, then the experiments the runner stopped without measuring
        them. From run.json's typed verdicts; in a folder without one, from the eval JSON's
        details.gate, else the notes' 'gate Px: ...', and status.json."""
        out = self._manifest_gates() if self.manifest else self._legacy_gates()
        source = "run.json" if self.manifest else "status.json"
        for exp in self.status.get("experiments") or []:
            if isinstance(exp, dict) and exp.get("state") == "stopped":
                out.append(Gate(str(exp.get("exp_id") or ""), str(exp.get("stage") or ""), "stopped (not run)",
                                list(exp.get("reasons") or []), source=source, experiment=str(exp.get("id") or "")))
        return out

    def _manifest_gates(self) -> list[Gate]:
        typed = {str(ev.get("exp_id")): (str(exp.get("id", "")), ev.get("gate"))
                 for exp in self.status.get("experiments") or [] if isinstance(exp, dict)
                 for ev in exp.get("evaluations") or [] if isinstance(ev, dict)}
        out = []
        for rec in self.records:
            experiment, gate = typed.get(rec.exp_id, ("", None))
            if isinstance(gate, dict) and gate.get("verdict"):
                reasons = list(gate.get("reasons") or gate.get("undecided") or [])
                out.append(Gate(rec.exp_id, str(gate.get("stage", "")), str(gate["verdict"]), reasons,
                                str(gate.get("reference", "")), dict(gate.get("figures") or {}), "run.json", experiment))
            elif rec is self.teacher:
                out.append(Gate(rec.exp_id, "P0", "reference", source="record"))
            else:  # a reference measured for a gate (e.g. the FP32 model of a P3 experiment), or a foreign row
                out.append(Gate(rec.exp_id, "", "—", source="none"))
        return out

    def _legacy_gates(self) -> list[Gate]:
        out = []
        for rec in self.records:
            gate = (self.evals.get(rec.exp_id, {}).get("details") or {}).get("gate")
            if isinstance(gate, dict) and gate.get("verdict"):
                out.append(Gate(rec.exp_id, str(gate.get("stage", "")), str(gate["verdict"]), list(gate.get("reasons") or []),
                                str(gate.get("reference", "")), dict(gate.get("figures") or {}), "eval JSON"))
                continue
            parsed = parse_gate_note(rec.notes)
            if parsed is not None:
                stage, verdict, reasons = parsed
                out.append(Gate(rec.exp_id, stage, verdict, reasons, source="notes"))
            elif rec is self.teacher:
                out.append(Gate(rec.exp_id, "P0", "reference", source="record"))
            else:
                out.append(Gate(rec.exp_id, "", "—", source="none"))
        return out


_GATE = re.compile(r"gate (P\d+): (pass|stop|inconclusive)")


def parse_gate_note(notes: str) -> tuple[str, str, list[str]] | None:
    """'...; gate P1: stop (delta1 ...: drop 2.0% > 1%; t_pair ...); ...' -> ('P1', 'stop', [reasons]).
    The reasons sit in balanced parentheses and may hold '(' and ';' themselves."""
    m = _GATE.search(notes or "")
    if not m:
        return None
    stage, verdict = m.group(1), m.group(2)
    rest = notes[m.end():]
    reasons: list[str] = []
    if rest.startswith(" ("):
        depth, end = 0, None
        for k, ch in enumerate(rest[1:], start=1):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = k
                break
        inner = rest[2:end] if end else rest[2:]
        reasons = [r.strip() for r in inner.split("; ") if r.strip()]
    return stage, verdict, reasons


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} skipped: not readable JSON ({type(exc).__name__})")
        return None


def read_log(path: Path, notes: list[str]) -> list[dict]:
    """execution_log.jsonl: one JSON object per line; a bad line is skipped with a note."""
    if not path.is_file():
        return []
    entries, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) that are not JSON objects skipped")
    return entries


def load_run(run_dir: str | Path, plan: str | Path | None = None) -> RunData:
    """Read RUN_DIR (runs/<plan>): run.json (else a legacy status.json), result_table.csv, every
    *_eval.json under it (sub-folders included, the report folder excepted), execution_log.jsonl,
    plan.yaml."""
    from pqk.tasks import get_task

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist; give the folder a plan wrote, e.g. runs/minimal")
    notes: list[str] = []
    evals: dict[str, dict] = {}
    eval_paths: dict[str, Path] = {}
    # Shallowest first: a top-level record wins over a copy in a step's sub-folder.
    found = sorted((p for p in run_dir.rglob("*_eval.json") if REPORT_DIR not in p.relative_to(run_dir).parts[:1]),
                   key=lambda p: (len(p.relative_to(run_dir).parts), str(p)))
    for path in found:
        payload = _read_json(path, notes)
        if not isinstance(payload, dict) or not isinstance(payload.get("record"), dict):
            continue
        exp_id = str(payload["record"].get("exp_id", ""))
        if exp_id and exp_id not in evals:
            evals[exp_id], eval_paths[exp_id] = payload, path

    table = run_dir / "result_table.csv"
    rows = read_table(table)
    if not rows:
        if not evals:
            raise InputError(f"run folder {run_dir} holds no result_table.csv and no *_eval.json: nothing to report")
        notes.append("no result_table.csv: records read from the eval JSONs")
        rows = [{k: "" if v is None else str(v) for k, v in p["record"].items()} for p in evals.values()]
    manifest = run_dir / "run.json"
    status_path = manifest if manifest.is_file() else run_dir / "status.json"
    status = _read_json(status_path, notes) if status_path.is_file() else {}
    status = status if isinstance(status, dict) else {}
    task = get_task(str(status.get("task") or "dust3r")) if status_path == manifest else get_task()
    missing = [f for f in task.record_fields if f not in rows[0]]
    if missing:
        notes.append(f"result_table.csv lacks field(s) {', '.join(missing)}")
    records = [record_from_row(r, task.record_type) for r in rows]

    plan_path = Path(plan) if plan is not None else (run_dir / "plan.yaml" if (run_dir / "plan.yaml").is_file() else None)
    if plan is not None and not plan_path.is_file():
        raise InputError(f"--plan {plan} does not exist")
    plan_raw: dict = {}
    if plan_path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(plan_path.read_text())
            plan_raw = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            notes.append(f"plan {plan_path} is not valid YAML: budget comparison left out")
            plan_path = None

    data = RunData(run_dir, rows, records, evals, eval_paths, {}, read_log(run_dir / LOG_FILE, notes), plan_path,
                   plan_raw, status, notes, task, status_path == manifest and bool(status))
    data.experiments = _experiment_map(data)
    return data


def _experiment_map(data: RunData) -> dict[str, str]:
    """exp_id -> plan experiment id: the eval JSON's details.plan_experiment, else the
    sub-folder it sits in (runs/<plan>/<experiment>/...), else status.json, else the
    experiment with no steps for the teacher."""
    plan_ids = [str(e.get("id")) for e in data.plan_raw.get("experiments") or [] if isinstance(e, dict)]
    baseline = next((str(e.get("id")) for e in data.plan_raw.get("experiments") or []
                     if isinstance(e, dict) and not e.get("steps")), None)
    by_status = {str(e.get("exp_id")): str(e.get("id")) for e in data.status.get("experiments") or []
                 if isinstance(e, dict) and e.get("exp_id")}
    by_status.update({str(ev.get("exp_id")): str(e.get("id")) for e in data.status.get("experiments") or []
                      if isinstance(e, dict) for ev in e.get("evaluations") or [] if isinstance(ev, dict)})
    out: dict[str, str] = {}
    for rec in data.records:
        details = (data.evals.get(rec.exp_id) or {}).get("details") or {}
        exp = details.get("plan_experiment") or by_status.get(rec.exp_id)
        if not exp and rec.exp_id in data.eval_paths:
            parts = data.eval_paths[rec.exp_id].relative_to(data.run_dir).parts
            if len(parts) > 1 and parts[0] in plan_ids:
                exp = parts[0]
        if not exp and rec.exp_id in plan_ids:
            exp = rec.exp_id
        if not exp and baseline and (rec.combo == "teacher" or rec.exp_id.startswith("P0_")):
            exp = baseline
        if exp:
            out[rec.exp_id] = str(exp)
    return out


def finite(value: Any) -> float | None:
    """A float that can be plotted and compared, else None."""
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
