"""The `pqk` command line."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pqk import __version__
from pqk.errors import InputError, PqkError

app = typer.Typer(
    help=(
        "pqk makes feed-forward transformers light (distill K, prune P, quantize Q) and measures "
        "every path under one protocol. Flagship model: DUSt3R (two images in, two pointmaps out)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export a DUSt3R to a deployable format.", no_args_is_help=True)
app.add_typer(export_app, name="export")
workload_app = typer.Typer(help="The frozen workload every experiment is measured on.", no_args_is_help=True)
app.add_typer(workload_app, name="workload")
teacher_app = typer.Typer(help="The embedded teacher: a small DUSt3R trained on generated scenes.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class Size(str, Enum):
    s224 = "224"
    s512 = "512"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _version(value: bool) -> None:
    if value:
        out.print(f"pqk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """pqk: distill, prune and quantize DUSt3R, measured under one protocol."""


# --- shared helpers ---------------------------------------------------------------------


def _resolve_device(device: Device) -> str:
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    return device.value


def _load_model(checkpoint: Optional[Path], device: str, option: str = "--checkpoint"):
    """The user's checkpoint, or the bundled default with its notice (naming the command's `option`)."""
    from pqk.assets import default_checkpoint
    from pqk.models.dust3r import load_checkpoint

    if checkpoint is None:
        checkpoint, notice = default_checkpoint(option)
        if notice:
            err.print(f"[bold yellow]note:[/] {notice}")
    return load_checkpoint(checkpoint, device=device), checkpoint


def _staging_dir(out_dir: Path) -> Path:
    """A hidden sibling of `out_dir` to write into, so `out_dir` never holds half a result."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{out_dir.name}.partial-{os.getpid()}"
        staging.mkdir(exist_ok=False)
    except OSError as exc:
        raise InputError(f"--out {out_dir} cannot be written ({exc.strerror})") from None
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(staging.iterdir()):
        os.replace(item, out_dir / item.name)
    staging.rmdir()


# --- pqk infer ------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Example (runs anywhere, bundled weights and the Middlebury motorcycle pair): "
        "pqk infer --demo-pair --out runs/infer-demo"
    )
)
def infer(
    images: Optional[list[Path]] = typer.Argument(
        None, help="Two or more images (jpg/png), or one folder of them (read in sorted name order).", show_default=False
    ),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="DUSt3R weights: an official .pth, a Hugging Face folder (config.json + model.safetensors), "
        "or a pqk .pth/.safetensors. Default: the small model bundled with pqk.",
    ),
    size: Size = typer.Option(Size.s512, "--size", help="Preprocessing: 512 (long side 512, crop to multiples of 16) or 224 (square crop)."),
    scene_graph: str = typer.Option(
        "complete", "--scene-graph", "-g",
        help="Which pairs to run: complete, swin-N[-noncyclic], logwin-N[-noncyclic], oneref-R. Pairs are symmetrized.",
    ),
    out_dir: Path = typer.Option(Path("runs/infer"), "--out", "-o", help="Output folder: one .npz and one .ply per pair, plus pairs.json."),
    demo_pair: bool = typer.Option(
        False, "--demo-pair", help="Use the real Middlebury 2014 'motorcycle' stereo pair bundled in scikit-image as the images."
    ),
    min_conf: float = typer.Option(3.0, "--min-conf", min=1.0, help="Keep points whose confidence is above this in the .ply (DUSt3R's demo uses 3)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Pairs per forward pass (pairs of different shapes never share one)."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where the network runs."),
) -> None:
    """Run DUSt3R on image pairs: per-pair pointmaps and confidences (.npz) and coloured point clouds (.ply)."""
    from pqk.data.images import load_images, motorcycle_pair
    from pqk.data.pairs import make_pairs

    if demo_pair and images:
        raise InputError("give either images or --demo-pair, not both")
    if demo_pair:
        sources: object = motorcycle_pair()
        names = ["motorcycle_left", "motorcycle_right"]
    elif not images:
        raise InputError("no images given: pass two or more image files (or a folder), or --demo-pair")
    else:
        sources = images[0] if len(images) == 1 and images[0].is_dir() else list(images)
        names = None
    imgs = load_images(sources, size=int(size.value))
    if len(imgs) < 2:
        raise InputError(f"DUSt3R needs at least two images, got {len(imgs)}")
    if names is None:
        names = [Path(im["path"]).stem if im["path"] else f"image{im['idx']}" for im in imgs]
    pairs = make_pairs(imgs, scene_graph=scene_graph, symmetrize=True)
    dev = _resolve_device(device)
    model, ckpt_path = _load_model(checkpoint, dev)
    staging = _staging_dir(out_dir)
    try:
        results, seconds = _run_pairs(pairs, model, dev, batch_size)
        records = _write_pair_files(staging, results, imgs, names, min_conf)
        summary = {
            "checkpoint": str(ckpt_path),
            "size": int(size.value),
            "scene_graph": scene_graph,
            "images": [{"idx": im["idx"], "name": n, "path": im["path"], "true_shape": im["true_shape"][0].tolist()} for im, n in zip(imgs, names)],
            "pairs": records,
            "seconds": round(seconds, 3),
            "pqk_version": __version__,
        }
        (staging / "pairs.json").write_text(json.dumps(summary, indent=1))
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out.print(f"{len(pairs)} pairs from {len(imgs)} images in {seconds:.1f}s -> {out_dir}/ (pair_*.npz, pair_*.ply, pairs.json)")


def _run_pairs(pairs, model, device: str, batch_size: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pqk.inference import inference

    start = time.perf_counter()
    with Progress(
        TextColumn("inference"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("pairs", total=len(pairs))
        results = inference(pairs, model, device=device, batch_size=batch_size, on_batch=lambda n: progress.advance(task, n))
    return results, time.perf_counter() - start


def _write_pair_files(folder: Path, results: list[dict], imgs: list[dict], names: list[str], min_conf: float) -> list[dict]:
    import numpy as np

    from pqk.io.ply import write_ply
    from pqk.pointcloud import pair_point_cloud

    records = []
    for k, res in enumerate(results):
        i, j = res["view1"]["idx"], res["view2"]["idx"]
        stem = f"pair_{k:03d}_{i}_{j}"
        np.savez_compressed(
            folder / f"{stem}.npz",
            pts3d=res["pred1"]["pts3d"].numpy(),
            conf=res["pred1"]["conf"].numpy(),
            pts3d_in_other_view=res["pred2"]["pts3d_in_other_view"].numpy(),
            conf2=res["pred2"]["conf"].numpy(),
            true_shape1=res["view1"]["true_shape"].numpy(),
            true_shape2=res["view2"]["true_shape"].numpy(),
            idx=np.array([i, j]),
        )
        points, colors, total = pair_point_cloud(res, imgs[i]["rgb"], imgs[j]["rgb"], min_conf)
        note = None
        if len(points) == 0:
            points, colors, total = pair_point_cloud(res, imgs[i]["rgb"], imgs[j]["rgb"], 1.0)
            note = f"no point above --min-conf {min_conf}; the .ply holds all points"
            err.print(f"[yellow]note:[/] pair {k} ({names[i]}, {names[j]}): {note}")
        write_ply(folder / f"{stem}.ply", points, colors)
        records.append({"pair": k, "view1": names[i], "view2": names[j], "npz": f"{stem}.npz", "ply": f"{stem}.ply",
                        "points": int(len(points)), "pixels": int(total), "note": note})
    return records


# --- pqk export onnx ------------------------------------------------------------------------


@export_app.command(
    "onnx",
    epilog="Example: pqk export onnx --height 384 --width 512 --out runs/export/dust3r_512x384.onnx",
)
def export_onnx_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="DUSt3R weights (any layout pqk loads). Default: the bundled model."),
    out_file: Path = typer.Option(Path("runs/export/dust3r.onnx"), "--out", "-o", help="The .onnx file to write."),
    height: int = typer.Option(384, "--height", help="Static input height of view 1 (multiple of 16)."),
    width: int = typer.Option(512, "--width", help="Static input width of view 1 (multiple of 16)."),
    height2: Optional[int] = typer.Option(None, "--height2", help="Height of view 2 if it differs (e.g. a portrait view 2)."),
    width2: Optional[int] = typer.Option(None, "--width2", help="Width of view 2 if it differs."),
    opset: int = typer.Option(17, "--opset", min=17, help="ONNX opset (17 or newer)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run ONNX Runtime on a random pair and compare with PyTorch."),
) -> None:
    """Export DUSt3R (encoder, both decoders, both heads) to ONNX at a static shape, and check it with ONNX Runtime."""
    import torch

    from pqk.backends.onnx_export import compare_with_torch, export_onnx

    if out_file.suffix != ".onnx":
        raise InputError(f"--out {out_file} must end in .onnx")
    if out_file.exists() and out_file.is_dir():
        raise InputError(f"--out {out_file} is a folder; give a .onnx file name")
    model, ckpt_path = _load_model(checkpoint, "cpu")
    start = time.perf_counter()
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out_file} cannot be written ({exc.strerror})") from None
    path = export_onnx(model, out_file, height, width, height2=height2, width2=width2, opset=opset)
    out.print(f"exported {ckpt_path} -> {path} ({path.stat().st_size / 2**20:.1f} MB, opset {opset}) in {time.perf_counter() - start:.1f}s")
    if check:
        g = torch.Generator().manual_seed(42)
        h2, w2 = height2 or height, width2 or width
        view1 = {"img": torch.rand(1, 3, height, width, generator=g) * 2 - 1, "true_shape": torch.tensor([[height, width]])}
        view2 = {"img": torch.rand(1, 3, h2, w2, generator=g) * 2 - 1, "true_shape": torch.tensor([[h2, w2]])}
        errors = compare_with_torch(model, path, view1, view2)
        worst = errors["max_rel_l2"]
        rel = ", ".join(f"{k[: -len('_rel_l2')]} {v:.1e}" for k, v in errors.items() if k.endswith("_rel_l2") and k != "max_rel_l2")
        out.print(f"ONNX Runtime vs PyTorch on a random pair, relative L2: {rel}")
        if worst > 1e-4:
            raise PqkError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} relative L2 (> 1e-4)")


# --- pqk workload make / pqk eval -----------------------------------------------------------


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"


@workload_app.command("make", epilog="Example: pqk workload make --out workload.yaml")
def workload_make(
    out_file: Path = typer.Option(Path("workload.yaml"), "--out", "-o", help="Where to write the workload YAML."),
    data: Optional[Path] = typer.Option(
        None, "--data",
        help="A folder of your own scenes (see docs: <scene>/images, depth/<stem>.npz, cameras.npz). "
        "Default: procedurally generated scenes with ground truth plus the Middlebury motorcycle pair.",
    ),
    pairs: int = typer.Option(20, "--pairs", min=1, help="Size of the frozen pair sample (the protocol uses 20)."),
    scenes: int = typer.Option(5, "--scenes", min=1, help="Generated scenes to draw the pairs from (ignored with --data)."),
    scene_level: int = typer.Option(1, "--scene-level", min=0, help="Scenes reconstructed whole (global alignment) for t_scene_s and chamfer."),
    seed: int = typer.Option(42, "--seed", help="Seed of the sample and of the generated scenes."),
) -> None:
    """Freeze the protocol's workload: 512 px, batch 1, swin-4 symmetrized pairs, seed 42, a fixed
    sample of pairs, the scene-level scenes, and a content hash of the data."""
    from pqk.pipeline.workload import make_workload, save_workload

    if data is not None and not data.is_dir():
        raise InputError(f"--data {data} is not a folder")
    workload = make_workload(data=data, n_pairs=pairs, n_scenes=scenes, scene_level=scene_level, seed=seed)
    save_workload(workload, out_file)
    out.print(f"workload -> {out_file}: {len(workload.pairs)} pairs, scene level {workload.scene_level}, "
              f"data hash {workload.data_hash[:12]}")


def _print_record(record, details) -> None:
    from rich.table import Table

    table = Table(title=f"{record.exp_id} ({details['runtime']})", show_header=True)
    table.add_column("group")
    table.add_column("field")
    table.add_column("value", justify="right")
    groups = {
        "quality": ("absrel", "rmse", "delta1", "chamfer"),
        "efficiency": ("t_pair_p50_ms", "t_pair_p95_ms", "pairs_per_sec", "t_scene_s"),
        "resources": ("params_M", "flops_G", "size_MB", "vram_GB"),
        "cost": ("gpu_hours",),
    }
    row = record.as_row()
    for group, keys in groups.items():
        for k in keys:
            table.add_row(group, k, str(row[k]) if row[k] != "" else "—")
    table.add_row("cost", "usd", f"{details['cost']['usd']:.4f} at ${details['cost']['rate_usd_per_h']}/h")
    real = details.get("real_check_motorcycle")
    if real:
        table.add_row("real check", "motorcycle absrel / delta1", f"{real['absrel']:.4f} / {real['delta1']:.4f}")
    for group, key in (("baseline", "baselines"), ("real baseline", "baselines_motorcycle")):
        for name, base in (details.get(key) or {}).items():
            table.add_row(group, f"{name} absrel / delta1", f"{base['absrel']:.4f} / {base['delta1']:.4f}")
    out.print(table)
    if record.notes:
        out.print(f"notes: {record.notes}")


@app.command(
    "eval",
    epilog="Example: pqk workload make --out workload.yaml && pqk eval --workload workload.yaml --out runs/eval",
)
def eval_cmd(
    model: Optional[Path] = typer.Option(
        None, "--model", "-m",
        help="The model to measure: a DUSt3R checkpoint (any layout pqk loads) or, with --backend onnxruntime, an .onnx file. "
        "Default: the bundled model.",
    ),
    workload_file: Path = typer.Option(Path("workload.yaml"), "--workload", "-w", help="The frozen workload (pqk workload make)."),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="torch (eager) or onnxruntime (exports the model, measures the exported file)."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where the model runs."),
    out_dir: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Folder for the <exp>_eval.json and result_table.csv."),
    exp: str = typer.Option("P0_teacher_run1", "--exp-id", help="The record's exp_id ({stage}_{combo}_{keyparams}_{run})."),
    combo: str = typer.Option("teacher", "--combo", help="The record's combo field (teacher, K, Q, P, KQ, PK, PKQ, ...)."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs for the latency percentiles (after 3 warm-up pairs)."),
    rate: float = typer.Option(6.88, "--rate", min=0.0, help="Device price in USD per hour for the cost figure."),
) -> None:
    """Measure a model on the frozen workload with the protocol's one evaluation function: quality
    (absrel, rmse, delta1, chamfer), efficiency (p50/p95 pair latency, pairs/s, scene time), resources
    (params, FLOPs, size, memory) and cost. Writes the record JSON and a row of result_table.csv."""
    from pqk.pipeline.evaluate import EvalOptions, evaluate
    from pqk.pipeline.record import upsert_row, write_json
    from pqk.pipeline.workload import load_workload

    workload = load_workload(workload_file)
    dev = _resolve_device(device)
    onnx_path = None
    if model is not None and model.suffix == ".onnx":
        if backend != Backend.onnxruntime:
            raise InputError(f"--model {model} is an ONNX file: use --backend onnxruntime")
        if not model.is_file():
            raise InputError(f"--model {model} does not exist")
        onnx_path, torch_model, artifact = model, None, model
    else:
        torch_model, artifact = _load_model(model, dev, "--model")
    from pqk.pipeline.record import ensure_writable_dir
    from pqk.pipeline.workload import load_scenes

    scenes = load_scenes(workload)  # the data hash is checked before anything is written
    ensure_writable_dir(out_dir)
    with err.status("evaluating") as status:
        evaluation = evaluate(
            torch_model, workload, backend=backend.value, device=dev, exp_id=exp, combo=combo,
            artifact=artifact, onnx_path=onnx_path, options=EvalOptions(repeats=repeats, rate_usd_per_h=rate),
            progress=lambda msg: status.update(f"evaluating: {msg}"), scenes=scenes,
        )
    name = "teacher_eval.json" if exp.startswith("P0_") else f"{exp}_eval.json"
    payload = evaluation.to_json()
    payload["details"]["model"] = str(artifact)
    payload["details"]["workload_file"] = str(workload_file)
    json_path = write_json(out_dir / name, payload)
    csv_path = upsert_row(out_dir / "result_table.csv", evaluation.record)
    _print_record(evaluation.record, evaluation.details)
    out.print(f"wrote {json_path} and a row of {csv_path}")


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
    report: bool = typer.Option(True, "--report/--no-report", help="Write <out>/<plan>/report/ at the end (pqk report, with the budget estimate probed on this machine)."),
) -> None:
    """Run a plan end to end: every experiment's steps (distill, prune, quantize) with shared steps
    computed once, each experiment measured by the one evaluation function and gated, all records in
    <out>/<plan>/result_table.csv. Interrupted? Run the same command again: finished steps are reused
    and training resumes from its last checkpoint."""
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.plan import load_plan
    from pqk.pipeline.runner import PlanRunner

    from dataclasses import replace as _replace

    from pqk.pipeline.plan import GATE_POLICIES

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
    start = time.perf_counter()
    with err.status(f"plan {plan.name}") as status:
        def log(msg: str) -> None:
            status.update(f"plan {plan.name}: {msg}")
            if not msg.startswith(("  ", "evaluating:")):
                err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", soft_wrap=True)

        runner = PlanRunner(plan, out_root, device=dev, log=log, eval_options=EvalOptions(repeats=repeats))
        statuses = runner.run()
    from rich.table import Table

    table = Table(title=f"plan {plan.name}: {time.perf_counter() - start:.0f} s")
    for col in ("experiment", "exp_id", "state", "gate", "δ1", "absrel", "p50 ms", "params M", "notes"):
        table.add_column(col)
    for st in statuses:
        rec = st.record
        table.add_row(st.id, st.exp_id, st.state, st.verdict or "-",
                      "" if rec is None or rec.delta1 is None else f"{rec.delta1:.4f}",
                      "" if rec is None or rec.absrel is None else f"{rec.absrel:.4f}",
                      "" if rec is None or rec.t_pair_p50_ms is None else f"{rec.t_pair_p50_ms:.1f}",
                      "" if rec is None or rec.params_M is None else f"{rec.params_M:.2f}",
                      "; ".join(st.reasons)[:80])
    out.print(table)
    out.print(f"records: {runner.run_dir / 'result_table.csv'}; log: {runner.run_dir / 'execution_log.jsonl'}")
    if report:
        from pqk.report import build_report

        with err.status("report") as status:
            written = build_report(runner.run_dir, budget=plan.budget, log=lambda msg: status.update(f"report: {msg}"))
        out.print(f"report: {written.folder / 'report.html'} ({time.perf_counter() - start:.0f} s in all)")


# --- pqk quantize ---------------------------------------------------------------------------


def _split_list(value: str, what: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in accepted]
    if bad or not items:
        raise InputError(f"{what} {bad[0] if bad else value!r} is not known; accepted: {', '.join(accepted)} (comma-separated)")
    return items


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
    runtimes: str = typer.Option("onednn,onnxruntime", "--runtimes", help="INT8 runtimes to evaluate, comma-separated: onednn (PyTorch oneDNN INT8 + bf16 attention), onnxruntime (the QDQ file in ONNX Runtime)."),
    budget: float = typer.Option(1.0, "--budget", min=0.001, max=1.0, help="Scales the calibration set down (1.0 = the spec's size)."),
    combo: str = typer.Option("Q", "--combo", help="Record combo: Q (gate P2 vs the teacher) or KQ/PKQ (gate P3 vs this model in FP32)."),
    qat: str = typer.Option("auto", "--qat", help="QAT after PTQ: auto (when PTQ misses the quality gate), always, never."),
    auto_keep: bool = typer.Option(False, "--auto-keep", help="Probe each block's quality sensitivity and INT8 speed gain; keep in float the fewest blocks that meet the gate (and those INT8 does not speed up), then quantize again."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed pairs per evaluation."),
) -> None:
    """Quantize a DUSt3R to W8A8 (protocol stage P2): calibrate on the one calibration set, write the
    QDQ file ptq_int8.onnx (int8 per-channel weights, keep-list in float), then measure that model on
    each INT8 runtime with the one evaluation function, time every runtime side by side (eager FP32
    and bf16, ONNX Runtime FP32 and INT8, oneDNN INT8) and apply the gate."""
    from pqk.methods.quantize import load_quant_spec
    from pqk.methods.quantize_step import QAT_MODES, RUNTIME_LATENCY_KEY, RUNTIMES, QuantRun, auto_keep_groups, ptq, qat_after_ptq
    from pqk.pipeline.evaluate import EvalOptions, evaluate
    from pqk.pipeline.experiment import measure_step, teacher_reference, write_evaluation
    from pqk.pipeline.record import ensure_writable_dir, write_json
    from pqk.methods.base import StepContext
    from pqk.pipeline.workload import load_scenes, load_workload

    chosen = _split_list(runtimes, "--runtimes value", RUNTIMES)
    qat_mode = _split_list(qat, "--qat value", QAT_MODES)[0]
    spec = load_quant_spec(config)
    workload = load_workload(workload_file)
    float_model, artifact = _load_model(model, "cpu", "--model")
    scenes = load_scenes(workload)
    ensure_writable_dir(out_dir)
    options = EvalOptions(repeats=repeats)
    ctx = StepContext(teacher=float_model, workload=workload, out_dir=out_dir, budget=budget, log=err.print)
    with err.status("quantizing") as status:
        ctx.log = lambda msg: status.update(f"quantizing: {msg}")
        progress = lambda msg: status.update(f"evaluating: {msg}")  # noqa: E731
        if combo == "Q":
            stage, reference = "P2", teacher_reference(float_model, ctx, artifact=artifact, options=options, scenes=scenes, progress=progress)
        else:
            stage = "P3"
            fp32 = evaluate(float_model, workload, exp_id=f"{combo}_FP32_run1", combo=combo, artifact=artifact,
                            options=options, progress=progress, scenes=scenes)
            write_evaluation(fp32, out_dir)
            reference = fp32.record
        run = QuantRun(runtimes=chosen)
        outcome = ptq(float_model, ctx, spec, run)
        side = outcome.details["latency_side_by_side"]["variants"]

        def measure_all(result, method: str) -> list:
            done = []
            for runtime in chosen:
                if runtime not in result.runtimes():
                    err.print(f"runtime {runtime} is not available here; skipped")
                    continue
                key = RUNTIME_LATENCY_KEY[runtime]
                cut = 1.0 - 1.0 / side[key]["speedup"] if key in side else None
                tag = "ort" if runtime == "onnxruntime" else runtime
                evaluation, gate = measure_step(
                    result.step_result(runtime), ctx, exp_id=f"{combo}_{method}_{tag}_run1", combo=combo, stage=stage,
                    reference=reference, options=options, scenes=scenes, progress=progress, latency_cut=cut,
                )
                write_evaluation(evaluation, out_dir)
                done.append((evaluation, gate))
            return done

        written = final = measure_all(outcome, "PTQ")
        if auto_keep:
            status.update("auto-keep: probing layer groups")
            keep = auto_keep_groups(float_model, outcome, ctx)
            write_json(out_dir / "auto_keep.json", keep)
            err.print(f"auto-keep: float groups {keep['float_groups'] or 'none'}")
            if keep["float_groups"]:
                outcome = ptq(float_model, ctx, spec, run, float_groups=keep["float_groups"])
                final = measure_all(outcome, "PTQautokeep")
                written = written + final
        quality_missed = any(g is not None and g["figures"].get("quality_drop", 0.0) > g["figures"].get("max_quality_drop", 1.0)
                             for _, g in written[:1])
        if qat_mode == "always" or (qat_mode == "auto" and quality_missed):
            status.update("QAT")
            qat_outcome = qat_after_ptq(outcome, ctx, spec, run, teacher=float_model, show_progress=False)
            final = measure_all(qat_outcome, "QAT")
            written = written + final
        elif qat_mode == "auto":
            err.print("PTQ is within the quality gate: no QAT needed (--qat always forces it)")
    for evaluation, _ in written:
        _print_record(evaluation.record, evaluation.details)
    _print_side_by_side(outcome.details["latency_side_by_side"])
    if final:
        # quant_eval.json: the protocol's name for the Q record: the last method's first runtime.
        first = final[0][0]
        write_evaluation(first, out_dir, "quant_eval.json" if combo == "Q" else "kq_eval.json")
        out.print(f"wrote {out_dir / 'ptq_int8.onnx'}, {len(written)} eval JSON(s) and rows of {out_dir / 'result_table.csv'}")


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
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue fine-tuning from <out>/finetune_*/last.pth when present."),
) -> None:
    """Prune attention heads and FFN channels (protocol stage P4, P-only) with a dependency graph
    (Torch-Pruning), allocate per-block ratios by measured sensitivity (or uniformly), fine-tune with
    the task loss, and measure each pruned model with the one evaluation function against the
    teacher; the P4 gate (quality drop <= 3%, params/size down >= 25%) is recorded, never raised."""
    import dataclasses

    from pqk.methods.prune import (
        ALLOCATIONS, IMPORTANCES, artifact_name, calibration_examples, check_choice, load_prune_spec,
        prune_step, rho_tag, sensitivity_table,
    )
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.experiment import measure_step, teacher_reference, write_evaluation
    from pqk.pipeline.record import ensure_writable_dir, write_json
    from pqk.methods.base import StepContext
    from pqk.pipeline.workload import load_scenes, load_workload

    rhos = _parse_rhos(rho)
    spec = load_prune_spec(config)
    overrides = {"allocation": check_choice("--allocation", allocation, ALLOCATIONS) if allocation else spec.allocation,
                 "importance": check_choice("--importance", importance, IMPORTANCES) if importance else spec.importance}
    specs = [dataclasses.replace(spec, rho=r, **overrides) for r in rhos]  # each validated on construction
    workload = load_workload(workload_file)
    base_model, artifact = _load_model(model, "cpu", "--model")
    scenes = load_scenes(workload)  # the data hash is checked before anything is written
    ensure_writable_dir(out_dir)
    options = EvalOptions(repeats=repeats)
    start = time.perf_counter()
    summary_path = out_dir / "prune_eval.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except json.JSONDecodeError:
        summary = {}
    settings = summary.get("settings", {})
    rows = []
    with err.status("pruning") as status:
        ctx = StepContext(teacher=base_model, workload=workload, out_dir=out_dir, budget=budget, resume=resume,
                          log=lambda msg: status.update(f"pruning: {msg}"))
        progress = lambda msg: status.update(f"evaluating: {msg}")  # noqa: E731
        reference = teacher_reference(base_model, ctx, artifact=artifact, options=options, scenes=scenes, progress=progress)
        needs_calib = specs[0].allocation == "sensitivity" or specs[0].importance == "taylor"
        calib = calibration_examples(specs[0].calibration, specs[0].seed) if needs_calib else None
        table = sensitivity_table(base_model, specs[0], calib, out_dir, ctx.log) if specs[0].allocation == "sensitivity" else None
        for s in specs:
            tag = rho_tag(s.rho) + ("" if s.allocation == "sensitivity" else f"_{s.allocation}") + ("" if s.importance == "l1" else f"_{s.importance}")
            exp = f"P_{tag}_run1"
            ctx.log(f"{exp}: pruning")
            step = prune_step(base_model, ctx, s, sensitivity=table, calib=calib)
            evaluation, gate = measure_step(step, ctx, exp_id=exp, combo="P", stage="P4", reference=reference,
                                            options=options, scenes=scenes, progress=progress)
            rec = evaluation.record
            if onnx_check:
                status.update(f"pruning: {exp}: ONNX export and comparison")
                onnx_file = (out_dir / artifact_name(s.rho, s.allocation)).with_suffix(".onnx")
                evaluation.details["onnx_check"] = _prune_onnx_check(step.model, onnx_file, workload, scenes)
            evaluation.details["vs_reference"] = {
                key: (1.0 - getattr(rec, key) / getattr(reference, key))
                if getattr(rec, key) is not None and getattr(reference, key) else None
                for key in ("params_M", "flops_G", "size_MB", "t_pair_p50_ms")
            }
            json_path, _ = write_evaluation(evaluation, out_dir)
            settings[exp] = {
                "record": rec.as_row(), "gate": gate, "artifact": step.artifact.name, "eval_json": json_path.name,
                "prune": {k: v for k, v in step.details["prune"].items() if k != "removed_per_unit"},
                "finetune": step.details.get("finetune"), "vs_reference": evaluation.details["vs_reference"],
                "onnx_check": evaluation.details.get("onnx_check"),
            }
            rows.append((rec, gate, evaluation.details["vs_reference"]))
        summary = {"stage": "P4", "reference": reference.as_row(), "settings": settings,
                   "sensitivity": "sensitivity.json" if table is not None or (out_dir / "sensitivity.json").is_file() else None}
        write_json(summary_path, summary)
    _print_prune_summary(reference, rows)
    out.print(f"wrote {', '.join(artifact_name(s.rho, s.allocation) for s in specs)}, prune_eval.json and rows of "
              f"{out_dir / 'result_table.csv'} in {out_dir} ({time.perf_counter() - start:.0f}s)")


def _prune_onnx_check(model, onnx_path: Path, workload, scenes: dict) -> dict:
    """Export at the workload's first pair shape and compare ONNX Runtime with PyTorch on it."""
    from pqk.backends.onnx_export import compare_with_torch, export_onnx
    from pqk.pipeline.evaluate import scene_view

    name, i, j = workload.pairs[0]
    v1, v2 = scene_view(scenes[name], i), scene_view(scenes[name], j)
    h1, w1 = v1["img"].shape[-2:]
    h2, w2 = v2["img"].shape[-2:]
    export_onnx(model, onnx_path, int(h1), int(w1), height2=int(h2), width2=int(w2))
    report = compare_with_torch(model, onnx_path, v1, v2)
    return {"onnx": onnx_path.name, "pair": [name, i, j], "max_rel_l2": report["max_rel_l2"],
            "matches": bool(report["max_rel_l2"] <= 1e-4)}


def _print_prune_summary(reference, rows: list) -> None:
    from rich.table import Table

    table = Table(title="P4 pruning vs the teacher (torch eager fp32)", box=None, padding=(0, 1))
    for col in ("exp_id", "params M", "GFLOPs", "size MB", "p50 ms", "absrel", "δ1", "FLOPs cut", "p50 cut", "gate"):
        table.add_column(col, justify="left" if col in ("exp_id", "gate") else "right", no_wrap=True)

    def cells(rec) -> list[str]:
        return [f"{rec.params_M:.3f}", f"{rec.flops_G:.2f}", f"{rec.size_MB:.2f}", f"{rec.t_pair_p50_ms:.0f}",
                f"{rec.absrel:.4f}", f"{rec.delta1:.4f}"]

    table.add_row(reference.exp_id, *cells(reference), "—", "—", "ref")
    for rec, gate, cut in rows:
        table.add_row(rec.exp_id, *cells(rec), f"{cut['flops_G']:.0%}", f"{cut['t_pair_p50_ms']:.0%}",
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
    from pqk.pipeline.distill_grid import parse_runs, run_distill_grid
    from pqk.pipeline.evaluate import EvalOptions
    from pqk.pipeline.record import ensure_writable_dir
    from pqk.pipeline.workload import load_scenes, load_workload
    from pqk.train.trainer import init_distributed

    grid = load_distill_config(config)
    names = parse_runs(runs, grid)
    workload = load_workload(workload_file)
    dev = _resolve_device(device)
    rank, world = init_distributed()  # under torchrun: one process per GPU (or CPU share)
    if dev == "cuda" and world > 1:
        import torch

        dev = f"cuda:{torch.cuda.current_device()}"
    bundled = teacher_file is None or teacher_file.resolve() == default_checkpoint()[0].resolve()
    teacher, teacher_path = _load_model(teacher_file, dev, "--teacher")
    budget = budget if budget is not None else (grid.embedded_budget if bundled else 1.0)
    scenes = load_scenes(workload)  # the data hash is checked before anything is written
    if rank == 0:
        ensure_writable_dir(out_dir)
    start = time.perf_counter()
    # No spinner around this: training draws its own progress bar (one live display at a time).
    outcome = run_distill_grid(
        grid, names, teacher, Path(teacher_path), workload, scenes, out_dir, budget=budget, resume=resume,
        device=dev, options=EvalOptions(repeats=repeats), log=err.print if rank == 0 else (lambda _m: None),
        status=(lambda msg: err.print(f"  {msg}", style="dim")) if rank == 0 else None, rank=rank,
    )
    if outcome is None:
        return
    _print_distill_summary(outcome)
    out.print(f"wrote {len(outcome.records) - len(outcome.reused)} record(s) to {out_dir / 'result_table.csv'} "
              f"({time.perf_counter() - start:.0f}s, budget {budget:g})")


def _print_distill_summary(outcome) -> None:
    from rich.table import Table

    table = Table(title="P1 distillation vs the teacher (torch eager fp32)")
    for col in ("exp_id", "params M", "GFLOPs", "p50 ms", "absrel", "δ1", "gate"):
        table.add_column(col, justify="left" if col in ("exp_id", "gate") else "right", no_wrap=True)

    def cells(rec) -> list[str]:
        def f(v, fmt):
            return "—" if v is None else format(v, fmt)
        return [f(rec.params_M, ".3f"), f(rec.flops_G, ".2f"), f(rec.t_pair_p50_ms, ".0f"), f(rec.absrel, ".4f"), f(rec.delta1, ".4f")]

    table.add_row(outcome.teacher.exp_id, *cells(outcome.teacher), "ref.")
    reasons = []
    for name, rec in outcome.records.items():
        gate = outcome.gates.get(name) or {}
        table.add_row(rec.exp_id, *cells(rec), gate.get("verdict", "—"))
        if gate.get("reasons"):
            reasons.append(f"{name}: gate P1 stop ({'; '.join(gate['reasons'])})")
    out.print(table)
    for line in reasons:
        out.print(line)
    for name, chosen in outcome.selected.items():
        out.print(f"{name}: {chosen} -> student_fp32_best.safetensors")


# --- pqk teacher train ----------------------------------------------------------------------


@teacher_app.command(
    "train",
    epilog="Example (a 2-minute smoke run): pqk teacher train --budget 0.02 --out runs/teacher-smoke",
)
def teacher_train(
    out_dir: Path = typer.Option(Path("runs/teacher"), "--out", "-o", help="Folder for last.pth (resumable), teacher.safetensors and teacher_recipe.json."),
    budget: float = typer.Option(1.0, "--budget", min=0.001, help="Multiplies every stage's steps and scene count (1.0 = the recipe of the bundled teacher)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing last.pth in --out and start over."),
) -> None:
    """Train the small DUSt3R teacher on procedurally generated scenes (128x96, then 256x192, then 512x384),
    with DUSt3R's confidence-weighted regression loss. Resumes from --out/last.pth after an interruption."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pqk.train.teacher import TeacherRecipe, train_teacher

    recipe = TeacherRecipe().scaled(budget) if budget != 1.0 else TeacherRecipe()
    state = out_dir / "last.pth"
    if fresh and state.exists():
        state.unlink()
    start = time.perf_counter()
    with Progress(TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as progress:
        task = progress.add_task("train", total=sum(s.steps for s in recipe.stages), info="")

        def on_step(done: int, total: int, logs: dict) -> None:
            progress.update(task, completed=done, info=f"loss {logs['loss']:.3f} lr {logs['lr']:.1e}")

        _, record = train_teacher(recipe, out_dir, log=progress.console.print, on_step=on_step)
    record["command"] = " ".join(["pqk", "teacher", "train", *sys.argv[3:]]) if len(sys.argv) > 3 else "pqk teacher train"
    (out_dir / "teacher_recipe.json").write_text(json.dumps(record, indent=1))
    out.print(f"teacher -> {out_dir / 'teacher.safetensors'} ({time.perf_counter() - start:.0f}s); final validation: {record['final_val']}")


# --- pqk budget / pqk report ------------------------------------------------------------------


@app.command(
    "budget",
    epilog="Example (about a minute on a 2-core CPU): pqk budget configs/plans/minimal.yaml --gpu h100 --rate 6.88",
)
def budget_cmd(
    plan: Path = typer.Argument(..., help="The plan file (configs/plans/minimal.yaml, medium.yaml, best.yaml).", show_default=False),
    gpu: str = typer.Option("h100", "--gpu", help="Target device: a100, h100 (a range: A100 time / 2.2..1.7) or cpu (this machine's measured time)."),
    rate: float = typer.Option(6.88, "--rate", help="Price in USD per device-hour (document 000: H100 at $6.88/h)."),
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
    from pqk.pipeline.budget import Factors, check_gpu, estimate_plan, estimate_table, footer_lines, parse_speedup
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


class QualityMetric(str, Enum):
    delta1 = "delta1"
    absrel = "absrel"


@app.command("report", epilog="Example (after pqk run configs/plans/minimal.yaml): pqk report runs/minimal")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A plan's run folder (runs/<plan>): result_table.csv, *_eval.json, execution_log.jsonl.", show_default=False),
    plan: Optional[Path] = typer.Option(None, "--plan", help="The plan file, for the budget table. Default: RUN_DIR/plan.yaml (the runner's copy)."),
    metric: QualityMetric = typer.Option(QualityMetric.delta1, "--metric", help="Quality axis of the Pareto plot."),
    estimate: Optional[Path] = typer.Option(None, "--estimate", help="A `pqk budget --json` file to compare with instead of probing now."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="Leave the budget table out (no probe)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Device of the estimate: a100, h100, cpu. Default: the device the records were measured on."),
    rate: Optional[float] = typer.Option(None, "--rate", help="USD per device-hour. Default: the records' rate."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Budget knob of the estimate. Default: the plan's (what the runner used)."),
) -> None:
    """Tables (Markdown, LaTeX), a Pareto plot of quality vs latency, resources relative to the teacher,
    gate verdicts, the budget estimate vs device-hours spent and the daily execution log, all on one
    self-contained HTML page: RUN_DIR/report/report.html."""
    from pqk.pipeline.budget import check_gpu
    from pqk.report import build_report

    if gpu is not None:
        check_gpu(gpu)
    with err.status("report") as status:
        report = build_report(run_dir, plan=plan, metric=metric.value, estimate=estimate, compute_estimate=not no_estimate,
                              gpu=gpu, rate=rate, budget=budget, log=lambda msg: status.update(msg))
    verdicts = [g.verdict for g in report.gates]
    out.print(f"{len(verdicts)} gate rows: {verdicts.count('pass')} pass, {verdicts.count('stop')} stop, "
              f"{verdicts.count('stopped (not run)')} not run; "
              f"Pareto front ({report.pareto['metric']}): {', '.join(report.pareto['front']) or '—'}")
    for note in report.notes:
        out.print(f"note: {note}")
    out.print(f"wrote {', '.join(sorted(report.files))} to {report.folder}; open {report.folder / 'report.html'}")


def main() -> None:
    try:
        app()
    except PqkError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written to the output folder")
        sys.exit(130)


if __name__ == "__main__":
    main()
