"""What every `pqk` command shares: the Typer app and its groups, the two consoles, device and
model loading, staged output folders."""

from __future__ import annotations

import os
import shutil
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pqk import __version__
from pqk.errors import InputError

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


def _model_path(checkpoint: Optional[Path], option: str, task=None) -> Path:
    """The user's checkpoint, or the family's bundled default (its notice printed, naming `option`)."""
    from pqk.assets import default_checkpoint

    if checkpoint is not None:
        if not checkpoint.exists():
            raise InputError(f"{option} {checkpoint} does not exist")
        return checkpoint
    checkpoint, notice = task.default_model(option) if task is not None else default_checkpoint(option)
    if notice:
        err.print(f"[bold yellow]note:[/] {notice}")
    return Path(checkpoint)


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


def _check_out_file(out_file: Path, option: str = "--out") -> None:
    """A file to write: not a folder, its folder creatable and writable (checked before any work)."""
    if out_file.is_dir():
        raise InputError(f"{option} {out_file} is a folder; give a file name")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {out_file} cannot be written ({exc.strerror})") from None
    if not os.access(out_file.parent, os.W_OK) or (out_file.exists() and not os.access(out_file, os.W_OK)):
        raise InputError(f"{option} {out_file} cannot be written (permission denied)")


def _refuse_results(out_dir: Path, overwrite: bool) -> None:
    """A --out that already holds files is another run's results: refused unless --overwrite
    (which replaces the folder whole when the new results are complete, never mixes them)."""
    if out_dir.is_dir() and not overwrite:
        held = sorted(p.name for p in out_dir.iterdir())
        if held:
            raise InputError(f"--out {out_dir} already holds {len(held)} file(s) (e.g. {held[0]}); pass --overwrite to "
                             "replace them, or choose another --out")


def _publish(staging: Path, out_dir: Path) -> None:
    """Put the finished `staging` folder in place of `out_dir`, whole: an earlier folder is
    moved aside first and removed only once the new one stands."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = staging.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


