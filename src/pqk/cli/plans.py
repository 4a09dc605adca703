"""Commands on plans: run, budget, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pqk.cli.common import Device, _resolve_device, app, err, out
from pqk.errors import InputError
from pqk.measure.money import DEFAULT_RATE_USD_PER_H

# --- pqk run --------------------------------------------------------------------------------


@app.command(
    "run",
    epilog="Example (the main job on the embedded default, minutes on 2 cores): pqk run configs/plans/minimal.yaml",
)
def run_cmd(
    plan_file: Path = typer.Argument(..., help="A plan: configs/plans/minimal.yaml, medium.yaml or best.yaml (or your own)."),
    out_root: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs go to <out>/<plan name>/."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where training and evaluation run."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs per evaluation."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Override the plan's budget (multiplies epochs and calibration sizes); the run goes to <out>/<plan>_budget<b>/."),
    gate_policy: Optional[str] = typer.Option(None, "--gate-policy", help="Override the plan's gate policy: stop (dependents of a failed gate are not run) or record (run them, keep the verdicts)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated experiment ids to run (with the experiments they build on), e.g. PKQ,PQK."),
    wait: bool = typer.Option(False, "--wait", help="When another pqk run is writing the same run folder, wait for it to finish (default: refuse)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write <out>/<plan>/report/ at the end (pqk report, with the budget estimate probed on this machine)."),
) -> None:
    """Run a plan end to end: every experiment's steps (distill, prune, quantize) with shared steps
    computed once, each experiment measured by the one evaluation function and gated, all records in
    <out>/<plan>/result_table.csv. Interrupted? Run the same command again: finished steps are reused
    and training resumes from its last checkpoint."""
    from dataclasses import replace as _replace

    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.plan import GATE_POLICIES, load_plan
    from pqk.pipeline.runner import PlanRunner

    plan = load_plan(plan_file)
    if gate_policy is not None:
        if gate_policy not in GATE_POLICIES:
            raise InputError(f"--gate-policy {gate_policy!r} is not known; accepted: {', '.join(GATE_POLICIES)}")
        plan = _replace(plan, gate_policy=gate_policy)
    if budget is not None:
        plan = plan.with_budget(budget)
    if only is not None:
        plan = plan.select([i.strip() for i in only.split(",") if i.strip()])
    dev = _resolve_device(device)
    _warn_if_contended()
    start = time.perf_counter()
    with err.status(f"plan {plan.name}") as status:
        def log(msg: str) -> None:
            status.update(f"plan {plan.name}: {msg}")
            if not msg.startswith(("  ", "evaluating:")):
                err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", soft_wrap=True)

        runner = PlanRunner(plan, out_root, device=dev, log=log, eval_options=EvalOptions(repeats=repeats), wait=wait)
        statuses = runner.run()
    from rich.table import Table

    table = Table(title=f"plan {plan.name}: {time.perf_counter() - start:.0f} s")
    columns = runner.task.summary_columns
    for col in ("experiment", "exp_id", "state", "gate", *(label for _, label, _ in columns), "notes"):
        table.add_column(col)
    for st in statuses:
        rec = st.record
        cells = ["" if rec is None or getattr(rec, key) is None else format(getattr(rec, key), spec)
                 for key, _, spec in columns]
        table.add_row(st.id, st.exp_id, st.state, st.verdict or "-", *cells, "; ".join(st.reasons)[:80])
    out.print(table)
    out.print(f"records: {runner.run_dir / 'result_table.csv'}; log: {runner.run_dir / 'execution_log.jsonl'}")
    if report:
        from pqk.report import build_report

        with err.status("report") as status:
            written = build_report(runner.run_dir, budget=plan.budget, log=lambda msg: status.update(f"report: {msg}"))
        out.print(f"report: {written.folder / 'report.html'} ({time.perf_counter() - start:.0f} s in all)")


# --- pqk budget / pqk report ------------------------------------------------------------------


def _inconclusive(verdicts: list[str]) -> str:
    n = verdicts.count("inconclusive")
    return f"{n} inconclusive (latency timed on a contended machine), " if n else ""


def _warn_if_contended() -> None:
    """Other processes busy on the cores make every latency figure of the run a measure of the
    load: say so before hours are spent (latency gates will read "inconclusive")."""
    from pqk.measure.machine import Contention

    with Contention() as probe:
        time.sleep(0.5)
    if probe.contended:
        err.print(f"[bold yellow]warning:[/] other processes are using {probe.others_share:.0%} of this machine's cores: "
                  "latency figures will be marked contended and latency gates inconclusive; quality is unaffected")


@app.command(
    "budget",
    epilog="Example (about a minute on a 2-core CPU): pqk budget configs/plans/minimal.yaml --gpu h100",
)
def budget_cmd(
    plan: Path = typer.Argument(..., help="The plan file (configs/plans/minimal.yaml, medium.yaml, best.yaml).", show_default=False),
    gpu: str = typer.Option("h100", "--gpu", help="Target device: a100, h100 (a range: A100 time / 2.2..1.7) or cpu (this machine's measured time)."),
    rate: float = typer.Option(DEFAULT_RATE_USD_PER_H, "--rate", help="Price in USD per device-hour (default: document 000's H100 price)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="The teacher checkpoint the plan starts from. Default: the plan's, else the bundled one."),
    budget: float = typer.Option(1.0, "--budget", help="Multiplies every epoch count and the calibration set, as `pqk run` does (1.0 = the protocol's full length)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file (pqk report --estimate reads it)."),
    probe_steps: int = typer.Option(3, "--probe-steps", help="Timed training steps per probe, after one warm-up step (median)."),
    peak_tflops: float = typer.Option(312.0, "--peak-tflops", help="A100 peak, bf16 dense tensor-core TFLOP/s."),
    utilisation: float = typer.Option(0.35, "--utilisation", help="Share of the peak a training loop sustains."),
    h100_speedup: str = typer.Option("1.7,2.2", "--h100-speedup", help="How much faster an H100 is than an A100: LOW,HIGH."),
) -> None:
    """Estimate a plan's device-hours and money before spending them: a short probe on this machine
    (a few training steps and forward passes of every model the plan trains, FLOPs counted), scaled
    to the target GPU, multiplied by each experiment's steps, calibration and evaluation passes."""
    from pqk.pipeline.budget import (
        Factors,
        check_gpu,
        estimate_plan,
        estimate_table,
        footer_lines,
        parse_speedup,
    )
    from pqk.pipeline.record import write_json

    gpu = check_gpu(gpu)  # before the probe: a typo costs nothing
    factors = Factors(peak_tflops, utilisation, parse_speedup(h100_speedup))
    with err.status("probing") as status:
        result = estimate_plan(plan, gpu, rate, budget, teacher=teacher, factors=factors, probe_steps=probe_steps,
                               log=lambda msg: status.update(msg))
    out.print(estimate_table(result))
    for line in footer_lines(result):
        out.print(line, style="dim" if not line.startswith("note") else None)
    if json_path is not None:
        out.print(f"wrote {write_json(json_path, result)}")


@app.command("report", epilog="Example (after pqk run configs/plans/minimal.yaml): pqk report runs/minimal")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A plan's run folder (runs/<plan>): result_table.csv, *_eval.json, execution_log.jsonl.", show_default=False),
    plan: Optional[Path] = typer.Option(None, "--plan", help="The plan file, for the budget table. Default: RUN_DIR/plan.yaml (the runner's copy)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Quality axis of the Pareto plot: a quality column of the family's record "
                                         "(DUSt3R: delta1, absrel, rmse, chamfer; CLIP: r_mean, r1_i2t, zs_top1, vqa_acc, ...). "
                                         "Default: the family's main metric (delta1, r_mean)."),
    estimate: Optional[Path] = typer.Option(None, "--estimate", help="A `pqk budget --json` file to compare with instead of probing now."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="Leave the budget table out (no probe)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Device of the estimate: a100, h100, cpu. Default: the device the records were measured on."),
    rate: Optional[float] = typer.Option(None, "--rate", help="USD per device-hour. Default: the records' rate."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Budget knob of the estimate. Default: the plan's (what the runner used)."),
    scene_scale: Optional[Path] = typer.Option(None, "--scene-scale", help="A benchmarks/scene_scale.py result to report "
                                               "(growth curves, cache, cascade). Default: RUN_DIR/scene_scale.json when present."),
    benchmarks: Path = typer.Option(Path("benchmarks/results"), "--benchmarks", help="Folder of the benchmarks' JSON results "
                                    "(pair_latency, teal_speed, matmul_nbits_speed, scene_scale): the full-size speed-ups of "
                                    "the accelerations' ROI table, drawn when the plan has attn8, rotate or teal steps."),
) -> None:
    """Tables (Markdown, LaTeX), a Pareto plot of quality vs latency, resources relative to the teacher,
    gate verdicts, the budget estimate vs device-hours spent and the daily execution log, all on one
    self-contained HTML page: RUN_DIR/report/report.html."""
    from pqk.pipeline.budget import check_gpu
    from pqk.report import build_report

    if gpu is not None:
        check_gpu(gpu)
    with err.status("report") as status:
        report = build_report(run_dir, plan=plan, metric=metric, estimate=estimate, compute_estimate=not no_estimate,
                              gpu=gpu, rate=rate, budget=budget, log=lambda msg: status.update(msg), scene_scale=scene_scale,
                              benchmarks=benchmarks)
    verdicts = [g.verdict for g in report.gates]
    out.print(f"{len(verdicts)} gate rows: {verdicts.count('pass')} pass, {verdicts.count('stop')} stop, "
              f"{_inconclusive(verdicts)}{verdicts.count('stopped (not run)')} not run; "
              f"Pareto front ({report.pareto['metric']}): {', '.join(report.pareto['front']) or '—'}")
    for note in report.notes:
        out.print(f"note: {note}")
    out.print(f"wrote {', '.join(sorted(report.files))} to {report.folder}; open {report.folder / 'report.html'}")


