"""`pqk budget`: the device-hours and money a plan will cost, before any of it runs.

How the figures are made:

1. **Probe.** Every model a plan trains or runs (the teacher, the student `derive_student` makes
   of it, a pruned copy, ...) is built on this machine, and at each shape the plan uses:
   - one *training step* (forward + backward + AdamW step) at the config's training
     resolution and batch, plus the frozen forward of the teacher where the method has one
     (distillation, QAT's FP32 target): 1 warm-up step, whose FLOPs `torch.utils.flop_counter`
     counts (1 MAC = 2 FLOPs, forward and backward), then `probe_steps` timed steps (median);
   - one *forward pass* (batch 1): evaluation, validation, calibration, sensitivity trials.
   A surrogate loss (the mean of every output map) stands in for the methods' losses: the
   backward pass still spans the whole network, which is what costs.
2. **Count.** Steps per experiment: epochs x steps_per_epoch (epochs x `budget`, as the
   methods scale them) per training run, validation pairs every epoch, calibration pairs,
   sensitivity trials, and one evaluation of the frozen workload (pairs + real pairs + latency
   warm-up/repeats + every pair of the scene-level scenes). A step shared with an earlier
   experiment (K→Q's distillation is K's) is the runner's cache: counted once.
3. **Scale.** `cpu`: the probe's measured seconds themselves. `a100`: FLOPs / (peak x
   utilisation), 312 TFLOP/s bf16 dense at 0.35 by default. `h100`: the A100 time divided by
   1.7..2.2, the user's plan's assumption (document 000), printed as a range.

Upper bounds on purpose: every epoch is counted (early stopping can only save), QAT is counted
although `--qat auto` runs it only when PTQ misses the gate. Not modelled: scene generation,
global alignment's optimisation, ONNX export, kernel-launch overhead (a small model on a GPU
is launch-bound, so its GPU figures are a floor, not an estimate of wall time).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pqk.errors import InputError
from pqk.measure.probe import CostModel, Costing, Item, Probe
from pqk.measure.money import DEFAULT_RATE_USD_PER_H
from pqk.pipeline.plan import Experiment, Plan, PlanStep, estimate_range

if TYPE_CHECKING:  # torch is imported where it is used: a bad --gpu fails before it loads
    import torch.nn as nn

    from pqk.tasks.base import Task

GPUS = ("a100", "h100", "cpu")


# --- factors: probe FLOPs -> device time ----------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """How counted FLOPs become device time on a target GPU.

    a100_peak_tflops: A100 tensor-core peak, bf16 dense (NVIDIA's datasheet: 312).
    utilisation: the share of that peak a training loop sustains (model FLOPs utilisation;
    0.35 is typical of transformer training that is not hand-tuned).
    h100_speedup: how much faster an H100 runs the same work (document 000: 1.7 to 2.2x)."""

    a100_peak_tflops: float = 312.0
    utilisation: float = 0.35
    h100_speedup: tuple[float, float] = (1.7, 2.2)

    def __post_init__(self) -> None:
        if not self.a100_peak_tflops > 0 or not math.isfinite(self.a100_peak_tflops):
            raise InputError(f"--peak-tflops {self.a100_peak_tflops!r} is not accepted; expected a number > 0")
        if not 0 < self.utilisation <= 1:
            raise InputError(f"--utilisation {self.utilisation!r} is not accepted; expected a fraction in (0, 1]")
        lo, hi = self.h100_speedup
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise InputError(f"--h100-speedup {lo},{hi} is not accepted; expected LOW,HIGH with 0 < LOW <= HIGH")

    def hours(self, gpu: str, flops: float, cpu_seconds: float) -> tuple[float, float]:
        """(low, high) device-hours of work measured as `flops` / `cpu_seconds` on this machine."""
        if gpu == "cpu":
            return cpu_seconds / 3600.0, cpu_seconds / 3600.0
        a100 = flops / (self.a100_peak_tflops * 1e12 * self.utilisation) / 3600.0
        if gpu == "a100":
            return a100, a100
        lo, hi = self.h100_speedup
        return a100 / hi, a100 / lo

    def to_json(self) -> dict:
        return {"a100_peak_tflops": self.a100_peak_tflops, "utilisation": self.utilisation,
                "h100_speedup": list(self.h100_speedup)}


def check_gpu(gpu: str) -> str:
    key = str(gpu).strip().lower()
    if key not in GPUS:
        raise InputError(f"--gpu {gpu!r} is not known; accepted: {', '.join(GPUS)}")
    return key


def parse_speedup(value: str) -> tuple[float, float]:
    """'1.7,2.2' -> (1.7, 2.2); one number -> (x, x)."""
    try:
        parts = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InputError(f"--h100-speedup {value!r} is not accepted; expected LOW,HIGH, e.g. 1.7,2.2")
    return parts[0], parts[1]


# --- the estimate -----------------------------------------------------------------------------


def _load_teacher(teacher: Any, plan: Plan, task: Task, notes: list[str]) -> tuple[nn.Module, str]:
    import torch.nn as nn

    if isinstance(teacher, nn.Module):
        module, name = copy.deepcopy(teacher), "teacher"
    else:
        path = teacher or plan.teacher
        if teacher is None and plan.teacher_name and not Path(plan.teacher).exists():
            raise InputError(f"plan teacher {plan.teacher_name} does not exist; pass --teacher")
        if path is None:
            path, _ = task.default_model()
            notes.append("teacher: the bundled 5.2M-parameter DUSt3R (pass --teacher for the official ViT-Large, "
                         "which the plan document's estimates are for)" if task.name == "dust3r" else
                         f"teacher: the bundled {task.name} teacher (pass --teacher for your own)")
        if not Path(path).exists():
            raise InputError(f"--teacher {path} does not exist")
        module, name = task.load_model(path, device="cpu"), "teacher"
    module.eval().requires_grad_(False)
    return module, f"{name} ({task.count_parameters(module) / 1e6:.2f}M params)"


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (hours of a small model are millionths)."""
    return 0.0 if x == 0 or not math.isfinite(x) else round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _pair(lo: float, hi: float) -> list[float]:
    return [_sig(lo), _sig(hi)]


def estimate_plan(
    plan_path: str | Path,
    gpu: str = "h100",
    rate: float = DEFAULT_RATE_USD_PER_H,
    budget: float = 1.0,
    *,
    teacher: str | Path | nn.Module | None = None,
    factors: Factors | None = None,
    probe_steps: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Device-hours and USD of every experiment of a plan on `gpu`, from a probe on this machine.

    Returns a JSON-ready dict: `experiments` (id, items with their hours/usd as [low, high],
    totals, the plan document's H100 estimate), `total`, `probe` (what was measured), `factors`
    and `notes`. `teacher`: a checkpoint path or a module (default: the plan's, else the bundled
    one). The plan is read by the one plan loader, leniently: a draft whose config files do not
    exist yet is still costed, and what could not be read becomes a note."""
    import torch

    from pqk.pipeline.plan import load_plan
    from pqk.tasks import get_task

    gpu = check_gpu(gpu)
    if not isinstance(rate, (int, float)) or rate < 0 or not math.isfinite(rate):
        raise InputError(f"--rate {rate!r} is not accepted; expected USD per hour >= 0")
    if not isinstance(budget, (int, float)) or not budget > 0 or not math.isfinite(budget):
        raise InputError(f"--budget {budget!r} is not accepted; expected a number > 0")
    factors = factors or Factors()
    plan = load_plan(plan_path, strict=False)
    task = get_task(plan.task)
    notes = list(plan.notes)
    if plan.budget_set and plan.budget != budget:
        notes.append(f"the plan sets budget {plan.budget:g} (what pqk run uses); this estimate is at budget {budget:g}")
    module, teacher_desc = _load_teacher(teacher, plan, task, notes)
    shape = task.evaluation_shape(plan.workload, notes)
    probe = Probe(task, probe_steps, log or (lambda _m: None))
    costing = Costing(module, "teacher", probe, float(budget), shape, notes)
    started = time.perf_counter()
    experiments = [_priced(exp, items, gpu, rate, factors) for exp, items in _bills(plan, costing)]
    doc_total = estimate_range(plan.estimates.get("total"))
    if doc_total is None and all(e.estimate_h100 for e in plan.experiments):
        doc_total = (sum(e.estimate_h100[0] for e in plan.experiments), sum(e.estimate_h100[1] for e in plan.experiments))
    result = {
        "plan": plan.name,
        "plan_file": str(plan.path),
        "description": plan.description,
        "gpu": gpu,
        "rate_usd_per_h": float(rate),
        "budget": float(budget),
        "factors": factors.to_json(),
        "probe": {"device": "cpu", "threads": torch.get_num_threads(), "steps": probe.steps, "teacher": teacher_desc,
                  "workload": {k: shape[k] for k in ("width", "height", "passes")},
                  "wall_s": round(time.perf_counter() - started, 1), "measured": probe.rows},
        "experiments": experiments,
        "total": {"plan_estimate_h100_hours": list(doc_total) if doc_total else None},
        "notes": notes,
    }
    _total(result)
    return result


def _step_key(step: PlanStep) -> str:
    return json.dumps([step.method, str(step.config or step.config_name), step.options], sort_keys=True, default=str)


def _bills(plan: Plan, costing: Costing) -> list[tuple[Experiment, list[Item]]]:
    """Every experiment's work items, each step priced by its method. The runner's step cache: a
    chain of steps already paid for by an earlier experiment is reused, so the plan pays for it
    once ("hours"); "hours_with_shared" counts it again, as the experiment's record does (its
    gpu_hours include every step it needed)."""
    from pqk.methods.base import method_names

    done: dict[str, tuple[str, CostModel, list[Item]]] = {}
    bills = []
    plan_budget = costing.budget
    for exp in plan.experiments:
        items: list[Item] = []
        model = costing.teacher
        # An experiment with its own budget trains and calibrates at it whatever the plan's is.
        costing.budget = plan_budget if exp.budget is None else exp.budget
        chain: list[str] = [f"budget={costing.budget!r}"]
        for k, step in enumerate(exp.steps):
            chain.append(_step_key(step))
            key = "|".join(chain)
            if key in done:
                paid_by, model, paid = done[key]
                items += [replace(it, what=f"{it.what} (cached from {paid_by})", reused_from=paid_by) for it in paid]
                continue
            where = f"experiment {exp.id}, step {k + 1}"
            if step.method not in method_names(step.family):
                costing.note(f"{where}: no cost model for method {step.method!r} "
                             f"(known: {', '.join(method_names(step.family))}); not counted")
                new_items = [Item(step.method, f"{step.label()}: not costed")]
            else:
                new_items, model = step.impl.cost(costing, step, model, where)
            items += new_items
            done[key] = (exp.id, model, new_items)
        items.append(costing.evaluation(model))
        bills.append((exp, items))
    costing.budget = plan_budget
    return bills


def _priced(exp: Experiment, items: list[Item], gpu: str, rate: float, factors: Factors) -> dict:
    rows = [{"step": it.step, "what": it.what, "flops": it.flops, "gflops": round(it.flops / 1e9, 3),
             "cpu_seconds": _sig(it.cpu_seconds, 6), "reused_from": it.reused_from, "conditional": it.conditional}
            for it in items]
    exp_row = {"id": exp.id, "steps": " -> ".join(s.label() for s in exp.steps) or "(teacher measured)", "items": rows,
               "plan_estimate_h100_hours": list(exp.estimate_h100) if exp.estimate_h100 else None}
    _price_experiment(exp_row, gpu, rate, factors)
    return exp_row


def _price_experiment(exp: dict, gpu: str, rate: float, factors: Factors) -> None:
    """Fill hours / usd of an experiment's items and its totals from their FLOPs and seconds."""
    for row in exp["items"]:
        lo, hi = factors.hours(gpu, row["flops"], row["cpu_seconds"])
        row["hours"], row["usd"] = _pair(lo, hi), _pair(lo * rate, hi * rate)
    own = [factors.hours(gpu, r["flops"], r["cpu_seconds"]) for r in exp["items"] if not r["reused_from"]]
    every = [factors.hours(gpu, r["flops"], r["cpu_seconds"]) for r in exp["items"]]
    lo, hi = sum(h[0] for h in own), sum(h[1] for h in own)
    exp["hours"], exp["usd"] = _pair(lo, hi), _pair(lo * rate, hi * rate)
    exp["hours_with_shared"] = _pair(sum(h[0] for h in every), sum(h[1] for h in every))
    exp["_exact"] = (lo, hi)


def reprice(result: dict, gpu: str, rate: float | None = None, factors: Factors | None = None) -> dict:
    """The same estimate on another device / price, without probing again: every item keeps the
    FLOPs and measured seconds it was priced from."""
    gpu = check_gpu(gpu)
    rate = result["rate_usd_per_h"] if rate is None else float(rate)
    if factors is None:
        f = result["factors"]
        factors = Factors(f["a100_peak_tflops"], f["utilisation"], tuple(f["h100_speedup"]))
    out = copy.deepcopy(result)
    out.update(gpu=gpu, rate_usd_per_h=rate, factors=factors.to_json())
    for exp in out["experiments"]:
        _price_experiment(exp, gpu, rate, factors)
    _total(out)
    return out


def _total(result: dict) -> None:
    # Totals from the unrounded sums, so they add up to the experiments' figures.
    exact = [e.pop("_exact", tuple(e["hours"])) for e in result["experiments"]]
    lo, hi = sum(x[0] for x in exact), sum(x[1] for x in exact)
    rate = result["rate_usd_per_h"]
    result["total"].update(hours=_pair(lo, hi), usd=_pair(lo * rate, hi * rate))


def format_range(pair: list[float] | tuple[float, float] | None, digits: int = 3, unit: str = "") -> str:
    """[a, b] -> 'a–b' (or 'a' when equal), in significant digits; None -> '—'."""
    if not pair:
        return "—"
    lo, hi = pair

    def f(x: float) -> str:
        if x == 0:
            return "0"
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"

    text = f(lo) if math.isclose(lo, hi, rel_tol=1e-9, abs_tol=0.0) else f"{f(lo)}–{f(hi)}"
    return f"{unit}{text}"


# --- printing ---------------------------------------------------------------------------------


def human_hours(hours: float) -> str:
    """Device time in the unit a reader takes in at a glance: s, min or h."""
    seconds = hours * 3600.0
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{hours:,.1f} h" if hours >= 100 else f"{hours:.3g} h"


def human_range(pair: list[float] | None) -> str:
    if not pair:
        return "—"
    lo, hi = pair
    return human_hours(lo) if math.isclose(lo, hi, rel_tol=1e-9) else f"{human_hours(lo)} – {human_hours(hi)}"


def usd_range(pair: list[float] | None) -> str:
    if not pair:
        return "—"

    def f(x: float) -> str:
        return f"${x:,.0f}" if x >= 100 else (f"${x:.2f}" if x >= 0.01 else f"${x:.2g}")

    lo, hi = pair
    return f(lo) if math.isclose(lo, hi, rel_tol=1e-9) else f"{f(lo)} – {f(hi)}"


def gpu_label(result: dict) -> str:
    f = result["factors"]
    if result["gpu"] == "cpu":
        return f"this CPU ({result['probe']['threads']} threads, measured)"
    a100 = f"A100 {f['a100_peak_tflops']:g} TFLOP/s x {f['utilisation']:g}"
    if result["gpu"] == "a100":
        return a100
    lo, hi = f["h100_speedup"]
    return f"H100 = A100 time / {hi:g}..{lo:g} ({a100})"


def estimate_table(result: dict):
    """The estimate as a rich Table: one bold row per experiment, its work items beneath."""
    from rich.table import Table

    doc = any(e["plan_estimate_h100_hours"] for e in result["experiments"]) or result["total"]["plan_estimate_h100_hours"]
    table = Table(title=f"plan {result['plan']}: {gpu_label(result)}, ${result['rate_usd_per_h']:g}/h, budget {result['budget']:g}")
    table.add_column("experiment", style="bold")
    table.add_column("work")
    table.add_column("GFLOP", justify="right")
    table.add_column("device time", justify="right")
    table.add_column("USD", justify="right")
    if doc:
        table.add_column("plan doc (H100)", justify="right")
    for exp in result["experiments"]:
        gflops = sum(i["gflops"] for i in exp["items"] if not i["reused_from"])
        row = [exp["id"], exp["steps"], f"{gflops:,.0f}", human_range(exp["hours"]), usd_range(exp["usd"])]
        if doc:
            row.append(format_range(exp["plan_estimate_h100_hours"], unit="") + (" h" if exp["plan_estimate_h100_hours"] else ""))
        table.add_row(*row, style="bold")
        for item in exp["items"]:
            what = item["what"] + (" *" if item["conditional"] else "")
            cells = ["", f"  {what}", f"{item['gflops']:,.1f}", human_range(item["hours"]), usd_range(item["usd"])]
            table.add_row(*cells, *([""] if doc else []), style="dim italic" if item["reused_from"] else "dim")
    total = result["total"]
    gflops = sum(i["gflops"] for e in result["experiments"] for i in e["items"] if not i["reused_from"])
    row = ["total", "cached steps counted once", f"{gflops:,.0f}", human_range(total["hours"]), usd_range(total["usd"])]
    if doc:
        est = total["plan_estimate_h100_hours"]
        row.append((format_range(est) + " h") if est else "—")
    table.add_section()
    table.add_row(*row, style="bold")
    return table


def footer_lines(result: dict) -> list[str]:
    probe = result["probe"]
    lines = [f"probe: {len(probe['measured'])} measurements of {probe['teacher']} and its derived models on this CPU "
             f"({probe['threads']} threads, {probe['steps']} timed steps after 1 warm-up) in {probe['wall_s']:g} s"]
    if any(i["conditional"] for e in result["experiments"] for i in e["items"]):
        lines.append("* counted as an upper bound: QAT runs only when PTQ misses the gate (qat: auto)")
    if result["gpu"] != "cpu":
        lines.append("GPU time = counted FLOPs / (peak x utilisation): a floor for small models, which are launch-bound")
    return lines + [f"note: {n}" for n in result["notes"]]


__all__ = ["Factors", "GPUS", "check_gpu", "estimate_plan", "estimate_table", "format_range", "parse_speedup", "reprice"]
