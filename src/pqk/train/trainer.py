"""One generic trainer for every method that trains a DUSt3R: distillation, the pruned
model's fine-tune, QAT. It knows nothing about the method; the method hands it a loss.

    result = fit(model, loss_fn, TrainSpec(...), out_dir)

- Data: pairs of generated scenes from the training seed range (never the workload's
  seeds 42-46, the validation range or the calibration range), drawn by a seeded
  `PairSampler`. Each rank of a distributed run draws its own pairs.
- Optimisation: AdamW (wd 0.05, betas 0.9/0.95 as the teacher), linear warm-up then cosine
  decay of the learning rate, gradient clipping. The schedule is a pure function of the
  global step, so the step counter is the scheduler's whole state.
- Every epoch: validation on held-out generated scenes (median-aligned depth absrel/δ1 of
  view 1, `pqk.train.teacher.validate`), early stopping on val absrel with `patience`,
  `best.pth` (on improvement) and `last.pth` written atomically (write, then rename).
- `last.pth` is also written every `checkpoint_every` steps inside an epoch. It holds the
  model, extra modules, optimizer, step, epoch, running epoch sums, history, best-so-far
  and the RNG states of every rank (torch, CUDA, the pair sampler's numpy generator), so a
  run killed at any point and restarted with `resume=True` ends with the same weights as
  an uninterrupted run (tests/test_trainer.py kills one with SIGKILL).
- Distributed: call `init_distributed()` (torchrun sets the environment) before `fit`; the
  model is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), only rank 0
  validates and writes files, and the validation verdict is broadcast so every rank stops
  at the same epoch.
- `<name>_log.json`: spec, per-epoch train-loss means and validation metrics, best epoch.
  TensorBoard scalars too when `torch.utils.tensorboard` imports (optional dependency).

Checkpoints hold `model.state_dict()` whatever the model is (pruned widths, fake-quant
modules), so any method reuses this loop unchanged.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from pqk.data.pair_batches import PairSampler
from pqk.errors import ConfigError
from pqk.train.bookkeeping import (
    _atomic_save, _cpu_state, _progress, _rng_state, _set_rng_state, _short, _spec_key, _tensorboard, _write_log,
)
from pqk.train.ema import WeightAverage
from pqk.train.schedule import warmup_cosine
from pqk.train.teacher import TRAIN_SEED_BASE, VAL_SEED_BASE, Stage, TeacherRecipe, _scenes, _val_examples, validate

# (model, view1, view2, gt, progress in [0, 1]) -> (loss to minimise, scalar logs)
LossFn = Callable[[nn.Module, dict, dict, dict, float], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainSpec:
    """How long and on what a model trains. Validated on construction (one-line errors)."""

    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    patience: int | None = 3  # epochs at the final resolution without a better val absrel before stopping; None = never
    width: int = 512
    height: int = 384
    n_scenes: int = 64
    views_per_scene: int = 8
    window: int = 4
    val_scenes: int = 4
    val_pairs: int = 16
    seed: int = 42
    # Share of training scenes seen by the rectified stereo rig (real pairs such as
    # Middlebury's are sideways translations, which the arc of the teacher's scenes lacks).
    stereo_fraction: float = 0.5
    scene_seed_base: int = TRAIN_SEED_BASE
    checkpoint_every: int = 25  # steps between mid-epoch last.pth writes
    lr_min_ratio: float = 0.05  # the cosine ends at lr * lr_min_ratio
    # Progressive resolution: [[start fraction of the steps, width, height, batch_size], ...];
    # before the first start the run trains at width x height with batch_size. The scenes are
    # the same seeds rendered at each resolution. Students end at the workload's 512x384: the
    # workload measures there, and RoPE positions and DPT features at 256x192 differ from it.
    resolution_schedule: list = field(default_factory=list)
    # Validation pairs' size; None: the resolution the run ends at (the last schedule entry's).
    val_width: int | None = None
    val_height: int | None = None
    # Validate and keep an exponential moving average of the weights with this decay (0: the
    # weights themselves). pqk.train.ema says why short runs need it.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        positive = ("epochs", "steps_per_epoch", "batch_size", "width", "height", "n_scenes",
                    "views_per_scene", "window", "val_scenes", "val_pairs", "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name} = {value!r} is not accepted; expected an integer >= 1")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"train.{name} = {value!r} is not accepted; expected a number > 0")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay = {self.weight_decay!r} is not accepted; expected a number >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps = {self.warmup_steps!r} is not accepted; expected an integer >= 0")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(f"train.patience = {self.patience!r} is not accepted; expected an integer >= 1 or null")
        if self.width % 16 or self.height % 16:
            raise ConfigError(f"train.width x height = {self.width}x{self.height} is not accepted; expected multiples of 16")
        self.resolution_schedule = _check_resolution_schedule(self.resolution_schedule)
        if (self.val_width is None) != (self.val_height is None):
            raise ConfigError("train.val_width and train.val_height go together: give both or neither")
        if self.val_width is not None and (not _is_size(self.val_width) or not _is_size(self.val_height)):
            raise ConfigError(f"train.val_width x val_height = {self.val_width}x{self.val_height} is not accepted; "
                              "expected positive multiples of 16")
        if self.views_per_scene < 2:
            raise ConfigError(f"train.views_per_scene = {self.views_per_scene} is not accepted; expected >= 2")
        if not 0.0 <= self.stereo_fraction <= 1.0:
            raise ConfigError(f"train.stereo_fraction = {self.stereo_fraction!r} is not accepted; expected 0..1")
        if not isinstance(self.ema_decay, (int, float)) or isinstance(self.ema_decay, bool) or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay = {self.ema_decay!r} is not accepted; expected 0 (off) or a number in (0, 1), e.g. 0.99")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ConfigError(f"train.lr_min_ratio = {self.lr_min_ratio!r} is not accepted; expected 0..1")
        # Training scenes must stay inside the training range: below it lie the workload's
        # seeds, above it the validation (2,000,000+) and calibration (3,000,000+) ones.
        if self.scene_seed_base < TRAIN_SEED_BASE or self.scene_seed_base + self.n_scenes > VAL_SEED_BASE:
            raise ConfigError(
                f"train.scene_seed_base = {self.scene_seed_base} with {self.n_scenes} scenes leaves the training "
                f"seed range; accepted: seeds in [{TRAIN_SEED_BASE}, {VAL_SEED_BASE})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSpec":
        from pqk.yaml_io import dataclass_from_mapping

        return dataclass_from_mapping(cls, data, "train")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def stages(self) -> list[tuple[float, int, int, int]]:
        """(start fraction, width, height, batch size) of each resolution, the first from 0."""
        return [(0.0, self.width, self.height, self.batch_size), *(tuple(e) for e in self.resolution_schedule)]

    def stage_at(self, progress: float) -> int:
        """Index into `stages()` of the resolution trained at `progress` (0..1 of the steps)."""
        return max(k for k, stage in enumerate(self.stages()) if progress >= stage[0])

    def val_size(self) -> tuple[int, int]:
        """(width, height) of the validation pairs."""
        if self.val_width is not None:
            return self.val_width, self.val_height  # type: ignore[return-value]
        _, width, height, _ = self.stages()[-1]
        return width, height

    def scaled(self, budget: float) -> "TrainSpec":
        """The same spec with the epoch count (and the scene pool, never above its size at
        budget 1) multiplied by `budget`: the knob that makes the embedded default fast."""
        if not budget > 0 or not math.isfinite(budget):
            raise ConfigError(f"budget = {budget!r} is not accepted; expected a number > 0")
        return replace(
            self,
            epochs=max(1, round(self.epochs * budget)),
            n_scenes=max(2, round(self.n_scenes * min(1.0, budget))),
        )


@dataclass
class FitResult:
    model: nn.Module  # best-epoch weights loaded
    history: list[dict]  # one dict per epoch
    best_epoch: int
    stopped_early: bool
    wall_time_s: float  # across resumes
    log_path: Path
    best_val: dict = field(default_factory=dict)
    steps_done: int = 0
    world_size: int = 1
    skipped_steps: int = 0  # non-finite gradients: the optimizer step was skipped


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 16 and value % 16 == 0


def _check_resolution_schedule(schedule: Any) -> list:
    entries = []
    for item in schedule or []:
        ok = (isinstance(item, (list, tuple)) and len(item) == 4 and isinstance(item[0], (int, float))
              and 0.0 < item[0] < 1.0 and _is_size(item[1]) and _is_size(item[2])
              and isinstance(item[3], int) and not isinstance(item[3], bool) and item[3] >= 1)
        if not ok:
            raise ConfigError(f"train.resolution_schedule entry {item!r} is not accepted; expected "
                              "[start fraction in (0, 1), width, height (multiples of 16), batch_size >= 1]")
        entries.append([float(item[0]), int(item[1]), int(item[2]), int(item[3])])
    starts = [e[0] for e in entries]
    if starts != sorted(set(starts)):
        raise ConfigError(f"train.resolution_schedule starts {starts} are not accepted; expected increasing fractions")
    return entries


# --- distributed helpers --------------------------------------------------------------------


def init_distributed(timeout_s: float = 7200.0) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE in the environment):
    NCCL when CUDA is available, gloo otherwise. -> (rank, world size); (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: rank 0 evaluates between runs while the others wait at the next collective.
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_device() -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- data -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _training_scenes(seed_base: int, count: int, width: int, height: int, views: int, stereo_fraction: float) -> list:
    # Cached (one pool): the runs of a grid train on the same scenes, generated once.
    return _scenes(seed_base, count, Stage(width, height, 1, 1, 0.0, count, stereo_fraction), views)


@functools.lru_cache(maxsize=1)
def _validation(width: int, height: int, n_scenes: int, n_pairs: int, views: int, window: int, seed: int) -> list[dict]:
    recipe = TeacherRecipe(val_scenes=n_scenes, val_pairs=n_pairs, views_per_scene=views, window=window, seed=seed)
    return _val_examples(Stage(width, height, 1, 1, 0.0, n_scenes), recipe)


def training_scenes(spec: TrainSpec, stage: int = 0) -> list:
    """The training scene pool rendered at the resolution of `spec.stages()[stage]`."""
    _, width, height, _ = spec.stages()[stage]
    return _training_scenes(spec.scene_seed_base, spec.n_scenes, width, height,
                            spec.views_per_scene, float(spec.stereo_fraction))


def validation_examples(spec: TrainSpec) -> list[dict]:
    """Held-out pairs (validation seed range) at `spec.val_size()`, the same for every run with this shape."""
    width, height = spec.val_size()
    return _validation(width, height, spec.val_scenes, spec.val_pairs, spec.views_per_scene, spec.window, spec.seed)


def _to(d: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in d.items()}


class _OnDevice(nn.Module):
    """Lets `pqk.train.teacher.validate` (CPU tensors in, numpy metrics out) score a model that
    lives on a GPU: inputs go to the device, outputs come back to the CPU."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, view1: dict, view2: dict):
        res1, res2 = self.model(_to(view1, self.device), _to(view2, self.device))
        return ({k: v.float().cpu() for k, v in res1.items()}, {k: v.float().cpu() for k, v in res2.items()})


def _validate(model: nn.Module, examples: list[dict], device: torch.device) -> dict[str, float]:
    return validate(model if device.type == "cpu" else _OnDevice(model, device), examples)


# --- the loop -------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    spec: TrainSpec,
    out_dir: Path,
    *,
    resume: bool = True,
    extra_modules: dict[str, nn.Module] | None = None,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    name: str = "train",
    device: str | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` (and `extra_modules`, e.g. feature projections) to minimise `loss_fn`.

    Continues from `out_dir/last.pth` when `resume` and it exists (a finished run returns at
    once). Returns the model with its best-epoch weights loaded. `on_step(step, logs)` is
    called after every optimizer step (tests use it to kill a run)."""
    run = _Fit(model, loss_fn, spec, out_dir, extra_modules=extra_modules, log=log, show_progress=show_progress,
               name=name, device=device, on_step=on_step)
    run.restore(resume)
    if not run.finished:
        run.train()
    return run.result()


class _Fit:
    """One call of `fit`, in phases (set up, restore, train epoch by epoch, result) that share
    the model, the optimizer and the run state as attributes named as `fit`'s locals were."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, spec: TrainSpec, out_dir: Path, *,
                 extra_modules: dict[str, nn.Module] | None, log: Callable[[str], None], show_progress: bool,
                 name: str, device: str | None, on_step: Callable[[int, dict[str, float]], None] | None):
        self.model, self.loss_fn, self.spec, self.log, self.name, self.on_step = model, loss_fn, spec, log, name, on_step
        self.show_progress = show_progress
        out_dir = self.out_dir = Path(out_dir)
        self.rank, self.world = _dist_info()
        self.main = self.rank == 0
        self.dev = torch.device(device or _default_device())
        if self.main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path, self.log_path = out_dir / "last.pth", out_dir / "best.pth", out_dir / f"{name}_log.json"

        torch.manual_seed(spec.seed)
        extras = self.extras = nn.ModuleDict(extra_modules or {})
        model.to(self.dev)
        extras.to(self.dev)
        self.params = [p for p in list(model.parameters()) + list(extras.parameters()) if p.requires_grad]
        self.extra_params = [p for p in extras.parameters() if p.requires_grad]
        # Betas as the teacher's recipe (and DUSt3R's): 0.95 reacts faster on short schedules.
        self.opt = torch.optim.AdamW(self.params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)

        self.total = spec.total_steps
        self.warmup = min(spec.warmup_steps, self.total // 5)  # a scaled-down run still spends most steps at full lr
        self.step, self.history, self.elapsed, self.skipped = 0, [], 0.0, 0
        self.best_key, self.best_epoch, self.best_val, self.bad_epochs, self.stopped, self.finished = None, 0, {}, 0, False, False
        self.epoch_sums: dict[str, float] = {}
        self.rng_states = None
        self.best_state = None
        self.ema = WeightAverage(model, spec.ema_decay) if spec.ema_decay > 0 else None

    def restore(self, resume: bool) -> None:
        """Start over (stale checkpoints removed) or continue from last.pth."""
        spec, last_path, best_path, world = self.spec, self.last_path, self.best_path, self.world
        if not resume and self.main:
            # Starting over: a stale best.pth must never stand in for this run's best epoch.
            for stale in (last_path, best_path):
                stale.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()  # nobody reads last.pth while rank 0 may still be removing it
        if resume and last_path.exists():
            state = torch.load(last_path, map_location="cpu", weights_only=True)
            if state.get("spec") != _spec_key(spec):
                changed = sorted(k for k, v in _spec_key(spec).items() if state.get("spec", {}).get(k) != v)
                raise ConfigError(
                    f"{last_path} belongs to a run with another training spec ({', '.join(changed) or 'unknown'} differ); "
                    "resume it with the same settings, or start over (--no-resume / another --out)"
                )
            if state.get("world_size", 1) != world:
                raise ConfigError(f"{last_path} was written by {state.get('world_size')} processes, this run has {world}; "
                                  "resume with the same number of processes")
            self.model.load_state_dict(state["model"])
            self.extras.load_state_dict(state["extra"])
            self.opt.load_state_dict(state["optimizer"])
            self.step, self.history, self.elapsed, self.skipped = state["step"], state["history"], state["elapsed_s"], state["skipped_steps"]
            self.best_key, self.best_epoch, self.best_val = state["best_key"], state["best_epoch"], state["best_val"]
            self.bad_epochs, self.stopped, self.finished = state["bad_epochs"], state["stopped"], state["finished"]
            self.epoch_sums, self.rng_states = state["epoch_sums"], state["rng"]
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if best_path.exists():
                self.best_state = torch.load(best_path, map_location="cpu", weights_only=True)
            self.log(f"{self.name}: resuming at step {self.step}/{self.total} (epoch {self.step // spec.steps_per_epoch + 1})"
                     + (" — already finished" if self.finished else ""))

    def train(self) -> None:
        """Epochs until the last one or an early stop; `elapsed` grows by this call's time."""
        spec = self.spec
        self.t_run = time.perf_counter()
        self._start()
        try:
            while not self.finished:
                epoch = self.step // spec.steps_per_epoch  # 0-based
                epoch_end = (epoch + 1) * spec.steps_per_epoch
                while self.step < epoch_end:
                    self._train_step(epoch_end)

                # --- end of epoch: validate (rank 0), decide, checkpoint
                self._end_epoch(epoch)
        finally:
            if self.progress is not None:
                self.progress.stop()
            if self.writer is not None:
                self.writer.close()
        self.elapsed += time.perf_counter() - self.t_run

    def _start(self) -> None:
        """Scenes, the pair sampler (its RNG restored on resume), validation pairs, the DDP
        wrapper, train mode, the progress bar and the TensorBoard writer."""
        spec, model, dev, world, main = self.spec, self.model, self.dev, self.world, self.main
        # Each rank draws its own pairs: the effective batch is world x batch_size. One pool per
        # resolution, one random stream for all (so last.pth holds a single sampler state).
        self.samplers = [PairSampler(training_scenes(spec, k), window=spec.window, seed=spec.seed + 7919 * self.rank)
                         for k in range(len(spec.stages()))]
        self.sampler = self.samplers[0]
        for other in self.samplers[1:]:
            other.rng = self.sampler.rng
        if self.rng_states is not None:
            _set_rng_state(self.rng_states[self.rank], self.sampler, dev)
        self.val = validation_examples(spec) if main else []
        self.wrapped: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters: DUSt3R's mask_token (training-only) never gets a gradient.
            self.wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
        model.train()
        self.extras.train()
        self.progress = _progress(self.show_progress and main, self.name, self.total)
        if self.progress is not None:
            self.progress.update(self.progress.task_ids[0], completed=self.step)
        self.writer = _tensorboard(self.out_dir) if main else None

    def _checkpoint(self, epoch_done: bool) -> None:
        rngs = _gather(_rng_state(self.sampler, self.dev), self.world)
        if not self.main:
            return
        _atomic_save({
            "spec": _spec_key(self.spec), "world_size": self.world, "model": self.model.state_dict(),
            "extra": self.extras.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
            "history": self.history, "elapsed_s": self.elapsed + time.perf_counter() - self.t_run,
            "skipped_steps": self.skipped, "best_key": self.best_key, "best_epoch": self.best_epoch,
            "best_val": self.best_val, "bad_epochs": self.bad_epochs, "stopped": self.stopped, "finished": self.finished,
            "epoch_sums": {} if epoch_done else self.epoch_sums, "rng": rngs,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }, self.last_path)

    def _train_step(self, epoch_end: int) -> None:
        """One optimizer step (skipped on a non-finite gradient norm), its logs, and a
        mid-epoch last.pth every `checkpoint_every` steps."""
        spec, opt, world, progress, writer = self.spec, self.opt, self.world, self.progress, self.writer
        lr = warmup_cosine(self.step, self.total, self.warmup, spec.lr, spec.lr * spec.lr_min_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        stage = spec.stage_at(self.step / self.total)
        view1, view2, gt = (_to(d, self.dev) for d in self.samplers[stage].batch(spec.stages()[stage][3]))
        loss, logs = self.loss_fn(self.wrapped, view1, view2, gt, self.step / self.total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            # DDP averages the model's gradients; extra modules are averaged here.
            for p in self.extra_params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        norm = torch.nn.utils.clip_grad_norm_(self.params, spec.grad_clip)
        if torch.isfinite(norm):
            opt.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:  # identical on every rank (gradients are already averaged)
            self.skipped += 1
            opt.zero_grad(set_to_none=True)
        self.step += 1
        step, epoch_sums = self.step, self.epoch_sums
        logs = {**logs, "lr": lr}
        for k, v in logs.items():
            epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v)
        epoch_sums["_n"] = epoch_sums.get("_n", 0.0) + 1
        if progress is not None:
            progress.update(progress.task_ids[0], completed=step, info=_short({k: v for k, v in logs.items() if k != "lr"}))
        if writer is not None:
            for k, v in logs.items():
                writer.add_scalar(f"train/{k}", v, step)
        if self.on_step is not None:
            self.on_step(step, logs)
        if step % spec.checkpoint_every == 0 and step < epoch_end:
            self._checkpoint(epoch_done=False)

    def _end_epoch(self, epoch: int) -> None:
        """Validate (rank 0, verdict broadcast), keep the best, decide on stopping, log, and
        write last.pth and the JSON log."""
        spec, model, name, main, step = self.spec, self.model, self.name, self.main, self.step
        with self.ema.swapped_in(model) if self.ema is not None else nullcontext(model) as judged:
            metrics = _validate(judged, self.val, self.dev) if main else None
            kept = _cpu_state(judged)  # the weights judged are the weights a better epoch keeps
        metrics = _broadcast(metrics, self.world)
        key = metrics["absrel"] if math.isfinite(metrics["absrel"]) else math.inf
        improved = self.best_key is None or key < self.best_key
        n = max(1.0, self.epoch_sums.pop("_n", 1.0))
        entry = {"epoch": epoch + 1, "step": step, **{f"train_{k}": v / n for k, v in self.epoch_sums.items()},
                 **{f"val_{k}": v for k, v in metrics.items()}, "best": improved,
                 "elapsed_s": round(self.elapsed + time.perf_counter() - self.t_run, 1)}
        self.history.append(entry)
        self.epoch_sums = {}
        if improved:
            self.best_key, self.best_epoch, self.best_val, self.bad_epochs = key, epoch + 1, dict(metrics), 0
            self.best_state = {"model": kept, "extra": _cpu_state(self.extras), "epoch": epoch + 1, "val": dict(metrics)}
            if main:
                _atomic_save(self.best_state, self.best_path)
        elif spec.stage_at((step - 1) / self.total) == len(spec.stages()) - 1:
            # Only epochs at the final resolution count toward patience: validation runs at that
            # resolution, so the earlier, lower-resolution epochs are expected not to improve on it.
            self.bad_epochs += 1
        stopped = self.stopped = spec.patience is not None and self.bad_epochs >= spec.patience and epoch + 1 < spec.epochs
        self.finished = stopped or epoch + 1 >= spec.epochs
        self.log(f"{name}: epoch {epoch + 1}/{spec.epochs} train {_short({k[6:]: v for k, v in entry.items() if k.startswith('train_') and k != 'train_lr'})}"
                 f" | val absrel {metrics['absrel']:.4f} δ1 {metrics['delta1']:.4f}" + (" (best)" if improved else "")
                 + (f" — early stop (no better val absrel for {self.bad_epochs} epochs)" if stopped else ""))
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, step)
        self._checkpoint(epoch_done=True)
        if main:
            _write_log(self.log_path, name, spec, self.world, self.history, self.best_epoch, self.best_val, stopped,
                       self.finished, self.elapsed + time.perf_counter() - self.t_run, self.skipped, step)

    def result(self) -> FitResult:
        """The best epoch's weights loaded, the final log written (finished), the outcome."""
        model, extras = self.model, self.extras
        if self.best_state is not None:
            model.load_state_dict(self.best_state["model"])
            extras.load_state_dict(self.best_state["extra"])
        model.eval()
        wall = self.elapsed  # training time proper (scene generation included), summed over resumes
        if self.main:
            _write_log(self.log_path, self.name, self.spec, self.world, self.history, self.best_epoch, self.best_val,
                       self.stopped, True, wall, self.skipped, self.step)
        return FitResult(model=model, history=self.history, best_epoch=self.best_epoch, stopped_early=self.stopped,
                         wall_time_s=wall, log_path=self.log_path, best_val=self.best_val, steps_done=self.step,
                         world_size=self.world, skipped_steps=self.skipped)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (loss functions reach it this way)."""
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


__all__ = ["FitResult", "LossFn", "TrainSpec", "fit", "init_distributed", "training_scenes", "unwrap",
           "validation_examples"]
