"""One method on one model: `pqk distill`, `pqk prune`, `pqk quantize`. Each builds a plan of
one experiment per setting (a distillation run, a ρ, the quantization) and runs it with the plan
runner, so a command and `pqk run` share every step, measurement, gate and file they write;
what is left here is reading the options and printing the summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pqk.cli.common import Device, _model_path, _resolve_device, app, err, out
from pqk.errors import InputError


def _split_list(value: str, what: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in accepted]
    if bad or not items:
        raise InputError(f"{what} {bad[0] if bad else value!r} is not known; accepted: {', '.join(accepted)} (comma-separated)")
    return items


def _one_method_plan(name: str, experiments: list, model: Path, workload: Path, budget: float):
    """A plan of the command's experiments: gates recorded, never stopping the others."""
    from pqk.pipeline.plan import Plan

    return Plan(name=name, experiments=experiments, path=None, teacher=model, workload=workload, budget=float(budget),
                gate_policy="record")


def _run(plan, out_dir: Path, what: str, **kw) -> tuple[list, object]:
    """Run `plan` into `out_dir` (flat: the command's own layout) under a status line."""
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.runner import PlanRunner

    repeats = kw.pop("repeats")
    with err.status(what) as status:
        runner = PlanRunner(plan, run_dir=out_dir, eval_options=EvalOptions(repeats=repeats), log=lambda m: status.update(f"{what}: {m}"),
                            progress=lambda m: status.update(f"evaluating: {m}"), **kw)
        return runner.run(), runner


# --- pqk quantize ---------------------------------------------------------------------------


@app.command(
    "quantize",
    epilog="Example (embedded teacher, 64 calibration pairs, ~5 min): "
    "pqk quantize --workload configs/workload.yaml --budget 0.125 --out runs/quant",
)
def quantize_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The FP32 DUSt3R to quantize (default: the bundled teacher)."),
    config: Path = typer.Option(Path("configs/quant.yaml"), "--config", "-c", help="The quantization spec (bits, keep-list, calibration)."),
    workload_file: Path = typer.Option(Path("configs/workload.yaml"), "--workload", "-w", help="The frozen workload (pqk workload make)."),
    out_dir: Path = typer.Option(Path("runs/quant"), "--out", "-o", help="Folder for model_fp32.onnx, ptq_int8.onnx, the eval JSONs and result_table.csv."),
    runtimes: str = typer.Option("onednn,onnxruntime,openvino", "--runtimes", help="INT8 runtimes to evaluate, comma-separated: onednn (PyTorch oneDNN INT8 + bf16 attention), onnxruntime (the QDQ file in ONNX Runtime), openvino (the QDQ file in OpenVINO, float parts in bf16). The record is the fastest's."),
    budget: float = typer.Option(1.0, "--budget", min=0.001, max=1.0, help="Scales the calibration set down (1.0 = the spec's size)."),
    combo: str = typer.Option("Q", "--combo", help="Record combo: Q (gate P2 vs the teacher) or KQ/PKQ (gate P3 vs this model in FP32)."),
    qat: str = typer.Option("auto", "--qat", help="QAT after PTQ: auto (when PTQ misses the quality gate), always, never."),
    auto_keep: bool = typer.Option(False, "--auto-keep", help="Probe each block's quality sensitivity and INT8 speed gain; keep in float the fewest blocks that meet the gate (and those INT8 does not speed up), then quantize again."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs per evaluation."),
) -> None:
    """Quantize a DUSt3R to W8A8 (protocol stage P2): calibrate on the one calibration set, write the
    QDQ file ptq_int8.onnx (int8 per-channel weights, keep-list in float), then measure that model on
    each INT8 runtime with the one evaluation function, time every runtime side by side (eager FP32
    and bf16, ONNX Runtime FP32 and INT8, oneDNN INT8, OpenVINO INT8) and apply the gate."""
    from pqk.io.files import write_json
    from pqk.methods.quantize_step import QAT_MODES, RUNTIMES
    from pqk.pipeline.plan import Experiment, PlanStep

    chosen = _split_list(runtimes, "--runtimes value", RUNTIMES)
    qat_mode = _split_list(qat, "--qat value", QAT_MODES)[0]
    options = {"runtimes": ",".join(chosen), "qat": qat_mode, "auto_keep": auto_keep}
    quantized = combo != "Q"  # a student: gated P3 against itself in FP32
    exp = Experiment(combo, [PlanStep("quantize", config, options, str(config))], combo_override=combo if quantized else None,
                     stage_override="P3" if quantized else None, folder=".")
    plan = _one_method_plan("quantize", [exp], _model_path(model, "--model"), workload_file, budget)
    statuses, _ = _run(plan, out_dir, "quantizing", repeats=repeats, measure_variants=True)
    measured = statuses[0].evaluations
    payloads = [m.to_json() for m in measured]
    from pqk.cli.models import _print_record

    for m, payload in zip(measured, payloads):
        _print_record(m.record, payload["details"])
    _print_side_by_side(payloads[-1]["details"]["step"]["latency_side_by_side"])
    # quant_eval.json: the protocol's name for the Q record: the last stage's first runtime.
    last_stage = measured[-1].exp_id.rsplit("_", 2)[0]
    first = next(p for m, p in zip(measured, payloads) if m.exp_id.rsplit("_", 2)[0] == last_stage)
    write_json(out_dir / ("quant_eval.json" if combo == "Q" else "kq_eval.json"), first)
    out.print(f"wrote {out_dir / 'ptq_int8.onnx'}, {len(measured)} eval JSON(s) and rows of {out_dir / 'result_table.csv'}")


def _print_side_by_side(latency: dict) -> None:
    from rich.table import Table

    table = Table(title=f"pair latency side by side ({latency['rounds']} interleaved rounds, {latency['threads']} threads, "
                  f"{latency['shape'][1]}x{latency['shape'][0]})")
    for col in ("runtime", "p50 ms", "p95 ms", "vs eager fp32"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, v in latency["variants"].items():
        table.add_row(name, f"{v['p50_ms']:.1f}", f"{v['p95_ms']:.1f}", f"{v.get('speedup', float('nan')):.2f}x")
    out.print(table)


# --- pqk prune ------------------------------------------------------------------------------


def _parse_rhos(value: str) -> list[float]:
    from pqk.methods.prune import check_rho

    rhos = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            number = float(item)
        except ValueError:
            raise InputError(f"--rho value {item!r} is not a number; accepted: fractions in (0, 1), comma-separated (e.g. 0.1,0.3)") from None
        rhos.append(check_rho(number))
    if not rhos:
        raise InputError(f"--rho {value!r} names no value; accepted: fractions in (0, 1), comma-separated (e.g. 0.1,0.3)")
    return rhos


@app.command(
    "prune",
    epilog="Example (embedded teacher, short fine-tuning): pqk prune --budget 0.1 --out runs/prune",
)
def prune_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The DUSt3R to prune (default: the bundled teacher)."),
    config: Path = typer.Option(Path("configs/prune.yaml"), "--config", "-c", help="The pruning spec (importance, sensitivity, calibration, fine-tuning)."),
    workload_file: Path = typer.Option(Path("configs/workload.yaml"), "--workload", "-w", help="The frozen workload (pqk workload make)."),
    out_dir: Path = typer.Option(Path("runs/prune"), "--out", "-o", help="Folder for pruned_rXXX.pth, sensitivity.json/png, the eval JSONs, prune_eval.json and result_table.csv."),
    budget: float = typer.Option(1.0, "--budget", min=0.001, help="Multiplies the fine-tuning epochs (1.0 = the spec's 12)."),
    rho: str = typer.Option("0.1,0.3", "--rho", help="Shares of the prunable parameters to remove, comma-separated; one pruned model each."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="sensitivity or uniform (default: the spec's)."),
    importance: Optional[str] = typer.Option(None, "--importance", help="l1 or taylor (default: the spec's)."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs per evaluation."),
    onnx_check: bool = typer.Option(True, "--onnx-check/--no-onnx-check", help="Export each pruned model to ONNX (pruned_rXXX.onnx) and compare ONNX Runtime with PyTorch."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse the steps and records already in --out and continue fine-tuning from its last.pth (--no-resume starts over)."),
) -> None:
    """Prune attention heads and FFN channels (protocol stage P4, P-only) with a dependency graph
    (Torch-Pruning), allocate per-block ratios by measured sensitivity (or uniformly), fine-tune with
    the task loss, and measure each pruned model with the one evaluation function against the
    teacher; the P4 gate (quality drop <= 3%, params/size down >= 25%) is recorded, never raised."""
    from pqk.io.files import write_json
    from pqk.methods.prune import (
        ALLOCATIONS,
        IMPORTANCES,
        artifact_name,
        check_choice,
        load_prune_spec,
        rho_tag,
    )
    from pqk.pipeline.plan import Experiment, PlanStep

    rhos = _parse_rhos(rho)
    spec = load_prune_spec(config)
    given = {"allocation": check_choice("--allocation", allocation, ALLOCATIONS) if allocation else None,
             "importance": check_choice("--importance", importance, IMPORTANCES) if importance else None}
    chosen = {k: v or getattr(spec, k) for k, v in given.items()}
    experiments = []
    for r in rhos:
        tag = (rho_tag(r) + ("" if chosen["allocation"] == "sensitivity" else f"_{chosen['allocation']}")
               + ("" if chosen["importance"] == "l1" else f"_{chosen['importance']}"))
        options = {"rho": r, "onnx_check": onnx_check, **{k: v for k, v in given.items() if v}}
        experiments.append(Experiment(tag, [PlanStep("prune", config, options, str(config))], exp_id=f"P_{tag}_run1", folder="."))
    plan = _one_method_plan("prune", experiments, _model_path(model, "--model"), workload_file, budget)
    start = time.perf_counter()
    statuses, runner = _run(plan, out_dir, "pruning", repeats=repeats, resume=resume)
    reference = runner.teacher_record()
    settings, rows = {}, []
    for r, st in zip(rhos, statuses):
        m = st.evaluations[0]
        details = m.details
        step = details.get("step") or {}
        settings[m.exp_id] = {
            "record": m.record.as_row(), "gate": m.gate, "artifact": artifact_name(r, chosen["allocation"]),
            "eval_json": m.eval_file, "prune": {k: v for k, v in (step.get("prune") or {}).items() if k != "removed_per_unit"},
            "finetune": step.get("finetune"), "vs_reference": details.get("vs_reference"), "onnx_check": details.get("onnx_check"),
        }
        rows.append((m.record, m.gate, details.get("vs_reference") or {}))
    write_json(out_dir / "prune_eval.json", {
        "stage": "P4", "reference": reference.as_row(), "settings": settings,
        "sensitivity": "sensitivity.json" if (out_dir / "sensitivity.json").is_file() else None})
    _print_prune_summary(reference, rows)
    out.print(f"wrote {', '.join(artifact_name(r, chosen['allocation']) for r in rhos)}, prune_eval.json and rows of "
              f"{out_dir / 'result_table.csv'} in {out_dir} ({time.perf_counter() - start:.0f}s)")


def _print_prune_summary(reference, rows: list) -> None:
    from rich.table import Table

    table = Table(title="P4 pruning vs the teacher (torch eager fp32)", box=None, padding=(0, 1))
    for col in ("exp_id", "params M", "GFLOPs", "size MB", "p50 ms", "absrel", "δ1", "FLOPs cut", "p50 cut", "gate"):
        table.add_column(col, justify="left" if col in ("exp_id", "gate") else "right", no_wrap=True)

    def cells(rec) -> list[str]:
        return [f"{rec.params_M:.3f}", f"{rec.flops_G:.2f}", f"{rec.size_MB:.2f}", f"{rec.t_pair_p50_ms:.0f}",
                f"{rec.absrel:.4f}", f"{rec.delta1:.4f}"]

    def pct(value) -> str:
        return "—" if value is None else f"{value:.0%}"

    table.add_row(reference.exp_id, *cells(reference), "—", "—", "ref")
    for rec, gate, cut in rows:
        table.add_row(rec.exp_id, *cells(rec), pct(cut.get("flops_G")), pct(cut.get("t_pair_p50_ms")),
                      gate["verdict"] if gate else "—")
    # Piped output defaults to 80 columns, too narrow for ten columns: widen it (a terminal keeps its own).
    (out if out.is_terminal else Console(highlight=False, width=112)).print(table)
    for rec, gate, _ in rows:
        if gate and gate["reasons"]:
            out.print(f"{rec.exp_id}: gate P4 stop ({'; '.join(gate['reasons'])})")


# --- pqk distill ----------------------------------------------------------------------------


@app.command(
    "distill",
    epilog="Example (embedded teacher, K-1 and its task-loss-only control, ~15 min on 2 CPU cores): "
    "pqk distill --runs K-1,control --out runs/distill",
)
def distill_cmd(
    teacher_file: Optional[Path] = typer.Option(None, "--teacher", "-t", help="The teacher DUSt3R (any layout pqk loads). Default: the bundled teacher."),
    config: Path = typer.Option(Path("configs/distill.yaml"), "--config", "-c", help="The P1 grid: runs K-1..K-3, the control, K-4, training settings."),
    workload_file: Path = typer.Option(Path("configs/workload.yaml"), "--workload", "-w", help="The frozen workload (pqk workload make)."),
    out_dir: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="Folder for <exp_id>/ (student, checkpoints, distill_log.json), the eval JSONs, result_table.csv and student_fp32_best.safetensors."),
    budget: Optional[float] = typer.Option(None, "--budget", min=0.001, help="Multiplies the epochs (1.0 = the protocol's 30). Default: the config's embedded_budget with the bundled teacher, else 1.0."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue each run from <out>/<exp_id>/last.pth; keep runs already measured."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Runs and selections to do, comma-separated (e.g. K-1,control). Default: all of the config."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where training and evaluation run (under torchrun with cuda: one GPU per process)."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs per evaluation."),
) -> None:
    """Distil DUSt3R into a smaller student (protocol stage P1, K-only): depth, heads and FFN width
    each cut ~30%, weights inherited from the teacher, trained with L = a*L_task + b*KL_T + g*feature;
    each run is measured with the one evaluation function and gated against the teacher (quality
    drop <= 1%; a failed gate is recorded, not raised). Runs under torchrun with DDP as well."""
    from pqk.assets import default_checkpoint
    from pqk.methods.distill import load_distill_config
    from pqk.methods.distill.select import parse_runs, select_best
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.plan import Experiment, PlanStep
    from pqk.pipeline.runner import PlanRunner
    from pqk.train.trainer import init_distributed

    grid = load_distill_config(config)
    names = parse_runs(runs, grid)
    dev = _resolve_device(device)
    rank, world = init_distributed()  # under torchrun: one process per GPU (or CPU share)
    if dev == "cuda" and world > 1:
        import torch

        dev = f"cuda:{torch.cuda.current_device()}"
    bundled = teacher_file is None or teacher_file.resolve() == default_checkpoint()[0].resolve()
    budget = budget if budget is not None else (grid.embedded_budget if bundled else 1.0)
    experiments = [Experiment(name, [PlanStep("distill", config, {"run": name}, str(config))], exp_id=grid.exp_id(name),
                              folder=grid.exp_id(name)) for name in names if name not in grid.select]
    plan = _one_method_plan("distill", experiments, _model_path(teacher_file, "--teacher"), workload_file, budget)
    main = rank == 0
    log = err.print if main else (lambda _m: None)
    start = time.perf_counter()
    # No spinner around this: training draws its own progress bar (one live display at a time).
    runner = PlanRunner(plan, run_dir=out_dir, device=dev, log=log, eval_options=EvalOptions(repeats=repeats),
                        resume=resume, rank=rank, progress=(lambda msg: err.print(f"  {msg}", style="dim")) if main else None)
    statuses = runner.run()
    if not main:
        return
    for st in statuses:
        if st.cached:
            log(f"{st.id} ({st.exp_id}): already trained and measured ({out_dir / st.evaluations[0].eval_file}); "
                "kept (--no-resume redoes it)")
    selected = {name: select_best(grid, name, out_dir, log) for name in names if name in grid.select}
    _print_distill_summary(runner.teacher_record(), statuses, selected)
    fresh = sum(not st.cached for st in statuses)
    out.print(f"wrote {fresh} record(s) to {out_dir / 'result_table.csv'} ({time.perf_counter() - start:.0f}s, budget {budget:g})")


def _print_distill_summary(teacher, statuses: list, selected: dict) -> None:
    from rich.table import Table

    table = Table(title="P1 distillation vs the teacher (torch eager fp32)")
    for col in ("exp_id", "params M", "GFLOPs", "p50 ms", "absrel", "δ1", "gate"):
        table.add_column(col, justify="left" if col in ("exp_id", "gate") else "right", no_wrap=True)

    def cells(rec) -> list[str]:
        def f(v, fmt):
            return "—" if v is None else format(v, fmt)
        return [f(rec.params_M, ".3f"), f(rec.flops_G, ".2f"), f(rec.t_pair_p50_ms, ".0f"), f(rec.absrel, ".4f"), f(rec.delta1, ".4f")]

    table.add_row(teacher.exp_id, *cells(teacher), "ref.")
    reasons = []
    for st in statuses:
        table.add_row(st.exp_id, *cells(st.record), st.verdict or "—")
        if st.reasons:
            reasons.append(f"{st.id}: gate P1 stop ({'; '.join(st.reasons)})")
    out.print(table)
    for line in reasons:
        out.print(line)
    for name, chosen in selected.items():
        if chosen is not None:
            out.print(f"{name}: {chosen} -> student_fp32_best.safetensors")
