"""Q as a registered method: PTQ, the keep-list search and QAT as one step (`quantize_run`),
named PTQ/QAT plus what differs from the default spec, gated P2 alone and P3 after K or P,
costed for `pqk budget` (QAT counted although `qat: auto` runs it only when PTQ misses)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pqk.errors import ConfigError
from pqk.measure.probe import CostModel, Costing, Item
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common


@dataclass
class QuantStepSpec:
    quant: Any  # pqk.methods.quantize.QuantSpec
    runtimes: tuple[str, ...] = ("onednn", "onnxruntime", "openvino")
    qat: str = "auto"
    auto_keep: bool = False
    fixed_calibration: bool = False  # the calibration size is the experiment's subject (ABL-2): no budget scaling


def _runtimes(value: Any) -> tuple[str, ...]:
    from pqk.methods.quantize_step import RUNTIMES

    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = tuple(str(r).strip() for r in items if str(r).strip())
    bad = [r for r in items if r not in RUNTIMES]
    if bad or not items:
        raise ConfigError(f"unknown runtime {bad[0] if bad else '(none)'!r}; expected one or more of {', '.join(RUNTIMES)}")
    return items


@register
class Quantize(Method):
    name = "quantize"
    letter = "Q"
    options = frozenset({"qat", "runtimes", "keep_list", "calibration_size", "auto_keep", "attention"})
    default_config = "configs/quant.yaml"
    quantizes = True

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> QuantStepSpec:
        from pqk.methods.quantize import load_quant_spec
        from pqk.methods.quantize_step import QAT_MODES

        spec = load_quant_spec(config)
        if "keep_list" in options:
            spec = spec.with_keep_list(options["keep_list"])
        if "attention" in options:  # 8-bit attention (spec.ATTENTION_MODES); validated by QuantSpec
            spec = replace(spec, attention=options["attention"])
        if "calibration_size" in options:
            # QuantSpec validates on construction: a size that is not a positive integer is refused here.
            spec = replace(spec, calibration=replace(spec.calibration, size=options["calibration_size"]))
        qat = str(options.get("qat", "auto"))
        if qat not in QAT_MODES:
            raise ConfigError(f"unknown qat mode {qat!r}; expected one of {', '.join(QAT_MODES)}")
        from pqk.methods.quantize_step import DEFAULT_RUNTIMES

        return QuantStepSpec(spec, _runtimes(options.get("runtimes", DEFAULT_RUNTIMES)), qat,
                             bool(options.get("auto_keep", False)), "calibration_size" in options)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: QuantStepSpec) -> StepResult:
        from pqk.methods.quantize.run import quantize_run

        return quantize_run(model, ctx, spec)

    def restore(self, done, entering, task) -> StepResult:
        return restore_quantized(done, entering, task)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        from pqk.methods.quantize import KEEP_KINDS

        tag = "QAT" if ((result.details if result else None) or {}).get("qat") else "PTQ"
        keep = options.get("keep_list")
        if keep is not None and list(keep) != list(KEEP_KINDS):
            tag += "_keep" + ("".join(_KEEP_TAGS.get(k, k) for k in keep) or "none")
        if "calibration_size" in options:
            tag += f"_cal{int(options['calibration_size'])}"
        if options.get("attention", "float") != "float":
            tag += "_attn" + str(options["attention"]).removeprefix("int8_")
        return tag

    def stage(self, alone: bool) -> str:
        return "P2" if alone else "P3"

    def reference(self, alone: bool) -> str:
        return "teacher" if alone else "input"

    def cost(self, costing, step, model, where: str):
        return quantize_cost(costing, step, model, where)


_KEEP_TAGS = {"Softmax": "SM", "attention_scale": "AS", "LayerNorm": "LN"}


def restore_quantized(done: Mapping[str, Any], entering: torch.nn.Module, task) -> StepResult:
    """A finished quantizing step from its summary: the float model (the step's own when it
    trained one, else its input) and the INT8 artifact on the runtime it was measured on."""
    common = restore_common(done)
    float_model = task.load_model(done["float_model"]) if done.get("float_model") else entering
    if done["backend"] in ("onnxruntime", "openvino"):
        return StepResult(model=None, backend=done["backend"], onnx_path=Path(done["onnx_path"]), count_model=float_model,
                          float_model=done.get("float_model") and Path(done["float_model"]), **common)
    from pqk.backends.torch_int8 import int8_model_from_qdq

    int8, _ = int8_model_from_qdq(float_model, done["artifact"])
    return StepResult(model=int8, backend="torch", count_model=float_model,
                      float_model=done.get("float_model") and Path(done["float_model"]), **common)


def apply_side_by_side(result: StepResult, details: Mapping[str, Any]) -> StepResult:
    """`result` with its p50 cut vs eager FP32 from the side-by-side table and whether that
    timing was contended (other processes on the cores: a latency gate cannot judge it)."""
    result.latency_cut = _latency_cut(details, result.backend)
    contention = (details.get("latency_side_by_side") or {}).get("contention") or {}
    result.latency_contended = bool(contention.get("contended"))
    return result


def _latency_cut(details: Mapping[str, Any], backend: str) -> float | None:
    """The side-by-side p50 cut of the runtime a quantized result runs on, vs eager FP32."""
    from pqk.methods.quantize_step import RUNTIME_LATENCY_KEY

    side = details.get("latency_side_by_side") or {}
    variant = RUNTIME_LATENCY_KEY["onednn" if backend == "torch" else backend]
    speedup = (side.get("variants") or {}).get(variant, {}).get("speedup")
    return None if not speedup else 1.0 - 1.0 / speedup


def quantize_cost(costing: Costing, step, model: CostModel, where: str) -> tuple[list[Item], CostModel]:
    from pqk.methods.quantize import DEFAULT_QAT

    cfg = costing.config(step)
    calib = cfg.get("calibration") or {}
    size = int(step.options.get("calibration_size", step.options.get("calib", calib.get("size", 512))))
    size = max(1, round(size * costing.budget)) if costing.budget != 1.0 else size
    sh = costing.shape
    items = [costing.forwards("quantize", f"PTQ calibration: {size} pairs at {sh['width']}x{sh['height']}",
                              model, size, sh["width"], sh["height"])]
    mode = str(step.options.get("qat", "auto"))
    if mode != "never":
        qat = {**DEFAULT_QAT, **(cfg.get("qat") or {})}
        spec = costing.train_spec(qat.get("train") or DEFAULT_QAT["train"], f"{where}: {step.config_name} qat.train")
        target = CostModel(f"{model.name} (FP32 target)", model.module) if float(qat.get("teacher_weight", 0.5)) > 0 else None
        for item in costing.train("quantize", "QAT", model, spec, target):
            if mode == "auto":
                item.conditional = "QAT runs only when PTQ misses the gate (qat: auto)"
            items.append(item)
    return items, model


ATTN8_VARIANTS = {"sage": "int8_qk", "int_flash": "int8_qkv"}


@dataclass
class Attn8Spec(QuantStepSpec):
    smooth_k: bool = True


@register
class Attn8(Quantize):
    """8-bit attention as a plan step: Q (W8A8 Linear layers, as `quantize`) with the attention
    core's MatMuls in the QDQ file too, so the deployed artifact runs them in INT8 (OpenVINO
    fuses q·kᵀ with its Q/DQ into INT8 attention). `variant: sage` quantizes q and k (softmax
    and P·V stay float: bf16 in OpenVINO), `variant: int_flash` P and V as well. `smooth_k`
    (default on, SageAttention's K smoothing) subtracts k's mean over tokens in the graph before
    its quantizer: exact in float, a narrower range for the 8 bits. Scales are per tensor (one
    per q, k, P, V input of each attention, calibrated like every activation), not per block of
    tokens: a QDQ file has no per-block activation scales that a CPU runtime fuses. Runs on the
    ONNX runtimes only by default (the oneDNN runtime's attention is bf16, not 8-bit)."""

    name = "attn8"
    options = Quantize.options - {"attention"} | {"variant", "smooth_k"}

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> Attn8Spec:
        variant = str(options.get("variant", "sage"))
        if variant not in ATTN8_VARIANTS:
            raise ConfigError(f"attn8 variant {variant!r} is not known; accepted: {', '.join(ATTN8_VARIANTS)}")
        smooth = options.get("smooth_k", True)
        if not isinstance(smooth, bool):
            raise ConfigError(f"attn8 smooth_k must be true or false; got {smooth!r}")
        rest = {k: v for k, v in options.items() if k not in ("variant", "smooth_k")}
        rest.setdefault("runtimes", "onnxruntime,openvino")
        base = super().load_spec(config, {**rest, "attention": ATTN8_VARIANTS[variant]})
        return Attn8Spec(**vars(base), smooth_k=smooth)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: Attn8Spec) -> StepResult:
        from pqk.models.dust3r.model import Attention, CrossAttention

        for module in model.modules():
            if isinstance(module, (Attention, CrossAttention)):
                module.smooth_k = spec.smooth_k
        result = super().run(model, ctx, spec)
        result.notes.append(f"8-bit attention {spec.quant.attention}, K smoothing {'on' if spec.smooth_k else 'off'}")
        result.details["attn8"] = {"attention": spec.quant.attention, "smooth_k": spec.smooth_k}
        return result

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        variant = str(options.get("variant", "sage"))
        tag = super().keyparams({**options, "attention": ATTN8_VARIANTS.get(variant, variant)}, result)
        return tag + ("_nosmooth" if options.get("smooth_k", True) is False else "")
