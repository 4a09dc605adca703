"""Rotate as a plan step (`method: rotate`): rotation and affine transforms that flatten
activation outliers before low-bit quantization, with fake quantization at the target bits.

- transform: hadamard (QuaRot-style, fixed orthogonal: folded on the value path, online
  elsewhere), flatquant (FlatQuant-style, a learned invertible P1 ⊗ P2 and per-channel scale
  per Linear, fitted on held-out calibration pairs), none (plain round-to-nearest PTQ at the
  same bits: the baseline).
- bits_w / bits_a in 2..8: the block Linears are fake-quantized (weights per output channel,
  symmetric; activations per token, asymmetric, dynamic) — a quality simulation, not a
  faster model. bits 32 (`bits: float`): transform only, for pqk's real INT8 `quantize` step
  to follow; the online transforms export to ONNX and stay float under that quantizer.

Nothing trains on the workload; calibration scenes come from the calibration seed range.
Saved as the whole transformed state_dict (safetensors) plus a JSON of the module layout
(`pqk.methods.rotate.apply.save_rotated`), which `restore` rebuilds."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common
from pqk.methods.rotate.transforms import FLOAT_BITS

TRANSFORMS = ("hadamard", "flatquant", "none")
INITS = ("auto", "hadamard", "identity")
QUANT_BITS = range(2, 9)
CALIBRATION_SEED_OFFSET = 700_000  # apart from quantization's (+0) and the cascade's (+500,000) scenes
FLATQUANT_FLOAT_TARGET = (8, 8)  # transform only: fit for the INT8 step that follows
_BITS_TAG = re.compile(r"^W(\d+)A(\d+)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RotateSpec:
    transform: str = "hadamard"
    bits_w: int = 4
    bits_a: int = 8
    calibration_pairs: int = 4
    calibration_tokens: int = 512
    flatquant_steps: int = 40
    flatquant_lr: float = 0.005
    flatquant_init: str = "auto"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"rotate transform {self.transform!r} is not known; accepted: {', '.join(TRANSFORMS)}")
        for key in ("bits_w", "bits_a"):
            value = getattr(self, key)
            if not _is_int(value) or (value not in QUANT_BITS and value != FLOAT_BITS):
                raise ConfigError(f"rotate {key} must be an integer 2..8, or 32 for float (transform only); got {value!r}")
        if (self.bits_w == FLOAT_BITS) != (self.bits_a == FLOAT_BITS):
            raise ConfigError(f"rotate bits_w {self.bits_w} with bits_a {self.bits_a}: give both in 2..8, "
                              "or both 32 (bits: float, transform only)")
        if self.transform == "none" and not self.quantized:
            raise ConfigError("rotate transform 'none' with bits float changes nothing; accepted: bits_w/bits_a "
                              "in 2..8 (plain PTQ at those bits) or transform hadamard/flatquant")
        for key, low in (("calibration_pairs", 1), ("calibration_tokens", 16), ("flatquant_steps", 0)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise ConfigError(f"rotate {key} must be an integer >= {low}; got {value!r}")
        lr = self.flatquant_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise ConfigError(f"rotate flatquant_lr must be a number in (0, 1); got {lr!r}")
        if self.flatquant_init not in INITS:
            raise ConfigError(f"rotate flatquant_init {self.flatquant_init!r} is not known; accepted: {', '.join(INITS)}")

    @property
    def quantized(self) -> bool:
        return self.bits_w < FLOAT_BITS

    @property
    def bits_tag(self) -> str:
        return f"W{self.bits_w}A{self.bits_a}" if self.quantized else "float"


def parse_bits(value: Any) -> tuple[int, int]:
    """A step's `bits:` ("float" or "W4A8") as (bits_w, bits_a)."""
    if value == "float":
        return FLOAT_BITS, FLOAT_BITS
    match = _BITS_TAG.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"rotate bits {value!r} is not known; accepted: float, or W<bits>A<bits> such as W4A8")
    return int(match.group(1)), int(match.group(2))


def calibration_pairs(n_pairs: int, width: int, height: int, device: str = "cpu") -> list[tuple[dict, dict]]:
    """Views 0 and 1 of generated scenes from the calibration seed range (never the workload's)."""
    from pqk.data.scenes import generate_scene
    from pqk.methods.quantize.spec import CALIBRATION_SEED_MIN
    from pqk.tasks.dust3r.measure import scene_view

    pairs = []
    for k in range(n_pairs):
        scene = generate_scene(CALIBRATION_SEED_MIN + CALIBRATION_SEED_OFFSET + k, n_views=2, width=width, height=height)
        pairs.append((scene_view(scene, 0, device), scene_view(scene, 1, device)))
    return pairs


def rotate_model(model: torch.nn.Module, spec: RotateSpec, pairs: list[tuple[dict, dict]], *, budget: float = 1.0,
                 seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Apply `spec` to `model` in place (`pairs`: calibration pairs, the first also checks that
    the transform alone left the float output unchanged). Returns the step's details."""
    from pqk.methods.rotate.apply import apply_flatquant, apply_hadamard, block_linears, set_fake_quant_bits
    from pqk.methods.rotate.flatquant import capture_inputs

    model.eval()
    details: dict[str, Any] = {"transform": spec.transform, "bits": spec.bits_tag, "bits_w": spec.bits_w,
                               "bits_a": spec.bits_a, "weights": "per-output-channel symmetric (RTN)",
                               "activations": "per-token asymmetric, dynamic", "block_linears": len(block_linears(model))}
    with torch.inference_mode():
        before = model(*pairs[0])
    if spec.transform == "hadamard":
        parts = apply_hadamard(model)
        details.update(folded_layers=len(parts["folded"]), online_layers=len(parts["online"]))
    elif spec.transform == "flatquant":
        bits = (spec.bits_w, spec.bits_a) if spec.quantized else FLATQUANT_FLOAT_TARGET
        steps = max(0, round(spec.flatquant_steps * budget))
        log(f"rotate flatquant: capturing inputs on {len(pairs)} calibration pairs, fitting at W{bits[0]}A{bits[1]}, "
            f"{steps} steps per layer")
        inputs = capture_inputs(model, block_linears(model), pairs, spec.calibration_tokens, len(pairs), seed)
        losses = apply_flatquant(model, inputs, *bits, init=spec.flatquant_init, steps=steps, lr=spec.flatquant_lr,
                                 log=log)
        mean = [sum(v[i] for v in losses.values()) / len(losses) for i in range(3)]
        hadamard_starts = sum(v[3] == "hadamard" for v in losses.values())
        details.update(folded_layers=0, online_layers=len(losses), flatquant={
            "fitted_at": f"W{bits[0]}A{bits[1]}", "steps": steps, "lr": spec.flatquant_lr, "init": spec.flatquant_init,
            "tokens_per_layer": spec.calibration_tokens, "calibration_pairs": len(pairs),
            "loss_plain_mean": mean[0], "loss_before_mean": mean[1], "loss_after_mean": mean[2],
            "hadamard_starts": hadamard_starts,
            "layers": {k: dict(zip(("plain", "before", "after", "init"), v)) for k, v in losses.items()}})
    else:
        details.update(folded_layers=0, online_layers=0)
    with torch.inference_mode():
        after = model(*pairs[0])
    # Transforms are exact in exact arithmetic: what is left is float32 rounding (orthogonal: ~1e-7;
    # a learned P adds its conditioning).
    details["float_rel_change"] = max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30))
                                      for a, b in zip(after, before) for k in b if k.startswith("pts3d"))
    details["quantized_layers"] = set_fake_quant_bits(model, spec.bits_w, spec.bits_a)
    return details


@register
class Rotate(Method):
    name = "rotate"
    letter = "R"
    options = frozenset({"transform", "bits", "bits_w", "bits_a"})
    default_config = "configs/rotate.yaml"

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> RotateSpec:
        from pqk.yaml_io import read_config_mapping

        data = read_config_mapping(config, "rotate config", set(RotateSpec.__dataclass_fields__))
        given = [k for k in ("bits_w", "bits_a") if k in options]
        if "bits" in options:
            if given:
                raise ConfigError(f"rotate: give bits or {'/'.join(given)}, not both")
            data["bits_w"], data["bits_a"] = parse_bits(options["bits"])
        data.update({k: options[k] for k in ("transform", *given) if k in options})
        if len(given) == 1 and options[given[0]] == FLOAT_BITS:
            data["bits_w"] = data["bits_a"] = FLOAT_BITS  # `bits_w: 32` alone in a step means transform only
        return RotateSpec(**data)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: RotateSpec) -> StepResult:
        from pqk.methods.rotate.apply import save_rotated

        start = time.perf_counter()
        model = model.to(ctx.device).eval()
        height, width = ctx.family.input_shape(ctx.workload)
        n_pairs = spec.calibration_pairs if spec.transform == "flatquant" else 1  # else: the float check only
        pairs = calibration_pairs(n_pairs, width, height, ctx.device)
        details = rotate_model(model, spec, pairs, budget=ctx.budget, seed=ctx.seed, log=ctx.log)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        artifact = save_rotated(model, ctx.out_dir / "rotated_model.safetensors",
                                {"transform": spec.transform, "bits_w": spec.bits_w, "bits_a": spec.bits_a})
        details["layout"] = str(artifact.with_suffix(".json"))
        ctx.log(f"rotate {spec.transform} {spec.bits_tag}: {details['online_layers']} online, "
                f"{details['folded_layers']} folded, {details['quantized_layers']} fake-quantized; "
                f"float change {details['float_rel_change']:.2g}")
        if spec.quantized:
            runtime = f"torch eager fp32, block Linears fake-quantized {spec.bits_tag} (simulated: no low-bit kernels)"
        else:
            runtime = "torch eager fp32 with online transforms"
        return StepResult(model=model, artifact=artifact, fields={"bits_w": spec.bits_w, "bits_a": spec.bits_a},
                          device_hours=(time.perf_counter() - start) / 3600, details=details, runtime=runtime,
                          notes=[f"rotate {spec.transform} {spec.bits_tag}"])

    def must_be_last(self, spec: RotateSpec) -> str | None:
        if not spec.quantized:
            return None
        return ("a fake-quantized rotate (bits below 32) must come last; give the step bits: float "
                "(transform only) to quantize after it")

    def restore(self, done, entering, task) -> StepResult:
        from pqk.methods.rotate.apply import load_rotated

        return StepResult(model=load_rotated(done["artifact"]), **restore_common(done))

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        details = (result.details if result is not None else None) or {}
        transform = details.get("transform") or options.get("transform", RotateSpec.transform)
        bits = details.get("bits")
        if bits is None:
            if "bits" in options:
                bits = str(options["bits"])
            else:
                w, a = options.get("bits_w", RotateSpec.bits_w), options.get("bits_a", RotateSpec.bits_a)
                bits = "float" if FLOAT_BITS in (w, a) else f"W{w}A{a}"
        return f"{transform}_{bits}"

    def stage(self, alone: bool) -> str:
        return "P2"  # training-free, judged like Q

    def reference(self, alone: bool) -> str:
        return "input"

    def cost(self, costing, step, model, where: str):
        cfg = costing.config(step)
        if step.options.get("transform", cfg.get("transform", RotateSpec.transform)) != "flatquant":
            return [], model  # one forward pass: the float check
        n = int(cfg.get("calibration_pairs", RotateSpec.calibration_pairs))
        sh = costing.shape
        costing.note(f"{where}: flatquant's per-layer Adam fits are not counted")
        return [costing.forwards("rotate", f"flatquant calibration: {n} pairs at {sh['width']}x{sh['height']}",
                                 model, n, sh["width"], sh["height"])], model
