"""Executes a plan: every experiment's steps, cached and resumable, each experiment measured
by `evaluate` and gated, all records in runs/<plan>/result_table.csv.

The runner knows no method and no model family by name: a step is run, restored, named and
gated through its registered `Method` (`pqk.methods`), models and data come from the plan's
`Task` adapter (`pqk.tasks`). `pqk distill`, `pqk prune` and `pqk quantize` are one-experiment
plans run here too, with their own folder layout (`Experiment.folder`).

- A step's cache key is the hash of (base model file, workload data, budget, seed, and every
  step so far with its config file's content and options). K→Q finds K's distillation done
  under the same key and reuses it; a rerun after an interruption skips finished steps and
  training resumes from the step's own last.pth.
- A finished step leaves `steps/<method>-<key>/done.json` (or `.pqk-done-<method>-<key>.json`
  in an experiment's own folder); a measured experiment leaves `<exp_id>_eval.json` tagged
  with its key. Both are written last and atomically, so a kill at any point loses at most the
  unfinished piece.
- Gates: each experiment is gated by its stage against its reference (the teacher; the FP32
  model before quantization for P3). With `gate_policy: stop` (the protocol's stop-loss) the
  experiments that build on a failed one are marked "stopped" with the reason and not run;
  `record` runs them anyway and keeps the verdicts.
- `run.json`: the run manifest (every experiment's state, its evaluations and typed gate
  verdicts), what `pqk report` reads. `execution_log.jsonl`: the daily log (date, task id,
  input/config, output, verdict, device-hours, notes), one line per step and experiment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from pqk.io.files import atomic_write_text, ensure_writable_dir, json_safe, remove_leftovers, run_lock, write_json
from pqk.methods.base import StepContext, StepResult, trainable_copy
from pqk.pipeline.evaluate import EvalOptions, Evaluation, evaluate
from pqk.pipeline.gates import GateVerdict, check_gate, record_from_row
from pqk.pipeline.plan import Experiment, Plan, PlanStep
from pqk.pipeline.record import exp_id as make_exp_id, now_iso, record_file_name, write_record

DONE = "done.json"
LOG = "execution_log.jsonl"
MANIFEST = "run.json"


@dataclass
class Measured:
    """One evaluation of an experiment: its record, where it was written and its gate."""

    exp_id: str
    record: Any
    details: dict  # the eval JSON's details, as written
    gate: dict | None = None  # GateVerdict.to_json() + reference exp_id; None: not gated (P0, FP32 references)

    @property
    def eval_file(self) -> str:
        return record_file_name(self.exp_id)

    def to_json(self) -> dict:
        """The eval JSON's content."""
        return {"record": self.record.as_row(), "details": self.details}


@dataclass
class ExperimentStatus:
    id: str
    exp_id: str
    state: str  # done | stopped | failed
    verdict: str = ""  # pass | stop | "" (P0)
    reasons: list[str] = field(default_factory=list)
    record: Any = None
    stage: str = ""
    evaluations: list[Measured] = field(default_factory=list)  # the primary first, then variants
    cached: bool = False  # measured by an earlier run of the same steps

    def to_json(self) -> dict:
        return {"id": self.id, "exp_id": self.exp_id, "state": self.state, "stage": self.stage, "verdict": self.verdict,
                "reasons": self.reasons, "cached": self.cached,
                "evaluations": [{"exp_id": m.exp_id, "eval": m.eval_file, "gate": m.gate} for m in self.evaluations]}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Identity of a model's weights (which teacher a stored reference record measured)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _chain_key(base_key: str, steps: list[PlanStep]) -> str:
    key = base_key
    for step in steps:
        key = hashlib.sha256((key + step.fingerprint()).encode()).hexdigest()
    return key


def _keyparams(steps: list[PlanStep], fields: dict, details: dict | None = None) -> str:
    """The exp_id's key parameters, as the experiment's last method names them (K1 / K1G01,
    r030, PTQ_keepSMLN_cal128, the joint run's own key)."""
    last = steps[-1]
    return last.impl.keyparams(last.options, StepResult(None, None, fields=fields, details=details or {}))


def budget_tag(budget: float | None) -> str:
    """The exp_id part of an experiment's own budget: _bud0p5 for 0.5 ('' for the plan's)."""
    return "" if budget is None else "_bud" + f"{budget:g}".replace(".", "p")


def _done_summary(result: StepResult) -> dict:
    return {"artifact": str(result.artifact), "fields": result.fields, "device_hours": result.device_hours,
            "backend": result.backend, "onnx_path": None if result.onnx_path is None else str(result.onnx_path),
            "runtime": result.runtime, "notes": result.notes, "details": json_safe(result.details),
            "latency_cut": result.latency_cut, "latency_contended": result.latency_contended, "float_model": None if result.float_model is None else str(result.float_model),
            "eval_details": json_safe(result.eval_details)}


class PlanRunner:
    """Runs a plan into runs/<plan name> (see the module docstring).

    `run_dir` replaces runs/<plan name> (a command's --out); the folder is locked while the run
    writes it (a second run on it is refused, or waits with `wait`); `measure_variants` also measures
    every variant a step produced (`pqk quantize`: each runtime of PTQ and QAT); `rank` > 0 (a
    non-main process under torchrun) runs the steps and writes nothing else."""

    def __init__(self, plan: Plan, out_root: Path = Path("runs"), device: str = "cpu",
                 log: Callable[[str], None] = print, eval_options: EvalOptions | None = None, *,
                 run_dir: Path | None = None, resume: bool = True, measure_variants: bool = False, rank: int = 0,
                 progress: Callable[[str], None] | None = None, teacher: torch.nn.Module | None = None,
                 wait: bool = False):
        from pqk.tasks import get_task

        self.plan = plan
        self.task = get_task(plan.task)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(out_root) / plan.name
        self.device = device
        self.log = log
        self.progress = progress
        self.options = eval_options or EvalOptions()
        self.resume = resume
        self.measure_variants = measure_variants
        self.rank = rank
        self._given_teacher = teacher
        self.wait = wait  # a run already writing the folder: wait for it (else a one-line error)
        self.records: dict[str, Any] = {}
        self.baseline: Measured | None = None

    # -- setup ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the plan whole, load the workload (hash-checked) and the teacher, make the folder."""
        self.plan.validate_specs()
        self.workload = self.task.load_workload(self.plan.workload)
        self.data = self.task.load_data(self.workload)
        self.teacher_path = Path(self.plan.teacher or self.task.default_model()[0])
        if self._given_teacher is not None:
            self.teacher = self._given_teacher.eval()
        else:
            self.teacher = self.task.load_model(self.teacher_path, self.device).eval()
        if self.rank == 0:
            ensure_writable_dir(self.run_dir)
        self.base_key = hashlib.sha256(json.dumps({
            "teacher": file_sha256(self.teacher_path), "data": self.task.data_hash(self.workload),
            "budget": self.plan.budget, "seed": 42,
        }, sort_keys=True).encode()).hexdigest()

    def _copy_plan(self) -> None:
        """runs/<plan>/plan.yaml: the plan file as run (what `pqk report` costs and reads). With
        command-line overrides (--only, --budget, --gate-policy) it is rewritten to say what ran."""
        import yaml

        from pqk.pipeline.plan import load_plan
        from pqk.yaml_io import read_yaml

        target = self.run_dir / "plan.yaml"
        original = load_plan(self.plan.path)
        same = ([e.id for e in original.experiments] == [e.id for e in self.plan.experiments]
                and (original.name, original.budget, original.gate_policy)
                == (self.plan.name, self.plan.budget, self.plan.gate_policy))
        if same:
            if Path(self.plan.path).resolve() != target.resolve():
                shutil.copyfile(self.plan.path, target)
            return
        raw = read_yaml(self.plan.path, "plan")
        ids = {e.id for e in self.plan.experiments}
        raw.update(name=self.plan.name, budget=self.plan.budget, gate_policy=self.plan.gate_policy,
                   experiments=[e for e in raw["experiments"] if e.get("id") in ids])
        header = f"# {self.plan.path} as run by pqk run with command-line overrides\n"
        atomic_write_text(target, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))

    def _ctx(self, out_dir: Path, stage: str | None = None, budget: float | None = None) -> StepContext:
        rule = self.plan.gates.get(stage) if stage else None
        extra = {"max_quality_drop": rule.max_quality_drop} if rule is not None else {}
        return StepContext(teacher=self.teacher, workload=self.workload, out_dir=out_dir, device=self.device,
                           budget=self.plan.budget if budget is None else budget, log=self.log, resume=self.resume,
                           task=self.task, **extra)

    def _key(self, exp: Experiment, steps: list[PlanStep]) -> str:
        """The cache key of `exp`'s first steps: the plan's base key, or one with the
        experiment's own budget in it (its steps train or calibrate differently)."""
        base = self.base_key
        if exp.budget is not None and exp.budget != self.plan.budget:
            base = hashlib.sha256(f"{base}|budget={exp.budget!r}".encode()).hexdigest()
        return _chain_key(base, steps)

    def _append_log(self, entry: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / LOG, "a") as f:
                f.write(json.dumps(json_safe({"date": now_iso(), **entry})) + "\n")

    # -- steps --------------------------------------------------------------------------------
    def _step_place(self, exp: Experiment, step: PlanStep, key: str) -> tuple[Path, Path]:
        """(the step's working folder, its done file)."""
        if exp.folder is not None:
            folder = self.run_dir / exp.folder
            return folder, folder / f".pqk-done-{step.method}-{key[:12]}.json"
        folder = self.run_dir / "steps" / f"{step.method}-{key[:12]}"
        return folder, folder / DONE

    def _restore(self, method, done: dict, entering: torch.nn.Module) -> StepResult:
        result = method.restore(done, entering, self.task)
        result.variants = {tag: method.restore(v, entering, self.task) for tag, v in (done.get("variants") or {}).items()}
        return result

    def _run_steps(self, exp: Experiment) -> tuple[list[StepResult], torch.nn.Module]:
        """All steps of `exp` (cached ones restored); returns every result and the float model
        that entered the last step."""
        model: torch.nn.Module = self.teacher
        results, entering = [], model
        for k, step in enumerate(exp.steps):
            method = step.impl
            key = self._key(exp, exp.steps[: k + 1])
            folder, done_file = self._step_place(exp, step, key)
            entering = model
            if self.resume and done_file.is_file():
                self.log(f"{exp.id}: step {k + 1} {step.describe()} cached ({folder.name})")
                result = self._restore(method, json.loads(done_file.read_text()), model)
            else:
                self.log(f"{exp.id}: step {k + 1}/{len(exp.steps)} {step.describe()}")
                if self.rank == 0 and remove_leftovers(folder):  # a step killed before: its temporary files go
                    self.log(f"{exp.id}: removed temporary files a stopped run left in {folder}")
                start = time.perf_counter()
                result = method.run(trainable_copy(model), self._ctx(folder, exp.stage, exp.budget), step.spec())
                if self.rank == 0:
                    summary = _done_summary(result)
                    summary.update(method=step.method, variants={t: _done_summary(v) for t, v in result.variants.items()})
                    atomic_write_text(done_file, json.dumps(summary, indent=1))
                self._append_log({"task_id": f"{exp.id}/{k + 1}:{step.method}", "input": step.describe(),
                                  "output": str(result.artifact), "verdict": "done", "gpu_hours": result.device_hours,
                                  "notes": "; ".join(result.notes), "wall_s": round(time.perf_counter() - start, 1)})
            results.append(result)
            if not method.quantizes:
                model = result.model
        return results, entering

    # -- measuring ------------------------------------------------------------------------------
    def _cached(self, exp_id: str, key: str) -> tuple[Any, dict] | None:
        """A record measured before under the same steps (`key`), with its eval JSON's details."""
        path = self.run_dir / record_file_name(exp_id)
        if not path.is_file() or not (self.resume or exp_id == "P0_teacher_run1"):
            return None
        try:
            payload = json.loads(path.read_text())
            if payload.get("details", {}).get("plan_key") != key:
                return None
            return record_from_row(payload["record"], self.task.record_type), payload["details"]
        except (ValueError, KeyError, TypeError):
            return None

    def measure(self, subject: StepResult, *, exp_id: str, combo: str, key: str, stage: str | None = None,
                reference: Any = None, experiment: str | None = None, notes: list[str] | None = None,
                extra: dict | None = None) -> tuple[Evaluation, GateVerdict | None]:
        """Evaluate `subject` on the workload, apply `stage`'s gate against `reference` (none when
        either is None), write <exp_id>_eval.json and the result_table.csv row."""
        evaluation = evaluate(subject.model, self.workload, device=self.device, exp_id=exp_id, combo=combo, step=subject,
                              options=self.options, data=self.data, task=self.task, progress=self.progress)
        record = evaluation.record
        verdict = None
        step_notes = list(notes if notes is not None else subject.notes)
        if stage is not None and reference is not None:
            contended = subject.latency_contended if subject.latency_cut is not None else \
                bool((evaluation.details.get("contention") or {}).get("contended"))
            verdict = check_gate(stage, record, reference, rule=self.plan.gates.get(stage), latency_cut=subject.latency_cut,
                                 task=self.task, latency_contended=contended)
            step_notes.append(verdict.note())
            evaluation.details["vs_reference"] = _vs_reference(record, reference, self.task)
        record.notes = "; ".join(filter(None, [*step_notes, record.notes]))
        evaluation.details["step"] = json_safe(subject.details)
        evaluation.details.update(json_safe(subject.eval_details))
        evaluation.details["gate"] = None if verdict is None else {**verdict.to_json(), "reference": reference.exp_id}
        evaluation.details["plan_key"] = key
        if experiment is not None:
            evaluation.details["plan_experiment"] = experiment
        if extra:
            evaluation.details.update(json_safe(extra))
        if self.rank == 0:
            write_record(self.run_dir, evaluation.to_json(), record)
        return evaluation, verdict

    def _measure_once(self, subject: StepResult, exp_id: str, combo: str, key: str, **kw) -> Measured:
        """measure(), or the record an earlier run measured under the same key."""
        cached = self._cached(exp_id, key)
        if cached is not None:
            record, details = cached
            return Measured(exp_id, record, details, details.get("gate"))
        evaluation, _ = self.measure(subject, exp_id=exp_id, combo=combo, key=key, **kw)
        return Measured(exp_id, evaluation.record, evaluation.details, evaluation.details["gate"])

    def teacher_record(self) -> Any:
        """The teacher's P0 record on this workload (teacher_eval.json), measured once: a stored one
        is reused when it measured the same weights on the same data."""
        if self.baseline is None:
            key = f"teacher:{weights_sha256(self.teacher)}:{self.task.data_hash(self.workload)}"
            subject = StepResult(model=self.teacher, artifact=self.teacher_path)
            self.baseline = self._measure_once(subject, "P0_teacher_run1", "teacher", key)
        return self.baseline.record

    def _reference(self, exp: Experiment, results: list[StepResult], entering: torch.nn.Module, key: str) -> Any:
        """The record an experiment's gate compares with, as its last method says (teacher | input |
        own_float). "input": K→Q, P→K→Q compare with their prefix experiment (measured here when the
        plan lacks it); own_float (joint PQK): the step's own float model before INT8 export."""
        kind = exp.reference_kind
        if kind == "teacher":
            return self.teacher_record()
        last = results[-1]
        if kind == "own_float":
            label = f"{_keyparams(exp.steps, last.fields, last.details)}_FP32"
            fields = {k: v for k, v in last.fields.items() if k in ("rho", "T", "beta", "gamma")}
            subject = StepResult(model=last.count_model, artifact=None, fields=fields)
            return self._measure_once(subject, make_exp_id("", exp.combo, label), exp.combo, key + ":fp32").record
        for prefix in self.plan.prefixes(exp):
            if len(prefix.steps) == len(exp.steps) - 1 and prefix.id in self.records:
                return self.records[prefix.id]
        combo = exp.combo[:-len(exp.steps[-1].impl.letter)] or "teacher"
        fields = {}
        for r in results[:-1]:
            fields.update(r.fields)
        subject = StepResult(model=entering, artifact=None, fields=fields)
        return self._measure_once(subject, make_exp_id("", combo, "FP32"), combo, self._key(exp, exp.steps[:-1])).record

    # -- experiments ----------------------------------------------------------------------------
    def run(self) -> list[ExperimentStatus]:
        self.prepare()
        if self.rank != 0:  # non-main processes of a torchrun share the main one's lock
            return self._run_all()
        with run_lock(self.run_dir, self.wait):
            if self.plan.path is not None and Path(self.plan.path).is_file():
                self._copy_plan()
            return self._run_all()

    def _run_all(self) -> list[ExperimentStatus]:
        statuses: dict[str, ExperimentStatus] = {}
        start, started = time.perf_counter(), now_iso()
        for exp in self.plan.experiments:
            reasons = self._blocked(exp, statuses)
            if reasons:
                statuses[exp.id] = ExperimentStatus(exp.id, exp.exp_id or "", "stopped", "", reasons, stage=exp.stage)
                self.log(f"{exp.id}: stopped ({'; '.join(reasons)})")
                self._append_log({"task_id": exp.id, "input": ", ".join(s.describe() for s in exp.steps),
                                  "output": "", "verdict": "stopped", "gpu_hours": 0.0, "notes": "; ".join(reasons)})
                continue
            statuses[exp.id] = self.run_experiment(exp)
        if self.rank == 0:
            self._write_ablations(statuses)
            self._write_manifest(statuses, started, time.perf_counter() - start)
        return list(statuses.values())

    def _blocked(self, exp: Experiment, statuses: dict[str, ExperimentStatus]) -> list[str]:
        """Why `exp` must not run under gate_policy stop (an experiment it builds on failed its gate)."""
        if self.plan.gate_policy != "stop":
            return []
        reasons = []
        for p in self.plan.prefixes(exp):
            st = statuses.get(p.id)
            if st is None:
                continue
            if st.verdict == "stop":  # "inconclusive" (a contended timing) does not stop what builds on it
                reasons.append(f"{p.id}: gate stop ({'; '.join(st.reasons)})")
            elif st.state != "done":
                reasons.append(f"{p.id}: {st.state}")
        return reasons

    def run_experiment(self, exp: Experiment) -> ExperimentStatus:
        """Run (or restore) the experiment's steps, measure it and gate it."""
        if not exp.steps:
            record = self.teacher_record()
            self.records[exp.id] = record
            return ExperimentStatus(exp.id, record.exp_id, "done", "", [], record, "P0",
                                    [self.baseline])
        key = self._key(exp, exp.steps)
        results, entering = self._run_steps(exp)
        if self.rank != 0:  # a non-main process under torchrun trains; rank 0 measures and writes
            return ExperimentStatus(exp.id, exp.exp_id or "", "done", stage=exp.stage)
        last = results[-1]
        exp_id = exp.exp_id or make_exp_id("", exp.combo, _keyparams(exp.steps, last.fields, last.details)
                                            + budget_tag(exp.budget))
        subjects = self._subjects(exp, exp_id, results)
        cached = [self._cached(name, key) for name in subjects]
        if all(c is not None for c in cached):
            measured = [Measured(n, c[0], c[1], c[1].get("gate")) for n, c in zip(subjects, cached)]
            self.log(f"{exp.id}: measured before ({', '.join(subjects)}), gate {(measured[0].gate or {}).get('verdict', '-')}")
            return self._status(exp, measured, cached=True)
        reference = self._reference(exp, results, entering, key)
        self.log(f"{exp.id}: evaluating {', '.join(subjects)} (gate {exp.stage})")
        measured = []
        for name, subject in subjects.items():
            evaluation, _ = self.measure(subject, exp_id=name, combo=exp.combo, key=key, stage=exp.stage, reference=reference,
                                         experiment=exp.id)
            measured.append(Measured(name, evaluation.record, evaluation.details, evaluation.details["gate"]))
        status = self._status(exp, measured, cached=False)
        self._append_log({"task_id": exp.id, "input": ", ".join(s.describe() for s in exp.steps),
                          "output": ", ".join(m.eval_file for m in measured), "verdict": status.verdict or "measured",
                          "gpu_hours": status.record.gpu_hours, "notes": status.record.notes})
        return status

    def _subjects(self, exp: Experiment, exp_id: str, results: list[StepResult]) -> dict[str, StepResult]:
        """exp_id -> what is measured: the last step's result (fields of every step merged,
        device-hours of every step summed, shared steps included), and with `measure_variants`
        each of its variants as <combo>_<tag>_run1 instead."""
        fields: dict = {}
        for r in results:  # P→K→Q: rho from P, T/beta/gamma from K, bits/keep-list from Q
            fields.update(r.fields)
        hours = sum(r.device_hours for r in results)
        steps_note = f"steps: {' -> '.join(s.describe() for s in exp.steps)}"
        if exp.budget is not None:
            steps_note += f" at budget {exp.budget:g}"
        last = results[-1]
        chosen = {exp_id: last}
        if self.measure_variants and last.variants:
            chosen = {make_exp_id("", exp.combo, tag): v for tag, v in last.variants.items()}
        return {name: replace(r, fields={**fields, **r.fields}, device_hours=hours - last.device_hours + r.device_hours,
                              notes=[*r.notes, steps_note], variants={})
                for name, r in chosen.items()}

    def _status(self, exp: Experiment, measured: list[Measured], cached: bool) -> ExperimentStatus:
        primary = measured[-1] if self.measure_variants and len(measured) > 1 else measured[0]
        self.records[exp.id] = primary.record
        gate = primary.gate or {}
        return ExperimentStatus(exp.id, primary.exp_id, "done", gate.get("verdict", ""),
                                list(gate.get("reasons") or gate.get("undecided") or []),
                                primary.record, exp.stage, measured, cached)

    def _write_ablations(self, statuses: dict[str, ExperimentStatus]) -> None:
        """ablation_keep.json / ablation_calib.json / ablation_loss.json: the P5 groups' records."""
        groups: dict[str, list] = {}
        for exp in self.plan.experiments:
            if exp.ablation is None:
                continue
            st = statuses.get(exp.id)
            groups.setdefault(exp.ablation, []).append({
                "experiment": exp.id, "steps": [s.describe() for s in exp.steps],
                "state": st.state if st else "not run", "verdict": st.verdict if st else "",
                "record": None if st is None or st.record is None else st.record.as_row(),
            })
        for kind, rows in groups.items():
            write_json(self.run_dir / f"ablation_{kind}.json", {"ablation": kind, "experiments": rows})

    def _write_manifest(self, statuses: dict[str, ExperimentStatus], started: str, wall_s: float) -> None:
        """run.json: what ran, in which state, with which typed gate verdicts (the report's input)."""
        write_json(self.run_dir / MANIFEST, {
            "plan": self.plan.name, "task": self.task.name, "plan_file": str(self.plan.path), "budget": self.plan.budget,
            "gate_policy": self.plan.gate_policy, "started": started, "finished": now_iso(), "wall_time_s": round(wall_s, 1),
            "teacher": str(self.teacher_path), "experiments": [s.to_json() for s in statuses.values()],
        })


def _vs_reference(record: Any, reference: Any, task) -> dict:
    """Relative reductions against the gate's reference (positive = smaller / faster)."""
    keys = ["params_M", "flops_G", "size_MB", task.latency_fields["p50_ms"]]
    out = {}
    for key in keys:
        new, ref = getattr(record, key, None), getattr(reference, key, None)
        out[key] = (1.0 - new / ref) if new is not None and ref else None
    return out
