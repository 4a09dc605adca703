"""QAT: fake quantization initialised from PTQ, trained by the shared trainer for the last
third, exported to the same QDQ form with its own scales; ONNX Runtime agrees with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import generated_pair, rel_l2
from pqk.backends.onnx_export import OrtPairRunner
from pqk.backends.torch_int8 import qdq_linear_params
from pqk.methods.qat import (
    FakeQuantLinear,
    QatSpec,
    activation_ranges,
    export_qat,
    fake_quant_modules,
    prepare_qat,
    set_fake_quant,
    strip_qat,
    train_qat,
)
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.models.dust3r import build_model, load_checkpoint
from pqk.train.trainer import TrainSpec

TINY = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
            img_size=(64, 96), landscape_only=False)
H, W = 48, 64


@pytest.fixture(scope="module")
def ptq(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict, QuantSpec, list]:
    torch.manual_seed(42)
    model = build_model(**TINY).eval()
    spec = QuantSpec(calibration={"size": 4})
    calib = calibration_pairs(spec, W, H)
    return model, quantize(model, spec, calib, tmp_path_factory.mktemp("ptq"), H, W), spec, calib


def _views() -> tuple[dict, dict]:
    return generated_pair(11, W, H)


def test_prepare_takes_ptq_scales_and_round_trips(ptq) -> None:
    model, result, _, _ = ptq
    qat = prepare_qat(model, result["onnx_int8"])
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = qdq_linear_params(result["onnx_int8"], linears)
    fq = fake_quant_modules(qat)
    assert len(fq) == len(linears) == len(params)
    # decoder_embed runs once per view: two nodes, one module, one range covering both.
    assert len(params["decoder_embed"]["calls"]) == 2
    name = "enc_blocks.1.mlp.fc1"
    assert float(fq[name].input_scale) == pytest.approx(params[name]["input_scale"])
    low, high = activation_ranges(qat)[name]
    assert (high - low) / 255 == pytest.approx(params[name]["input_scale"], rel=1e-6)
    plain = strip_qat(qat)
    assert not any(isinstance(m, FakeQuantLinear) for m in plain.modules())
    views = _views()
    with torch.no_grad():
        assert torch.equal(plain(*views)[0]["pts3d"], model(*views)[0]["pts3d"])
        set_fake_quant(qat, False)
        assert torch.equal(qat(*views)[0]["pts3d"], model(*views)[0]["pts3d"])
        set_fake_quant(qat, True)
        assert 0 < rel_l2(qat(*views)[0]["pts3d"], model(*views)[0]["pts3d"]) < 0.2


def test_straight_through_gradients_reach_the_weights(ptq) -> None:
    model, result, _, _ = ptq
    qat = prepare_qat(model, result["onnx_int8"])
    res1, res2 = qat(*_views())
    (res1["pts3d"].sum() + res2["pts3d_in_other_view"].sum() + res1["conf"].sum() + res2["conf"].sum()).backward()
    grads = [m.weight.grad for m in fake_quant_modules(qat).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) > 0 for g in grads) >= len(grads) - 1


def test_qat_trains_exports_and_onnx_runtime_agrees_with_fake_quant(ptq, tmp_path: Path) -> None:
    model, result, spec, calib = ptq
    train = TrainSpec(epochs=3, steps_per_epoch=2, batch_size=2, lr=1e-4, warmup_steps=1, patience=None,
                      width=W, height=H, n_scenes=2, views_per_scene=3, window=1, val_scenes=1, val_pairs=2)
    qat, fit = train_qat(model, result["onnx_int8"], QatSpec(train=train, teacher_weight=0.5), tmp_path / "qat",
                         teacher=model, show_progress=False, log=lambda _m: None)
    assert fit.steps_done == 6
    changed = fake_quant_modules(qat)["dec_blocks.0.mlp.fc2"].weight
    assert not torch.equal(changed, model.get_submodule("dec_blocks.0.mlp.fc2").weight)
    exported = export_qat(qat, spec, calib, tmp_path / "out", H, W)
    # One imposed range per Linear node (decoder_embed has two).
    assert exported["summary"]["imposed_activation_ranges"] == len(fake_quant_modules(qat)) + 1
    # The file carries QAT's scales, not recalibrated ones.
    params = qdq_linear_params(exported["onnx_int8"], set(fake_quant_modules(qat)))
    for name, module in fake_quant_modules(qat).items():
        assert params[name]["input_scale"] == pytest.approx(float(module.input_scale), rel=1e-5)
        assert params[name]["input_zero_point"] == int(module.input_zero_point)
    views = _views()
    with torch.no_grad():
        fake = qat(*views)
    ort = OrtPairRunner(exported["onnx_int8"])(*views)
    # Same grid for every Linear; ORT also quantizes the patch Conv (not faked here).
    for view, key in ((0, "pts3d"), (0, "conf"), (1, "pts3d_in_other_view"), (1, "conf")):
        assert rel_l2(ort[view][key], fake[view][key]) < 0.02, (view, key, rel_l2(ort[view][key], fake[view][key]))
    # quant_ckpt.pth: an ordinary DUSt3R checkpoint holding the trained float weights.
    reloaded = load_checkpoint(exported["checkpoint"])
    assert torch.equal(reloaded.state_dict()["dec_blocks.0.mlp.fc2.weight"], changed.detach())
    assert onnx.load(str(exported["onnx_int8"])).graph.node  # a loadable file
    assert np.isfinite(ort[0]["pts3d"].numpy()).all()
