"""Quantization-aware training (protocol Q-2): fake quantization in PyTorch with the PTQ spec,
then the same QDQ ONNX form as PTQ.

- Every Linear that the PTQ file quantized becomes a `FakeQuantLinear`: its input is rounded
  to uint8 with the scale / zero point calibrated by PTQ (fixed: QAT adapts the weights to
  the deployed activation grid rather than moving the grid), its weight to int8 with one
  symmetric scale per output channel recomputed from the current weight (max|w| / 127, the
  rule ONNX Runtime applies at export). Rounding passes gradients straight through inside
  the range and blocks them outside it (PyTorch's fake-quantize ops, clipped STE).
- Training uses the shared trainer (`pqk.train.trainer.fit`) with DUSt3R's task loss, plus,
  when a teacher is given, an L1 term pulling the normalised pointmaps towards the FP32
  teacher's. Fake quantization is off for the first two thirds of the steps and on for the
  last third (the protocol's schedule): the float model first adapts to the training data,
  then to the integer grid.
- Export: the trained float weights go through the same PTQ path (`quantize_ptq`) with the
  QAT activation ranges imposed on the Linear inputs, so the QDQ file holds exactly the
  scales the model was trained with, and the ONNX Runtime outputs match the fake-quantized
  PyTorch outputs (tests/test_qat.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pqk.backends.torch_int8 import qdq_linear_params, set_module
from pqk.train.losses import conf_regression_loss, normalize_pair

QAT_ON_FROM = 2.0 / 3.0  # fake quantization for the last third of training (protocol Q-2)


class FakeQuantLinear(nn.Module):
    """A Linear computed on fake-quantized input (uint8, fixed scale) and weight (int8 per channel)."""

    def __init__(self, linear: nn.Linear, input_scale: float, input_zero_point: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer("input_zero_point", torch.tensor(int(input_zero_point), dtype=torch.int32))
        # A buffer, not a Python flag, so checkpoints (and exact resume) carry it.
        self.register_buffer("enabled", torch.tensor(True))

    def weight_scale(self) -> torch.Tensor:
        return (self.weight.detach().abs().amax(dim=1) / 127.0).clamp(min=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return F.linear(x, self.weight, self.bias)
        xq = torch.fake_quantize_per_tensor_affine(x, self.input_scale, self.input_zero_point, 0, 255)
        zeros = torch.zeros(self.out_features, dtype=torch.int32, device=self.weight.device)
        wq = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale(), zeros, 0, -127, 127)
        return F.linear(xq, wq, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, x_scale={float(self.input_scale):.3g}"


def prepare_qat(model: nn.Module, ptq_onnx: str | Path) -> nn.Module:
    """A copy of `model` whose Linears quantized in the PTQ file are `FakeQuantLinear`s with
    that file's activation scales."""
    params = qdq_linear_params(ptq_onnx, {n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    qat = copy.deepcopy(model)
    for name, module in list(qat.named_modules()):
        entry = params.get(name)
        if isinstance(module, nn.Linear) and entry is not None:
            set_module(qat, name, FakeQuantLinear(module, entry["input_scale"], entry["input_zero_point"]))
    return qat


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for module in fake_quant_modules(model).values():
        module.enabled.fill_(bool(enabled))


def strip_qat(model: nn.Module) -> nn.Module:
    """The float model inside a QAT model: plain Linears holding the trained weights."""
    plain = copy.deepcopy(model)
    for name, module in fake_quant_modules(plain).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = module.weight
        linear.bias = module.bias
        set_module(plain, name, linear)
    return plain


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per Linear: the float range whose uint8 asymmetric scale / zero point are exactly the
    QAT ones (ONNX Runtime recomputes scale = (max - min) / 255, zp = -min / scale)."""
    out = {}
    for name, module in fake_quant_modules(model).items():
        scale, zp = float(module.input_scale), int(module.input_zero_point)
        out[name] = (-zp * scale, (255 - zp) * scale)
    return out


@dataclass
class QatSpec:
    train: Any  # pqk.train.trainer.TrainSpec
    fake_quant_from: float = QAT_ON_FROM
    teacher_weight: float = 0.5  # 0 = task loss only

    @classmethod
    def from_dict(cls, data: dict, budget: float = 1.0) -> "QatSpec":
        """From the `qat:` section of a quantization spec; `budget` scales the epochs."""
        from pqk.errors import ConfigError
        from pqk.train.trainer import TrainSpec

        known = {"teacher_weight", "fake_quant_from", "train"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"qat: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        weight = data.get("teacher_weight", 0.5)
        start = data.get("fake_quant_from", QAT_ON_FROM)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"qat.teacher_weight = {weight!r} is not accepted; expected a number >= 0")
        if not isinstance(start, (int, float)) or isinstance(start, bool) or not 0 <= start < 1:
            raise ConfigError(f"qat.fake_quant_from = {start!r} is not accepted; expected a fraction in [0, 1)")
        train = TrainSpec.from_dict(dict(data.get("train", {})))
        return cls(train=train.scaled(budget) if budget != 1.0 else train, fake_quant_from=float(start),
                   teacher_weight=float(weight))


def qat_loss(teacher: nn.Module | None, teacher_weight: float, fake_quant_from: float) -> Callable:
    """The trainer's loss: task loss (+ teacher pointmap L1), fake quantization switched on
    from `fake_quant_from` of the run."""

    def loss_fn(model: nn.Module, view1: dict, view2: dict, gt: dict, progress: float):
        set_fake_quant(model, progress >= fake_quant_from)
        res1, res2 = model(view1, view2)
        loss, logs = conf_regression_loss(res1, res2, gt)
        if teacher is not None and teacher_weight > 0:
            with torch.no_grad():
                t1, t2 = teacher(view1, view2)
            ones1 = torch.ones_like(gt["valid1"])
            ones2 = torch.ones_like(gt["valid2"])
            s1, s2 = normalize_pair(res1["pts3d"], res2["pts3d_in_other_view"], ones1, ones2)
            g1, g2 = normalize_pair(t1["pts3d"], t2["pts3d_in_other_view"], ones1, ones2)
            kd = (s1 - g1).abs().mean() + (s2 - g2).abs().mean()
            loss = loss + teacher_weight * kd
            logs["kd"] = float(kd.detach())
        logs["fq"] = float(progress >= fake_quant_from)
        logs["loss"] = float(loss.detach())
        return loss, logs

    return loss_fn


def train_qat(
    model: nn.Module, ptq_onnx: str | Path, spec: QatSpec, out_dir: str | Path, teacher: nn.Module | None = None,
    resume: bool = True, log: Callable[[str], None] = print, show_progress: bool = True,
) -> tuple[nn.Module, Any]:
    """Fine-tune `model` with fake quantization initialised from the PTQ file. Returns the QAT
    model (fake quantization on, best epoch's weights) and the trainer's FitResult."""
    from pqk.train.trainer import fit

    qat = prepare_qat(model, ptq_onnx)
    if teacher is not None:
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    out_dir = Path(out_dir)
    result = fit(qat, qat_loss(teacher, spec.teacher_weight, spec.fake_quant_from), spec.train, out_dir,
                 resume=resume, log=log, show_progress=show_progress, name="qat")
    # The trainer hands back its best-validation epoch, which may come from the float part of
    # the run; the deployed model is the one that trained on the integer grid: the last weights.
    trained = result.model
    last = out_dir / "last.pth"
    if last.is_file():
        trained.load_state_dict(torch.load(last, map_location="cpu", weights_only=True)["model"])
    set_fake_quant(trained, True)
    return trained.eval(), result


def export_with_ranges(
    plain: nn.Module, ranges: dict[str, tuple[float, float]], quant_spec: Any, calib: list, out_dir: str | Path,
    height: int, width: int, name: str, other_shapes: Sequence = (),
) -> dict:
    """A float model as a QDQ file through the PTQ path, with `ranges` (module path -> the
    float range of its input) imposed on the Linear inputs instead of calibrated ones;
    `other_shapes` as in `pqk.methods.quantize.quantize`."""
    from pqk.backends.onnx_export import export_onnx
    from pqk.methods.quantize import quantize_ptq
    from pqk.methods.quantize.ptq import export_variants

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(plain.eval(), out_dir / name.replace("int8", "fp32"), height, width)
    variants = export_variants(plain, fp32, out_dir / name, other_shapes)
    summary = quantize_ptq(fp32, out_dir / name, quant_spec, calib, activation_ranges=ranges, variants=variants)
    return {"onnx_int8": out_dir / name, "onnx_fp32": fp32, "summary": summary}


def export_qat(
    qat_model: nn.Module, quant_spec: Any, calib: list, out_dir: str | Path, height: int, width: int,
    name: str = "qat_int8.onnx", other_shapes: Sequence = (),
) -> dict:
    """The QAT model as a QDQ file (same form as PTQ's) with its own activation scales, plus
    `quant_ckpt.pth`: the trained float weights (a DUSt3R checkpoint) with the scales in its
    history. Returns paths and the PTQ summary of the export."""
    from pqk.models.dust3r import save_model

    start = time.perf_counter()
    plain = strip_qat(qat_model).eval()
    ranges = activation_ranges(qat_model)
    exported = export_with_ranges(plain, ranges, quant_spec, calib, out_dir, height, width, name, other_shapes)
    ckpt = save_model(plain, Path(out_dir) / "quant_ckpt.pth", history=[{
        "step": "qat", "activation_ranges": {k: list(v) for k, v in ranges.items()},
        "quant_spec": quant_spec.to_dict(),
    }])
    return {**exported, "checkpoint": ckpt, "float_model": plain, "export_s": time.perf_counter() - start}
