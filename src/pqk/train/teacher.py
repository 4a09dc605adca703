"""Training the embedded teacher: a small DUSt3R learned from procedurally generated scenes
with DUSt3R's own objective, low resolution first, then 512 (as DUSt3R went 224 -> 512).

Everything is seeded (seed 42) and checkpointed atomically, so a killed run resumes where it
stopped and a rerun of the recipe reproduces the bundled weights' recipe.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pqk.data.pair_batches import PairSampler, collate_pairs, pair_example, window_pairs
from pqk.models.dust3r import build_model, count_parameters, save_model
from pqk.train.losses import conf_regression_loss
from pqk.train.schedule import warmup_cosine

# Linear head: the DPT head's fixed widths (256 features, ~20M parameters per head) would not
# fit the 25 MB bundle; a linear head keeps the teacher at ~5M parameters and any input size.
TEACHER_KWARGS = dict(
    enc_embed_dim=192, enc_depth=6, enc_num_heads=4,
    dec_embed_dim=128, dec_depth=4, dec_num_heads=4,
    head_type="linear", img_size=(512, 512), landscape_only=False,
    patch_embed_cls="PatchEmbedDust3R", pos_embed="RoPE100",
    output_mode="pts3d", depth_mode=("exp", "-inf", "inf"), conf_mode=("exp", 1, "inf"),
)
# Generated-scene seeds: training uses its own range, disjoint from evaluation scenes.
TRAIN_SEED_BASE = 1_000_000
VAL_SEED_BASE = 2_000_000


@dataclass
class Stage:
    width: int
    height: int
    steps: int
    batch_size: int
    lr: float
    n_scenes: int
    # Share of the stage's scenes seen by the rectified stereo rig instead of the arc
    # (real pairs such as Middlebury's are pure sideways translations).
    stereo_fraction: float = 0.0


@dataclass
class TeacherRecipe:
    model_kwargs: dict = field(default_factory=lambda: dict(TEACHER_KWARGS))
    stages: list[Stage] = field(
        default_factory=lambda: [
            Stage(128, 96, 2000, 16, 4e-4, 1200),
            Stage(256, 192, 1200, 8, 2e-4, 320),
            Stage(512, 384, 150, 2, 5e-5, 60),
            # A model trained at 256x192 loses ~6 points of absrel at 512 (4x the tokens):
            # a longer full-resolution stage brings it back.
            Stage(512, 384, 450, 2, 1e-4, 80),
        ]
    )
    views_per_scene: int = 8
    window: int = 4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    alpha: float = 0.2
    val_scenes: int = 8
    val_pairs: int = 32
    checkpoint_every: int = 100
    seed: int = 42

    def scaled(self, factor: float) -> "TeacherRecipe":
        """The same recipe with step and scene counts multiplied by `factor` (budget knob)."""
        stages = [
            replace(s, steps=max(1, round(s.steps * factor)), n_scenes=max(2, round(s.n_scenes * factor)))
            for s in self.stages
        ]
        return TeacherRecipe(**{**asdict(self), "stages": stages})


def _scenes(seed_base: int, count: int, stage: Stage, views: int) -> list:
    from pqk.data.scenes import generate_scene

    n_stereo = round(count * stage.stereo_fraction)
    return [
        generate_scene(seed_base + k, n_views=views, width=stage.width, height=stage.height,
                       rig="stereo" if k >= count - n_stereo else "orbit")
        for k in range(count)
    ]


def _val_examples(stage: Stage, recipe: TeacherRecipe) -> list[dict]:
    scenes = _scenes(VAL_SEED_BASE, recipe.val_scenes, replace(stage, stereo_fraction=0.0), recipe.views_per_scene)
    pairs = [(s, i, j) for s in range(len(scenes)) for i, j in window_pairs(recipe.views_per_scene, recipe.window)]
    rng = np.random.default_rng(recipe.seed)
    picks = rng.choice(len(pairs), size=min(recipe.val_pairs, len(pairs)), replace=False)
    return [pair_example(scenes[pairs[k][0]], pairs[k][1], pairs[k][2]) for k in sorted(picks)]


@torch.no_grad()
def validate(model: torch.nn.Module, examples: list[dict], batch_size: int = 4) -> dict[str, float]:
    """Median-aligned depth metrics of view 1 (the protocol's depth figures) and the loss."""
    from pqk.tasks.dust3r.metrics import aggregate_depth_metrics, depth_metrics

    model.eval()
    per_view, losses = [], []
    for start in range(0, len(examples), batch_size):
        view1, view2, gt = collate_pairs(examples[start : start + batch_size])
        res1, res2 = model(view1, view2)
        loss, _ = conf_regression_loss(res1, res2, gt)
        losses.append(float(loss))
        for b in range(view1["img"].shape[0]):
            per_view.append(
                depth_metrics(res1["pts3d"][b, ..., 2].numpy(), gt["pts1"][b, ..., 2].numpy(), gt["valid1"][b].numpy())
            )
    model.train()
    agg = aggregate_depth_metrics(per_view)
    return {"loss": float(np.mean(losses)), "absrel": agg["absrel"], "delta1": agg["delta1"], "rmse": agg["rmse"]}


def _save_state(path: Path, state: dict) -> None:
    from pqk.io.files import atomic_torch_save

    atomic_torch_save(state, path)


def _recipe_record(recipe: TeacherRecipe, model: torch.nn.Module, total_steps: int, done_before: int, elapsed: float,
                   history: list) -> dict:
    """teacher_recipe.json: the recipe, what this run did, the validation history and where it ran."""
    return {
        "recipe": asdict(recipe),
        "total_steps": total_steps,
        "steps_this_run": total_steps - done_before,
        "train_wall_time_s": round(elapsed, 1),
        "params": count_parameters(model),
        "history": history,
        "final_val": {k: v for k, v in history[-1].items() if k.startswith("val_")} if history else {},
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }


def train_teacher(
    recipe: TeacherRecipe,
    out_dir: Path,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train (or resume) the teacher into `out_dir`; returns the model and the recipe record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = build_model(**recipe.model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.stages[0].lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    total_steps = sum(s.steps for s in recipe.stages)
    state_path = out_dir / "last.pth"
    stage_idx, step_in_stage, history, elapsed, sampler_state = 0, 0, [], 0.0, None
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        stage_idx, step_in_stage = state["stage"], state["step_in_stage"]
        history, elapsed, sampler_state = state["history"], state["elapsed_s"], state["sampler"]
        log(f"resuming at stage {stage_idx + 1}, step {step_in_stage}")
    model.train()
    done_before = sum(s.steps for s in recipe.stages[:stage_idx]) + step_in_stage

    while stage_idx < len(recipe.stages):
        stage = recipe.stages[stage_idx]
        t_gen = time.perf_counter()
        sampler = PairSampler(
            _scenes(TRAIN_SEED_BASE + 10_000 * stage_idx, stage.n_scenes, stage, recipe.views_per_scene),
            window=recipe.window, seed=recipe.seed + stage_idx,
        )
        if sampler_state is not None:
            sampler.set_state(sampler_state)
            sampler_state = None
        val = _val_examples(stage, recipe)
        log(f"stage {stage_idx + 1}/{len(recipe.stages)}: {stage.width}x{stage.height}, {stage.n_scenes} scenes "
            f"generated in {time.perf_counter() - t_gen:.1f}s, {stage.steps} steps of {stage.batch_size} pairs")
        t0 = time.perf_counter()
        while step_in_stage < stage.steps:
            lr = warmup_cosine(step_in_stage, stage.steps, recipe.warmup_steps if stage_idx == 0 else 20, stage.lr, stage.lr * 0.05)
            for g in opt.param_groups:
                g["lr"] = lr
            view1, view2, gt = sampler.batch(stage.batch_size)
            res1, res2 = model(view1, view2)
            loss, logs = conf_regression_loss(res1, res2, gt, alpha=recipe.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            step_in_stage += 1
            done = sum(s.steps for s in recipe.stages[:stage_idx]) + step_in_stage
            if on_step is not None:
                on_step(done, total_steps, {**logs, "lr": lr})
            last_of_stage = step_in_stage == stage.steps
            if step_in_stage % recipe.checkpoint_every == 0 or last_of_stage:
                metrics = validate(model, val)
                now = elapsed + time.perf_counter() - t0
                history.append({"stage": stage_idx + 1, "step": step_in_stage, "train_loss": logs["loss"], **{f"val_{k}": v for k, v in metrics.items()}, "elapsed_s": round(now, 1)})
                log(f"  step {done}/{total_steps} loss {logs['loss']:.3f} val absrel {metrics['absrel']:.4f} delta1 {metrics['delta1']:.4f}")
                next_stage, next_step = (stage_idx + 1, 0) if last_of_stage else (stage_idx, step_in_stage)
                _save_state(state_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "stage": next_stage, "step_in_stage": next_step, "history": history, "elapsed_s": now,
                    "sampler": None if last_of_stage else sampler.state(),
                })
        elapsed += time.perf_counter() - t0
        stage_idx, step_in_stage = stage_idx + 1, 0
        del sampler

    record = _recipe_record(recipe, model, total_steps, done_before, elapsed, history)
    model.eval()
    save_model(model, out_dir / "teacher.safetensors", history=[{"step": "teacher_train", "seed": recipe.seed, "total_steps": total_steps}])
    (out_dir / "teacher_recipe.json").write_text(json.dumps(record, indent=1))
    return model, record
