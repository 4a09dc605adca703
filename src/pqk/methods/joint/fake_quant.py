"""The Q part of joint PQK: every Linear fake-quantized (`install_fake_quant`) and its
activation ranges calibrated once, min/max over the calibration pairs (`calibrate_fake_quant`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pqk.methods.hooks import hooked
from pqk.methods.qat import FakeQuantLinear, fake_quant_modules, set_fake_quant


def install_fake_quant(model: nn.Module) -> None:
    """Every Linear becomes a `FakeQuantLinear`, switched off until calibrated."""
    from pqk.backends.torch_int8 import set_module

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            fq = FakeQuantLinear(module, 1.0, 0)
            fq.enabled.fill_(False)
            set_module(model, name, fq)


def uint8_range_params(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 grid over [low, high] widened to hold 0, as
    ONNX Runtime derives them from a calibrated range."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, int(min(255, max(0, round(-low / scale))))


@torch.no_grad()
def calibrate_fake_quant(model: nn.Module, pairs: list[tuple[dict, dict]]) -> dict[str, tuple[float, float]]:
    """Min/max of every FakeQuantLinear's (masked) input over `pairs`, set as its fixed grid;
    fake quantization is switched on. Returns the observed ranges."""
    modules = fake_quant_modules(model)
    seen: dict[str, list[float]] = {}

    def observe(name: str):
        def hook(_module: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            low, high = float(x.min()), float(x.max())
            old = seen.get(name)
            seen[name] = [low, high] if old is None else [min(old[0], low), max(old[1], high)]
        return hook

    set_fake_quant(model, False)
    was_training = model.training
    model.eval()
    try:
        with hooked((m, observe(n)) for n, m in modules.items()):
            for view1, view2 in pairs:
                model(view1, view2)
    finally:
        model.train(was_training)
    for name, module in modules.items():
        if name in seen:
            scale, zp = uint8_range_params(*seen[name])
            module.input_scale.fill_(scale)
            module.input_zero_point.fill_(zp)
    set_fake_quant(model, True)
    return {k: (v[0], v[1]) for k, v in seen.items()}


def fake_quant_on(model: nn.Module) -> bool:
    """Whether the activation ranges were calibrated (fake quantization switched on)."""
    return any(bool(m.enabled) for m in fake_quant_modules(model).values())


def calibration_views(pairs: list, width: int, height: int) -> list[tuple[dict, dict]]:
    """Calibration pairs (`calibration_pairs`: arrays for ONNX Runtime) as view dicts."""
    shape = torch.tensor([[height, width]], dtype=torch.int32)

    def view(img, k: int) -> dict:
        return {"img": torch.from_numpy(img), "true_shape": shape, "idx": [k], "instance": [str(k)]}

    return [(view(a, 0), view(b, 1)) for a, b in pairs]
