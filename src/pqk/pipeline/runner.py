"""Executes a plan: every experiment's steps, cached and resumable, each experiment measured
by `evaluate` and gated, all records in runs/<plan>/result_table.csv.

- A step's cache key is the hash of (base model file, workload data, budget, seed, and every
  step so far with its config file's content and options). K→Q finds K's distillation done
  under the same key and reuses it; a rerun after an interruption skips finished steps and
  training resumes from the step's own last.pth.
- A finished step leaves `steps/<method>-<key>/done.json`; a measured experiment leaves
  `<exp_id>_eval.json` tagged with its key. Both are written last and atomically, so a kill
  at any point loses at most the unfinished piece.
- Gates: each experiment is gated by its stage against its reference (the teacher; the FP32
  model before quantization for P3). With `gate_policy: stop` (the protocol's stop-loss) the
  experiments that build on a failed one are marked "stopped" with the reason and not run;
  `record` runs them anyway and keeps the verdicts.
- `execution_log.jsonl`: the daily log (date, task id, input/config, output, verdict,
  device-hours, notes), one line per step and experiment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from pqk.pipeline.evaluate import EvalOptions
from pqk.pipeline.experiment import json_safe, measure_step, teacher_reference, write_evaluation
from pqk.pipeline.plan import QUANTIZING, Experiment, Plan, PlanStep
from pqk.pipeline.record import Record, atomic_write_text, exp_id as make_exp_id, now_iso, write_json
from pqk.pipeline.gates import record_from_row
from pqk.methods.base import StepContext, StepResult

DONE = "done.json"
LOG = "execution_log.jsonl"


@dataclass
class ExperimentStatus:
    id: str
    exp_id: str
    state: str  # done | stopped | failed
    verdict: str = ""  # pass | stop | "" (P0)
    reasons: list[str] = field(default_factory=list)
    record: Record | None = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _chain_key(base_key: str, steps: list[PlanStep]) -> str:
    key = base_key
    for step in steps:
        key = hashlib.sha256((key + step.fingerprint()).encode()).hexdigest()
    return key


def _append_log(run_dir: Path, entry: dict) -> None:
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(json_safe({"date": now_iso(), **entry})) + "\n")


_KEEP_TAGS = {"Softmax": "SM", "attention_scale": "AS", "LayerNorm": "LN"}


def _keyparams(steps: list[PlanStep], fields: dict, details: dict | None = None) -> str:
    """The exp_id's key parameters: K1 / K1feat (distill run), r030 (prune), PTQ or QAT plus
    what differs from the default spec (keepSMLN: the keep-list, cal128: the calibration size)."""
    last = steps[-1]
    if last.method == "joint":
        return (details or {}).get("keyparams", "joint")
    if last.method == "quantize":
        from pqk.methods.quantize import KEEP_KINDS

        tag = "QAT" if (details or {}).get("qat") else "PTQ"
        keep = last.options.get("keep_list")
        if keep is not None and list(keep) != list(KEEP_KINDS):
            tag += "_keep" + ("".join(_KEEP_TAGS.get(k, k) for k in keep) or "none")
        if "calibration_size" in last.options:
            tag += f"_cal{int(last.options['calibration_size'])}"
        return tag
    if last.method == "prune":
        return f"r{round(float(fields.get('rho', 0)) * 100):03d}"
    run = str(last.options.get("run", "K-1"))
    tag = run.replace("-", "").replace("_", "") if run != "control" else "taskonly"
    if "gamma" in last.options:
        tag += f"G{float(last.options['gamma']):g}".replace(".", "")
    return tag


def _run_method(step: PlanStep, model: torch.nn.Module, ctx: StepContext) -> tuple[StepResult, dict]:
    """Run one step; returns its result and what is needed to rebuild it from the cache."""
    if step.method == "distill":
        from pqk.methods.distill import distill_step, load_distill_config

        grid = load_distill_config(step.config)
        run = step.options.get("run") or next(iter(grid.runs))
        if run not in grid.runs:
            from pqk.errors import ConfigError

            raise ConfigError(f"distillation run {run!r} is not in {step.config}; accepted: {', '.join(grid.runs)}")
        spec = grid.runs[run]
        if "gamma" in step.options:  # ABL-3: the same run with feature distillation
            spec = replace(spec, gamma=float(step.options["gamma"]))
        return distill_step(model, ctx, spec), {}
    if step.method == "prune":
        from pqk.methods.prune import load_prune_spec, prune_step

        spec = load_prune_spec(step.config)
        changes = {k: step.options[k] for k in ("rho", "allocation") if k in step.options}
        if changes:
            spec = replace(spec, **changes)
        return prune_step(model, ctx, spec), {}
    if step.method == "joint":
        from pqk.methods.joint import joint_step, load_joint_spec

        spec = load_joint_spec(step.config, run=step.options.get("run"), rho=step.options.get("rho"))
        runtimes = tuple(r.strip() for r in str(step.options.get("runtimes", "onednn,onnxruntime")).split(","))
        result, outcome = joint_step(ctx.teacher, ctx, spec, runtimes)
        return result, {"float_model": outcome.details["joint"]["checkpoint"]}
    from pqk.methods.quantize import load_quant_spec
    from pqk.methods.quantize_step import RUNTIMES, QuantRun, quantize_step

    spec = load_quant_spec(step.config)
    if "keep_list" in step.options:
        spec = spec.with_keep_list(step.options["keep_list"])
    if "calibration_size" in step.options:
        spec = replace(spec, calibration=replace(spec.calibration, size=int(step.options["calibration_size"])))

    runtimes = step.options.get("runtimes", ",".join(("onednn", "onnxruntime")))
    run = QuantRun(runtimes=tuple(r.strip() for r in str(runtimes).split(",")) or RUNTIMES, qat=step.options.get("qat", "auto"),
                   fixed_calibration="calibration_size" in step.options)
    result, outcome = quantize_step(model, ctx, spec, run)
    # A QAT model's float weights (LayerNorms included) differ from the input model's.
    return result, {"float_model": outcome.details.get("qat", {}).get("checkpoint")}


def _trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A step's own copy of its input: steps may change a model in place, and distillation
    freezes the teacher's parameters (a frozen model is invisible to pruning's dependency
    graph, which follows autograd)."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def _save_done(step_dir: Path, result: StepResult, rebuild: dict, method: str) -> None:
    payload = {
        "method": method, "artifact": str(result.artifact), "fields": result.fields, "device_hours": result.device_hours,
        "backend": result.backend, "onnx_path": None if result.onnx_path is None else str(result.onnx_path),
        "runtime": result.runtime, "notes": result.notes, "details": json_safe(result.details), "rebuild": rebuild,
    }
    atomic_write_text(step_dir / DONE, json.dumps(payload, indent=1))


def _load_done(step_dir: Path, prev_model: torch.nn.Module) -> StepResult:
    from pqk.models.dust3r import load_checkpoint

    data = json.loads((step_dir / DONE).read_text())
    common = dict(artifact=Path(data["artifact"]), fields=data["fields"], device_hours=data["device_hours"],
                  notes=list(data["notes"]), details=data["details"], runtime=data.get("runtime"))
    if data["method"] not in QUANTIZING:
        return StepResult(model=load_checkpoint(data["artifact"]), **common)
    float_model = load_checkpoint(data["rebuild"]["float_model"]) if data["rebuild"].get("float_model") else prev_model
    if data["backend"] == "onnxruntime":
        return StepResult(model=None, backend="onnxruntime", onnx_path=Path(data["onnx_path"]), count_model=float_model, **common)
    from pqk.backends.torch_int8 import int8_model_from_qdq

    int8, _ = int8_model_from_qdq(float_model, data["artifact"])
    return StepResult(model=int8, backend="torch", count_model=float_model, **common)


class PlanRunner:
    """Runs a plan into runs/<plan name> (see the module docstring)."""

    def __init__(self, plan: Plan, out_root: Path = Path("runs"), device: str = "cpu",
                 log: Callable[[str], None] = print, eval_options: EvalOptions | None = None):
        self.plan = plan
        self.run_dir = Path(out_root) / plan.name
        self.device = device
        self.log = log
        self.options = eval_options or EvalOptions()

    # -- setup ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        from pqk.assets import default_checkpoint
        from pqk.models.dust3r import load_checkpoint
        from pqk.pipeline.record import ensure_writable_dir
        from pqk.pipeline.workload import load_scenes, load_workload

        self.workload = load_workload(self.plan.workload)
        self.scenes = load_scenes(self.workload)
        teacher_path = self.plan.teacher or default_checkpoint()[0]
        self.teacher_path = Path(teacher_path)
        self.teacher = load_checkpoint(self.teacher_path).eval()
        ensure_writable_dir(self.run_dir)
        self._copy_plan()
        self.base_key = hashlib.sha256(json.dumps({
            "teacher": file_sha256(self.teacher_path), "data": self.workload.data_hash,
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
            shutil.copyfile(self.plan.path, target)
            return
        raw = read_yaml(self.plan.path, "plan")
        ids = {e.id for e in self.plan.experiments}
        raw.update(name=self.plan.name, budget=self.plan.budget, gate_policy=self.plan.gate_policy,
                   experiments=[e for e in raw["experiments"] if e.get("id") in ids])
        header = f"# {self.plan.path} as run by pqk run with command-line overrides\n"
        atomic_write_text(target, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))

    def _ctx(self, out_dir: Path) -> StepContext:
        return StepContext(teacher=self.teacher, workload=self.workload, out_dir=out_dir, device=self.device,
                           budget=self.plan.budget, log=self.log)

    # -- steps --------------------------------------------------------------------------------
    def _step_dir(self, step: PlanStep, key: str) -> Path:
        return self.run_dir / "steps" / f"{step.method}-{key[:12]}"

    def _run_steps(self, exp: Experiment) -> tuple[StepResult, list[StepResult], torch.nn.Module]:
        """All steps of `exp` (cached ones reloaded); returns (last result, every result, the
        float model that entered the last step)."""
        model: torch.nn.Module = self.teacher
        results, entering = [], model
        for k, step in enumerate(exp.steps):
            key = _chain_key(self.base_key, exp.steps[: k + 1])
            step_dir = self._step_dir(step, key)
            entering = model
            if (step_dir / DONE).is_file():
                self.log(f"{exp.id}: step {k + 1} {step.describe()} cached ({step_dir.name})")
                result = _load_done(step_dir, model)
            else:
                self.log(f"{exp.id}: step {k + 1}/{len(exp.steps)} {step.describe()}")
                start = time.perf_counter()
                result, rebuild = _run_method(step, _trainable_copy(model), self._ctx(step_dir))
                _save_done(step_dir, result, rebuild, step.method)
                _append_log(self.run_dir, {"task_id": f"{exp.id}/{k + 1}:{step.method}", "input": step.describe(),
                                           "output": str(result.artifact), "verdict": "done",
                                           "gpu_hours": result.device_hours, "notes": "; ".join(result.notes),
                                           "wall_s": round(time.perf_counter() - start, 1)})
            results.append(result)
            if step.method not in QUANTIZING:
                model = result.model
        return results[-1], results, entering

    # -- experiments ----------------------------------------------------------------------------
    def _exp_id(self, exp: Experiment, last: StepResult | None) -> str:
        if not exp.steps:
            return "P0_teacher_run1"
        return make_exp_id("", exp.combo, _keyparams(exp.steps, last.fields if last else {}, last.details if last else None))

    def _cached_record(self, exp_id: str, key: str) -> Record | None:
        path = self.run_dir / f"{exp_id}_eval.json"
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
        except ValueError:
            return None
        if payload.get("details", {}).get("plan_key") != key:
            return None
        return record_from_row(payload["record"])

    def _p3_reference(self, exp: Experiment, last: StepResult, entering: torch.nn.Module, key: str) -> Record:
        """The FP32 record of the model a P3 experiment quantizes. K→Q, P→K→Q: its prefix
        experiment's (measured here when the plan lacks that experiment). Joint PQK has no
        prefix: its own float model (the pruned, distilled student before INT8 export)."""
        if exp.steps[-1].method == "joint":
            label = f"{_keyparams(exp.steps, last.fields, last.details)}_FP32"
            fields = {k: v for k, v in last.fields.items() if k in ("rho", "T", "beta", "gamma")}
            return self._measure_fp32(make_exp_id("", exp.combo, label), exp.combo, last.count_model, key + ":fp32", fields)
        for prefix in self.plan.prefixes(exp):
            if len(prefix.steps) == len(exp.steps) - 1 and prefix.id in self.records:
                return self.records[prefix.id]
        combo = exp.combo[:-1]
        return self._measure_fp32(make_exp_id("", combo, "FP32"), combo, entering,
                                  _chain_key(self.base_key, exp.steps[:-1]), {})

    def _measure_fp32(self, exp_id: str, combo: str, model: torch.nn.Module, key: str, fields: dict) -> Record:
        cached = self._cached_record(exp_id, key)
        if cached is not None:
            return cached
        step = StepResult(model=model, artifact=None, fields=dict(fields))
        evaluation, _ = measure_step(step, self._ctx(self.run_dir), exp_id=exp_id, combo=combo, stage=None,
                                     reference=None, options=self.options, scenes=self.scenes)
        evaluation.details["plan_key"] = key
        write_evaluation(evaluation, self.run_dir)
        return evaluation.record

    def run(self) -> list[ExperimentStatus]:
        self._prepare()
        self.records: dict[str, Record] = {}
        self.baseline: Record | None = None
        statuses: dict[str, ExperimentStatus] = {}
        start = time.perf_counter()
        for exp in self.plan.experiments:
            blocked = [p for p in self.plan.prefixes(exp) if p.id in statuses and statuses[p.id].state != "done"
                       or (p.id in statuses and statuses[p.id].verdict == "stop")]
            if blocked and self.plan.gate_policy == "stop":
                reasons = [f"{p.id}: gate stop ({'; '.join(statuses[p.id].reasons)})" if statuses[p.id].verdict == "stop"
                           else f"{p.id}: {statuses[p.id].state}" for p in blocked]
                statuses[exp.id] = ExperimentStatus(exp.id, "", "stopped", "", reasons)
                self.log(f"{exp.id}: stopped ({'; '.join(reasons)})")
                _append_log(self.run_dir, {"task_id": exp.id, "input": ", ".join(s.describe() for s in exp.steps),
                                           "output": "", "verdict": "stopped", "gpu_hours": 0.0, "notes": "; ".join(reasons)})
                continue
            statuses[exp.id] = self._run_experiment(exp)
        self._write_ablations(statuses)
        summary = {"plan": self.plan.name, "wall_time_s": round(time.perf_counter() - start, 1),
                   "experiments": [{"id": s.id, "exp_id": s.exp_id, "state": s.state, "verdict": s.verdict,
                                    "reasons": s.reasons} for s in statuses.values()]}
        write_json(self.run_dir / "status.json", summary)
        return list(statuses.values())

    def _baseline(self) -> Record:
        """The teacher's P0 record (measured once; teacher_reference reuses it from disk)."""
        if self.baseline is None:
            self.baseline = teacher_reference(self.teacher, self._ctx(self.run_dir), artifact=self.teacher_path,
                                              options=self.options, scenes=self.scenes)
        return self.baseline

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

    def _run_experiment(self, exp: Experiment) -> ExperimentStatus:
        if not exp.steps:
            record = self._baseline()
            self.records[exp.id] = record
            return ExperimentStatus(exp.id, record.exp_id, "done", "", [], record)
        key = _chain_key(self.base_key, exp.steps)
        last, results, entering = self._run_steps(exp)
        exp_id = self._exp_id(exp, last)
        cached = self._cached_record(exp_id, key)
        if cached is not None:
            payload = json.loads((self.run_dir / f"{exp_id}_eval.json").read_text())
            gate = payload["details"].get("gate") or {}
            self.records[exp.id] = cached
            self.log(f"{exp.id}: measured before ({exp_id}), gate {gate.get('verdict', '-')}")
            return ExperimentStatus(exp.id, exp_id, "done", gate.get("verdict", ""), gate.get("reasons", []), cached)
        stage = exp.stage
        reference = self._p3_reference(exp, last, entering, key) if stage == "P3" else self._baseline()
        latency_cut = None
        side = (last.details or {}).get("latency_side_by_side")
        if side:
            from pqk.methods.quantize_step import RUNTIME_LATENCY_KEY

            variant = RUNTIME_LATENCY_KEY["onednn" if last.backend == "torch" else "onnxruntime"]
            speedup = side["variants"].get(variant, {}).get("speedup")
            latency_cut = None if not speedup else 1.0 - 1.0 / speedup
        # Device-hours of every step this experiment needed (shared steps count for each).
        total_hours = sum(r.device_hours for r in results)
        fields: dict = {}
        for r in results:  # P→K→Q: rho from P, T/beta/gamma from K, bits/keep-list from Q
            fields.update(r.fields)
        measured = replace(last, fields=fields, device_hours=total_hours, notes=[*last.notes] + [f"steps: {' -> '.join(s.describe() for s in exp.steps)}"])
        self.log(f"{exp.id}: evaluating {exp_id} (gate {stage})")
        evaluation, gate = measure_step(measured, self._ctx(self.run_dir), exp_id=exp_id, combo=exp.combo, stage=stage,
                                        reference=reference, options=self.options, scenes=self.scenes,
                                        latency_cut=latency_cut, rule=self.plan.gates.get(stage))
        evaluation.details["plan_key"] = key
        evaluation.details["plan_experiment"] = exp.id
        write_evaluation(evaluation, self.run_dir)
        record = evaluation.record
        self.records[exp.id] = record
        verdict = gate["verdict"] if gate else ""
        _append_log(self.run_dir, {"task_id": exp.id, "input": ", ".join(s.describe() for s in exp.steps),
                                   "output": f"{exp_id}_eval.json", "verdict": verdict or "measured",
                                   "gpu_hours": record.gpu_hours, "notes": record.notes})
        return ExperimentStatus(exp.id, exp_id, "done", verdict, (gate or {}).get("reasons", []), record)
