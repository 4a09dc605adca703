"""K, P and Q for the CLIP family, registered under the same names as DUSt3R's (a plan with
`task: clip` and `method: distill` runs these):

- distill: a CLIP student (official architecture, the config's constructor arguments) trained
  on the generated caption set with the contrastive task loss plus Hinton KD on the teacher's
  image–text similarity logits (`pqk.methods.clip.train`); run `control` is the task loss alone.
- prune: ρ of every trainable MLP's hidden channels removed by weight magnitude, then an
  optional short recovery distillation (`pqk.methods.clip.prune`).
- quantize: both towers exported and quantized to INT8 with ONNX Runtime (QDQ, per-channel
  weights, calibrated on generated training data) (`pqk.methods.clip.quantize`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common
from pqk.yaml_io import read_yaml

STUDENT_FILE = "student.safetensors"


def _config(path: Path) -> dict:
    data = read_yaml(path, "config", "see configs/clip/", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping")
    return data


def _train_spec(raw: Any, where: str):
    from pqk.methods.clip.train import ClipTrainSpec

    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of training keys")
    return ClipTrainSpec.from_dict(raw, where)


@dataclass(frozen=True)
class ClipDistillSpec:
    run: str
    student: dict
    train: Any  # ClipTrainSpec


@register
class ClipDistill(Method):
    name = "distill"
    letter = "K"
    options = frozenset({"run"})
    default_config = "configs/clip/distill.yaml"
    trains = True
    families = ("clip",)

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> ClipDistillSpec:
        from pqk.models.clip import CLIPConfig

        data = _config(config)
        runs = data.get("runs") or {"K-1": {}}
        run = str(options.get("run") or next(iter(runs)))
        if run not in runs:
            raise ConfigError(f"distillation run {run!r} is not in {config}; accepted: {', '.join(runs)}")
        student = data.get("student")
        if not isinstance(student, dict):
            raise ConfigError(f"{config}: 'student' must map the official CLIP constructor arguments")
        try:
            CLIPConfig(**student)
        except TypeError as exc:
            raise ConfigError(f"{config}: student: {exc}") from None
        train = {**(data.get("train") or {}), **((runs[run] or {}).get("train") or {})}
        return ClipDistillSpec(run, student, _train_spec(train, f"{config}: run {run}"))

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: ClipDistillSpec) -> StepResult:
        from pqk.models.clip import CLIP

        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        from pqk.methods.clip.train import train_student

        torch.manual_seed(ctx.seed)
        student = CLIP(**spec.student)
        train = spec.train.scaled(ctx.budget)
        ctx.log(f"distill {spec.run}: CLIP student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, "
                f"{train.epochs} epochs x {train.n_train} images")
        student, history, hours = train_student(student, model, train, ctx.out_dir, ctx.log, ctx.resume)
        path = ctx.family.save_model(student, ctx.out_dir / STUDENT_FILE, history=[{"step": "distill", "run": spec.run}])
        return StepResult(model=student, artifact=path, device_hours=hours,
                          fields={"T": train.T if train.kd_weight > 0 else None},
                          details={"run": spec.run, "train": history, "spec": train.__dict__})

    def cost(self, costing, step, model, where: str):
        from pqk.methods.clip.cost import distill_cost

        return distill_cost(costing, step, model, where)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        run = str(options.get("run", "K-1"))
        return run.replace("-", "").replace("_", "") if run != "control" else "taskonly"


@dataclass(frozen=True)
class ClipPruneSpec:
    rho: float
    finetune: Any  # ClipTrainSpec or None


@register
class ClipPrune(Method):
    name = "prune"
    letter = "P"
    options = frozenset({"rho"})
    default_config = "configs/clip/prune.yaml"
    trains = True
    families = ("clip",)

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> ClipPruneSpec:
        data = _config(config)
        rho = options.get("rho", data.get("rho", 0.3))
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < 1:
            raise ConfigError(f"rho {rho!r} is not accepted; expected a number between 0 and 1")
        return ClipPruneSpec(float(rho), _train_spec(data.get("finetune"), f"{config}: finetune"))

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: ClipPruneSpec) -> StepResult:
        from pqk.methods.clip.prune import prune_mlps
        from pqk.methods.clip.train import train_student

        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        report = prune_mlps(model, spec.rho)
        ctx.log(f"prune: rho {spec.rho:g} of {report['blocks']} MLPs, {report['params_before'] / 1e6:.2f}M -> "
                f"{report['params_after'] / 1e6:.2f}M params")
        hours, history = 0.0, []
        if spec.finetune is not None and spec.finetune.epochs > 0:
            train = spec.finetune.scaled(ctx.budget)
            model, history, hours = train_student(model, ctx.teacher, train, ctx.out_dir, ctx.log, ctx.resume)
        path = ctx.family.save_model(model, ctx.out_dir / "pruned.safetensors", history=[{"step": "prune", "rho": spec.rho}])
        return StepResult(model=model, artifact=path, device_hours=hours, fields={"rho": spec.rho},
                          details={**report, "finetune": history})

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        rho = (result.fields if result else {}).get("rho", options.get("rho", 0.3))
        return f"r{round(float(rho or 0) * 100):03d}"

    def stage(self, alone: bool) -> str:
        return "P4" if alone else "P1"


@dataclass(frozen=True)
class ClipQuantSpec:
    calibration_size: int = 64


@register
class ClipQuantize(Method):
    name = "quantize"
    letter = "Q"
    options = frozenset({"calibration_size"})
    default_config = "configs/clip/quant.yaml"
    quantizes = True
    families = ("clip",)

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> ClipQuantSpec:
        data = _config(config)
        size = options.get("calibration_size", (data.get("calibration") or {}).get("size", 64))
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"calibration_size {size!r} is not accepted; expected a positive integer")
        return ClipQuantSpec(size)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: ClipQuantSpec) -> StepResult:
        import time

        from pqk.methods.clip.quantize import quantize_towers

        start = time.perf_counter()
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        size = max(16, round(spec.calibration_size * min(1.0, ctx.budget * 4)))
        ctx.log(f"quantize: both towers to INT8 (ONNX Runtime QDQ), {size} calibration images and captions")
        files = quantize_towers(model, ctx.out_dir / "model_int8.onnx", n_calib=size)
        side = side_by_side(model, files.image, ctx.family.input_shape(ctx.workload)[0])
        result = StepResult(model=None, artifact=files.image, backend="onnxruntime", onnx_path=files.image,
                            count_model=model, device_hours=(time.perf_counter() - start) / 3600.0,
                            fields={"bits_w": 8, "bits_a": 8, "keep_list": "LayerNorm,Softmax,GELU"},
                            details={"calibration_size": size, "latency_side_by_side": side}, runtime="onnxruntime int8")
        return _with_cut(result, side)

    def restore(self, done: Mapping[str, Any], entering: torch.nn.Module, task) -> StepResult:
        common = restore_common(done)
        return StepResult(model=None, backend="onnxruntime", onnx_path=Path(done["onnx_path"]), count_model=entering, **common)

    def cost(self, costing, step, model, where: str):
        from pqk.methods.clip.cost import quantize_cost

        return quantize_cost(costing, step, model, where)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        size = options.get("calibration_size")
        return "PTQ" + (f"_cal{size}" if size else "")

    def stage(self, alone: bool) -> str:
        return "P2" if alone else "P3"

    def reference(self, alone: bool) -> str:
        return "teacher" if alone else "input"


def side_by_side(model: torch.nn.Module, image_onnx: Path, resolution: int) -> dict:
    """p50 of one image through eager FP32 and through the INT8 image tower, interleaved in one
    process (the shared machine slows both alike), with whether other processes took the cores."""
    from pqk.backends.clip_onnx import OrtTowerPair
    from pqk.measure.latency import interleaved_latency
    from pqk.measure.machine import Contention

    pair = OrtTowerPair(image_onnx, threads=torch.get_num_threads())
    image = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    float_model = copy.deepcopy(model).eval()

    def eager():
        with torch.inference_mode():
            float_model.encode_image(image)

    with Contention() as contention:
        table = interleaved_latency({"eager_fp32": eager, "ort_int8": lambda: pair.images(image)}, rounds=20,
                                    warmup=3, reference="eager_fp32")
    return {**table, "contention": contention.to_json()}


def _with_cut(result: StepResult, side: dict) -> StepResult:
    speedup = side["variants"]["ort_int8"].get("speedup")
    result.latency_cut = None if not speedup else 1.0 - 1.0 / speedup
    result.latency_contended = bool(side["contention"].get("contended"))
    return result


__all__ = ["ClipDistill", "ClipPrune", "ClipQuantize"]
