"""Commands on one model: infer, export onnx, workload make, eval, teacher train."""

from __future__ import annotations

import json
import shutil
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from pqk import __version__
from pqk.cli.common import (
    Device,
    Size,
    _load_model,
    _model_path,
    _check_out_file,
    _publish,
    _refuse_results,
    _resolve_device,
    _staging_dir,
    app,
    err,
    export_app,
    out,
    teacher_app,
    workload_app,
)
from pqk.errors import InputError, PqkError
from pqk.measure.money import DEFAULT_RATE_USD_PER_H

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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results already in --out (whole, once the new ones are complete)."),
    cache: str = typer.Option(
        "fp", "--cache",
        help="Encoder tokens of each image, computed once for all its pairs and kept as: fp (exact: the same outputs), "
        "int8 (4x smaller), 1bit (~30x smaller, lossy), or none (the official loop: both images of every pair re-encoded).",
    ),
    cascade: Optional[float] = typer.Option(
        None, "--cascade", metavar="THRESHOLD",
        help="Run a cheap draft on every pair and the full model again only on pairs whose draft confidence "
        "(geometric mean over both views, >= 1) is below THRESHOLD. pairs.json says which pairs were verified.",
    ),
    draft: str = typer.Option(
        "half", "--draft",
        help="The cascade's draft: 'half' (the model itself at half resolution), an INT8 QDQ .onnx from pqk quantize "
        "(run on oneDNN), or a DUSt3R checkpoint (e.g. a distilled student).",
    ),
) -> None:
    """Run DUSt3R on image pairs: per-pair pointmaps and confidences (.npz) and coloured point clouds (.ply)."""
    from pqk.data.images import load_images, motorcycle_pair
    from pqk.data.pairs import make_pairs

    if demo_pair and images:
        raise InputError("give either images or --demo-pair, not both")
    _refuse_results(out_dir, overwrite)
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
    from pqk.token_codecs import get_codec

    if cache != "none":
        get_codec(cache)
    if cascade is not None and not cascade >= 1.0:
        raise InputError(f"--cascade {cascade} is below 1; DUSt3R's confidence starts at 1, so no pair would be verified")
    pairs = make_pairs(imgs, scene_graph=scene_graph, symmetrize=True)
    dev = _resolve_device(device)
    model, ckpt_path = _load_model(checkpoint, dev)
    draft_model = _load_draft(draft, model, dev) if cascade is not None else None
    staging = _staging_dir(out_dir)
    try:
        results, seconds, verified = _run_pairs(pairs, model, dev, batch_size, cache, draft_model, cascade)
        records = _write_pair_files(staging, results, imgs, names, min_conf)
        if verified is not None:
            for k, record in enumerate(records):
                record["verified_by_full_model"] = k in verified
        summary = {
            "checkpoint": str(ckpt_path),
            "size": int(size.value),
            "scene_graph": scene_graph,
            "images": [{"idx": im["idx"], "name": n, "path": im["path"], "true_shape": im["true_shape"][0].tolist()} for im, n in zip(imgs, names)],
            "pairs": records,
            "seconds": round(seconds, 3),
            "cache": cache,
            "cascade": None if cascade is None else {"threshold": cascade, "draft": draft, "verified_pairs": len(verified)},
            "pqk_version": __version__,
        }
        (staging / "pairs.json").write_text(json.dumps(summary, indent=1))
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verified_note = "" if verified is None else f" ({len(verified)} verified by the full model)"
    out.print(f"{len(pairs)} pairs{verified_note} from {len(imgs)} images in {seconds:.1f}s -> {out_dir}/ "
              "(pair_*.npz, pair_*.ply, pairs.json)")


def _load_draft(draft: str, model, device: str):
    """The cascade's draft model named by --draft."""
    from pqk.cascade import LowResolutionDraft

    if draft == "half":
        return LowResolutionDraft(model, 2)
    path = Path(draft)
    if not path.exists():
        raise InputError(f"--draft {draft!r}: expected 'half', an INT8 QDQ .onnx file or a DUSt3R checkpoint; no such file")
    if path.suffix == ".onnx":
        from pqk.backends.torch_int8 import int8_model_from_qdq

        return int8_model_from_qdq(model.cpu(), path)[0].to(device)
    return _load_model(path, device, "--draft")[0]


def _run_pairs(pairs, model, device: str, batch_size: int, cache: str = "fp", draft=None,
               threshold: float | None = None):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from pqk.cascade import pair_confidence, pairs_to_verify, verify
    from pqk.inference import inference

    start = time.perf_counter()
    verified = None
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("inference" if draft is None else "draft", total=len(pairs))
        results = inference(pairs, draft if draft is not None else model, device=device, batch_size=batch_size,
                            cache=cache, on_batch=lambda n: progress.advance(task, n))
        if draft is not None:
            scores = [pair_confidence(r) for r in results]
            check = progress.add_task("verify", total=len(pairs_to_verify(results, threshold, scores)))
            run = verify(pairs, results, model, threshold, cache=cache, device=device, batch_size=batch_size,
                         on_batch=lambda n: progress.advance(check, n), scores=scores)
            results, verified = run.results, set(run.verified)
    return results, time.perf_counter() - start, verified


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
    _check_out_file(out_file)
    model, ckpt_path = _load_model(checkpoint, "cpu")
    start = time.perf_counter()
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
    openvino = "openvino"


@workload_app.command(
    "make",
    epilog="Examples: pqk workload make --out workload.yaml; pqk workload make --family clip --out workload_clip.yaml",
)
def workload_make(
    out_file: Path = typer.Option(Path("workload.yaml"), "--out", "-o", help="Where to write the workload YAML."),
    family: str = typer.Option("dust3r", "--family", "-f", help="dust3r (image pairs) or clip (images with captions, classes, questions)."),
    data: Optional[Path] = typer.Option(
        None, "--data",
        help="A folder of your own data. DUSt3R: <scene>/images, depth/<stem>.npz, cameras.npz. CLIP: captions.jsonl, "
        "questions.jsonl or class folders (README: your own image-text data). Default: generated data with ground "
        "truth plus bundled real photographs.",
    ),
    pairs: int = typer.Option(20, "--pairs", min=1, help="DUSt3R: size of the frozen pair sample (the protocol uses 20)."),
    scenes: int = typer.Option(5, "--scenes", min=1, help="DUSt3R: generated scenes to draw the pairs from (ignored with --data)."),
    scene_level: int = typer.Option(1, "--scene-level", min=0, help="DUSt3R: scenes reconstructed whole (global alignment) for t_scene_s and chamfer."),
    images: int = typer.Option(300, "--images", min=10, help="CLIP: generated test images (ignored with --data)."),
    image_size: int = typer.Option(64, "--image-size", min=8, help="CLIP: the side images are resized and cropped to (the models' resolution)."),
    no_photos: bool = typer.Option(False, "--no-photos", help="CLIP: leave the bundled real photographs out."),
    seed: int = typer.Option(42, "--seed", help="Seed of the sample and of the generated data."),
) -> None:
    """Freeze a family's workload with a content hash of its data. DUSt3R: the protocol's 512 px, batch 1,
    swin-4 symmetrized pairs, seed 42, a fixed sample of pairs and the scene-level scenes. CLIP: generated
    test images (held-out colour-shape pairs included) or your folder, plus the real photographs."""
    from pqk.tasks import get_task

    get_task(family)
    if data is not None and not data.is_dir():
        raise InputError(f"--data {data} is not a folder")
    _check_out_file(out_file)
    if family == "clip":
        from pqk.tasks.clip.workload import freeze

        workload = freeze(out_file, data=data, n=images, seed=seed, image_size=image_size, real_photos=not no_photos)
        out.print(f"workload -> {out_file}: {workload.forwards}, data hash {workload.data_hash[:12]}")
        return
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    workload = make_workload(data=data, n_pairs=pairs, n_scenes=scenes, scene_level=scene_level, seed=seed)
    save_workload(workload, out_file)
    out.print(f"workload -> {out_file}: {len(workload.pairs)} pairs, scene level {workload.scene_level}, "
              f"data hash {workload.data_hash[:12]}")


def _print_record(record, details, task=None) -> None:
    from rich.table import Table

    from pqk.tasks import get_task

    task = task or get_task()
    table = Table(title=f"{record.exp_id} ({details['runtime']})", show_header=True)
    table.add_column("group")
    table.add_column("field")
    table.add_column("value", justify="right")
    latency = list(task.latency_fields.values())
    extra = [f for f in task.record_fields if f not in latency and (f.startswith("t_") or f.endswith("_per_sec"))]
    groups = {
        "quality": task.quality_fields,
        "efficiency": (*latency, *extra),
        "resources": ("params_M", "flops_G", "size_MB", "vram_GB"),
        "cost": ("gpu_hours",),
    }
    row = record.as_row()
    for group, keys in groups.items():
        for k in keys:
            table.add_row(group, k, str(row[k]) if row[k] != "" else "—")
    table.add_row("cost", "usd", f"{details['cost']['usd']:.4f} at ${details['cost']['rate_usd_per_h']}/h")
    for group, field, value in task.detail_rows(details):
        table.add_row(group, field, value)
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
        help="The model to measure: any checkpoint layout pqk loads for its family or, with --backend onnxruntime or "
        "openvino, an .onnx file (a CLIP-family model: its .image.onnx). Default: the family's bundled model.",
    ),
    family: Optional[str] = typer.Option(
        None, "--family", "-f",
        help="Model family: dust3r or clip. Default: read from the model file (dust3r when it says nothing).",
    ),
    workload_file: Optional[Path] = typer.Option(
        None, "--workload", "-w",
        help="The frozen workload (pqk workload make). Default: workload.yaml for DUSt3R, configs/workload_clip.yaml for CLIP.",
    ),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="torch (eager), onnxruntime or openvino (DUSt3R; both export the model and measure the exported file; OpenVINO runs an FP32 file in f32 and an INT8 QDQ file with its float parts in bf16)."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where the model runs."),
    out_dir: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Folder for the <exp>_eval.json and result_table.csv."),
    exp: str = typer.Option("P0_teacher_run1", "--exp-id", help="The record's exp_id ({stage}_{combo}_{keyparams}_{run})."),
    combo: str = typer.Option("teacher", "--combo", help="The record's combo field (teacher, K, Q, P, KQ, PK, PKQ, ...)."),
    repeats: int = typer.Option(30, "--repeats", min=5, help="Timed inputs for the latency percentiles (after 3 warm-up ones)."),
    rate: float = typer.Option(DEFAULT_RATE_USD_PER_H, "--rate", min=0.0, help="Device price in USD per hour for the cost figure."),
) -> None:
    """Measure a model on the frozen workload with the protocol's one evaluation function and write the
    record JSON and a row of result_table.csv. DUSt3R: absrel, rmse, delta1, chamfer, pair latency, scene
    time. CLIP: R@1/5/10 both ways and their mean, zero-shot top-1/5, VQA overall and per answer type,
    latency per image and per text, with the real-photograph check and trivial baselines. Both: params,
    FLOPs, size, memory and cost."""
    from pqk.methods.base import StepResult
    from pqk.pipeline.evaluate import EvalOptions, evaluate
    from pqk.pipeline.record import ensure_writable_dir, record_file_name, write_record
    from pqk.tasks import get_task, infer_family

    record_file_name(exp)  # a name that cannot be a file name is refused before any work
    task = get_task(family or (infer_family(model) if model is not None else None))
    workload_file = workload_file or Path(getattr(task, "default_workload", "workload.yaml"))
    workload = task.load_workload(workload_file)
    dev = _resolve_device(device)
    onnx_path = None
    if model is not None and model.suffix == ".onnx":
        if backend == Backend.torch:
            raise InputError(f"--model {model} is an ONNX file: use --backend onnxruntime or openvino")
        if not model.is_file():
            raise InputError(f"--model {model} does not exist")
        onnx_path, torch_model, artifact = model, None, model
    else:
        artifact = _model_path(model, "--model", task)
        torch_model = task.load_model(artifact, dev)
    data = task.load_data(workload)  # the data hash is checked before anything is written
    ensure_writable_dir(out_dir)
    subject = StepResult(model=torch_model, artifact=artifact, backend=backend.value, onnx_path=onnx_path)
    with err.status("evaluating") as status:
        evaluation = evaluate(
            torch_model, workload, device=dev, exp_id=exp, combo=combo, step=subject, data=data, task=task,
            options=EvalOptions(repeats=repeats, rate_usd_per_h=rate), progress=lambda msg: status.update(f"evaluating: {msg}"),
        )
    payload = evaluation.to_json()
    payload["details"]["model"] = str(artifact)
    payload["details"]["workload_file"] = str(workload_file)
    json_path, csv_path = write_record(out_dir, payload, evaluation.record)
    _print_record(evaluation.record, evaluation.details, task)
    out.print(f"wrote {json_path} and a row of {csv_path}")


# --- pqk teacher train ----------------------------------------------------------------------


@teacher_app.command(
    "train",
    epilog="Examples (2-minute smoke runs): pqk teacher train --budget 0.02 --out runs/teacher-smoke; "
    "pqk teacher train --family clip --budget 0.05 --out runs/clip-teacher-smoke",
)
def teacher_train(
    out_dir: Path = typer.Option(Path("runs/teacher"), "--out", "-o", help="Folder for last.pth (resumable), teacher.safetensors and teacher_recipe.json."),
    budget: float = typer.Option(1.0, "--budget", min=0.001, help="Scales the recipe's steps and data (1.0 = the recipe of the bundled teacher)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing last.pth in --out and start over."),
    family: str = typer.Option("dust3r", "--family", "-f", help="dust3r (a small DUSt3R) or clip (a LiT dual encoder: locked real "
                               "MiniLM text tower, image tower trained on generated caption images)."),
) -> None:
    """Train a family's small embedded teacher. DUSt3R: on procedurally generated scenes (128x96, then
    256x192, then 512x384) with DUSt3R's confidence-weighted regression loss. CLIP: CLIP's contrastive
    loss between a ViT image tower and the locked all-MiniLM-L6-v2 text tower on generated caption images.
    Resumes from --out/last.pth after an interruption."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pqk.tasks import get_task

    get_task(family)  # an unknown family is one line naming the known ones
    state = out_dir / "last.pth"
    if fresh and state.exists():
        state.unlink()
    start = time.perf_counter()
    with Progress(TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as progress:
        task = progress.add_task("train", total=None, info="")

        def on_step(done: int, total: int, logs: dict) -> None:
            progress.update(task, completed=done, total=total, info=f"loss {logs['loss']:.3f} lr {logs['lr']:.1e}")

        if family == "clip":
            from pqk.train.clip_teacher import ClipTeacherRecipe, train_clip_teacher

            recipe = ClipTeacherRecipe().scaled(budget) if budget != 1.0 else ClipTeacherRecipe()
            _, record = train_clip_teacher(recipe, out_dir, log=progress.console.print, on_step=on_step)
        else:
            from pqk.train.teacher import TeacherRecipe, train_teacher

            recipe = TeacherRecipe().scaled(budget) if budget != 1.0 else TeacherRecipe()
            _, record = train_teacher(recipe, out_dir, log=progress.console.print, on_step=on_step)
    record["command"] = " ".join(["pqk", "teacher", "train", *sys.argv[3:]]) if len(sys.argv) > 3 else "pqk teacher train"
    (out_dir / "teacher_recipe.json").write_text(json.dumps(record, indent=1))
    out.print(f"teacher -> {out_dir / 'teacher.safetensors'} ({time.perf_counter() - start:.0f}s); final validation: {record['final_val']}")
