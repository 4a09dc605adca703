"""CMAPKD as a registered method of the CLIP family (`method: cmapkd`), with the baselines and
ablations of seed 004 §5 as runs of one config (configs/clip/cmapkd.yaml), so that every run
trains the same student on the same data for the same steps:

    runs:
      CMAPKD:  {objective: cmapkd}
      Scratch: {objective: scratch}        # task loss only
      KD:      {objective: kd}             # + Hinton KD on the similarity logits
      FitNet:  {objective: fitnet}         # + a hint at the middle image block
      CLIP-KD: {objective: clipkd}         # + feature and affinity mimicry
      PromptKD: {objective: promptkd}      # the seed's VLM baselines, transferred to a dual
      C2KD:    {objective: c2kd}           # encoder (baselines_vlm.py)
      LLaVA-KD: {objective: llavakd}
      noVP:    {objective: cmapkd, visual_pyramid: false}   # ... and the other ablations

A plan step may set `run` and `seed` (the seed of the student's initialisation and of the
training order: the main comparison is repeated over three).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register

OBJECTIVES = ("cmapkd", "scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd")
_ABLATION_KEYS = {"visual_pyramid": bool, "language_hierarchy": bool, "alsn": str, "align": bool, "relation": bool,
                  "schedule": str}


@dataclass(frozen=True)
class CmapkdRun:
    name: str
    objective: str
    student: dict
    spec: Any  # CmapkdSpec (its train: the ClipTrainSpec)


def check_choice(what: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{what} {value!r} is not accepted; accepted: {', '.join(accepted)}")


def _run_spec(config: Path, data: dict, run: str, seed: int | None) -> CmapkdRun:
    from pqk.methods.clip.method import _train_spec
    from pqk.methods.cmapkd.losses import LossWeights
    from pqk.methods.cmapkd.objective import ALSN_MODES, SCHEDULES, CmapkdSpec

    raw = dict(data["runs"][run] or {})
    objective = str(raw.pop("objective", "cmapkd"))
    check_choice(f"{config}: run {run}: objective", objective, OBJECTIVES)
    train = {**(data.get("train") or {}), **(raw.pop("train", None) or {})}
    if objective == "scratch":
        train["kd_weight"] = 0
    if seed is not None:
        train["seed"] = seed
    flags = {}
    for key, value in raw.items():
        if key not in _ABLATION_KEYS or not isinstance(value, _ABLATION_KEYS[key]):
            raise ConfigError(f"{config}: run {run}: {key} = {value!r} is not accepted; accepted: "
                              + ", ".join(f"{k} ({t.__name__})" for k, t in _ABLATION_KEYS.items()))
        flags[key] = value
    check_choice(f"{config}: run {run}: alsn", flags.get("alsn", "adaptive"), ALSN_MODES)
    check_choice(f"{config}: run {run}: schedule", flags.get("schedule", "progressive"), SCHEDULES)
    common = data.get("cmapkd") or {}
    if not isinstance(common, dict) or set(common) - {"channels", "stage_lr", "weights"}:
        raise ConfigError(f"{config}: the cmapkd section accepts channels, stage_lr, weights")
    weights = common.get("weights") or {}
    known = {f.name for f in fields(LossWeights)}
    if not isinstance(weights, dict) or set(weights) - known:
        raise ConfigError(f"{config}: cmapkd.weights accepts {', '.join(sorted(known))}")
    spec = CmapkdSpec(train=_train_spec(train, f"{config}: run {run}"), channels=int(common.get("channels", 64)),
                      stage_lr=_flag(common.get("stage_lr", True), f"{config}: cmapkd.stage_lr"),
                      weights=LossWeights(**{k: float(v) for k, v in weights.items()}), **flags)
    return CmapkdRun(run, objective, dict(data["student"]), spec)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r} is not accepted; accepted: true, false")
    return value


@register
class Cmapkd(Method):
    name = "cmapkd"
    letter = "K"
    options = frozenset({"run", "seed"})
    default_config = "configs/clip/cmapkd.yaml"
    trains = True
    families = ("clip",)

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> CmapkdRun:
        from pqk.methods.clip.method import _config

        data = _config(config)
        runs = data.get("runs")
        if not isinstance(runs, dict) or not runs or not isinstance(data.get("student"), dict):
            raise ConfigError(f"{config} must have 'student' (CLIP constructor arguments) and 'runs'")
        run = str(options.get("run") or next(iter(runs)))
        if run not in runs:
            raise ConfigError(f"cmapkd run {run!r} is not in {config}; accepted: {', '.join(runs)}")
        seed = options.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed {seed!r} is not accepted; expected an integer")
        return _run_spec(config, data, run, seed)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: CmapkdRun) -> StepResult:
        from pqk.methods.clip.train import train_student, training_sets
        from pqk.models.clip import CLIP
        from pqk.models.clip.family import image_resolution

        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        # the plan's teacher, not the step's entering model: the student is built fresh from the config,
        # and ctx.teacher is the one object every run shares (its targets are computed once: teacher_cache)
        model = ctx.teacher
        train = spec.spec.train.scaled(ctx.budget)
        torch.manual_seed(train.seed)
        student = CLIP(**spec.student)
        objective = _objective(spec, replace(spec.spec, train=train), model, student)
        ctx.log(f"cmapkd {spec.name} ({spec.objective}): CLIP student "
                f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, {train.epochs} epochs x {train.n_train} images")
        sets = training_sets(train, image_resolution(student))  # the figures read its validation set too
        student, history, hours = train_student(student, model, train, ctx.out_dir, ctx.log, ctx.resume, objective, sets)
        path = ctx.family.save_model(student, ctx.out_dir / "student.safetensors",
                                     history=[{"step": "cmapkd", "run": spec.name, "seed": train.seed}])
        details = {"run": spec.name, "objective": spec.objective, "seed": train.seed, "train": history,
                   "spec": {**train.__dict__, "channels": spec.spec.channels, "stage_lr": spec.spec.stage_lr}}
        if spec.objective == "cmapkd" and _is_full_method(spec.spec):  # Figures 3-6 are the full method's
            from pqk.methods.cmapkd.objective import figure_data

            details["figures"] = figure_data(objective, model.eval(), student.eval(), sets[1])
        return StepResult(model=student, artifact=path, device_hours=hours, fields={"T": train.T if train.kd_weight else None},
                          details=details)

    def cost(self, costing, step, model, where: str):
        from pqk.methods.clip.cost import cmapkd_cost

        return cmapkd_cost(costing, step, model, where)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        tag = str(options.get("run", "CMAPKD")).replace("-", "").replace("_", "")
        return tag + (f"_s{options['seed']}" if options.get("seed") is not None else "")


def _is_full_method(spec) -> bool:
    """No ablation flag set (the CMAPKD run, at any seed)."""
    return (spec.visual_pyramid and spec.language_hierarchy and spec.alsn == "adaptive" and spec.align
            and spec.relation and spec.schedule == "progressive")


def _objective(run: CmapkdRun, spec, teacher, student):
    from pqk.methods.clip.train import Objective

    if run.objective == "cmapkd":
        from pqk.methods.cmapkd.objective import CmapkdObjective

        return CmapkdObjective(spec, teacher, student)
    if run.objective == "fitnet":
        from pqk.methods.cmapkd.baselines import FitNetObjective

        return FitNetObjective(spec.train, teacher, student)
    if run.objective == "clipkd":
        from pqk.methods.cmapkd.baselines import ClipKDObjective

        return ClipKDObjective(spec.train, teacher, student)
    if run.objective in ("promptkd", "c2kd", "llavakd"):
        from pqk.methods.cmapkd import baselines_vlm

        cls = {"promptkd": baselines_vlm.PromptKDObjective, "c2kd": baselines_vlm.C2KDObjective,
               "llavakd": baselines_vlm.LLaVAKDObjective}[run.objective]
        return cls(spec.train, teacher, student)
    return Objective(spec.train)  # scratch (kd_weight 0) and kd
