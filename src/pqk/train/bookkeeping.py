"""A training run's bookkeeping for `pqk.train.trainer.fit`: atomic checkpoint writes, the
RNG states an exact resume restores, the `<name>_log.json` record, and the progress bar and
TensorBoard writer that show the run as it goes."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from pqk.data.pair_batches import PairSampler
from pqk.io.files import atomic_torch_save, atomic_write_text

if TYPE_CHECKING:
    from pqk.train.trainer import TrainSpec


# --- checkpoints ----------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_torch_save(obj, path)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _rng_state(sampler: PairSampler, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy_sampler": sampler.state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, sampler: PairSampler, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["numpy_sampler"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _spec_key(spec: TrainSpec) -> dict:
    # What must match for a checkpoint to continue this run exactly. EMA off is left out, so
    # last.pth files written before the field existed still resume.
    key = asdict(spec)
    if not key.get("ema_decay"):
        key.pop("ema_decay", None)
    return key


# --- progress and the log -------------------------------------------------------------------


def _progress(show: bool, name: str, total: int):
    if not show:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    progress.start()
    progress.add_task(name, total=total, info="")
    return progress


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _short(logs: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3g}" for k, v in logs.items())


def _write_log(path: Path, name: str, spec: TrainSpec, world: int, history: list, best_epoch: int, best_val: dict,
               stopped: bool, finished: bool, wall: float, skipped: int, step: int) -> None:
    payload = {
        "name": name, "spec": asdict(spec), "world_size": world, "steps_done": step, "total_steps": spec.total_steps,
        "best_epoch": best_epoch, "best_val": best_val, "stopped_early": stopped, "finished": finished,
        "wall_time_s": round(wall, 2), "skipped_steps": skipped, "history": history,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    atomic_write_text(path, json.dumps(payload, indent=1, default=float) + "\n")
