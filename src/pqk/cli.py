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


def _load_model(checkpoint: Optional[Path], device: str):
    """The user's checkpoint, or the bundled default with its notice."""
    from pqk.assets import default_checkpoint
    from pqk.models.dust3r import load_checkpoint

    if checkpoint is None:
        checkpoint, notice = default_checkpoint()
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
