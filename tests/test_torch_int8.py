"""PyTorch oneDNN INT8 runtime of a QDQ file: same integers as the file, outputs close to the
file run by ONNX Runtime, every Linear converted, bf16 attention switchable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import generated_pair, rel_l2
from pqk.backends.onnx_export import OrtPairRunner
from pqk.backends.torch_int8 import Int8Linear, int8_model_from_qdq, onednn_int8_available, qdq_linear_params
from pqk.errors import InputError
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.models.dust3r import build_model

pytestmark = pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN INT8 kernels in this torch")
TINY = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
            img_size=(64, 96), landscape_only=False)
H, W = 64, 96


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(42)
    model = build_model(**TINY).eval()
    spec = QuantSpec(calibration={"size": 4})
    return model, quantize(model, spec, calibration_pairs(spec, W, H), tmp_path_factory.mktemp("q"), H, W)


@pytest.fixture(scope="module")
def views() -> tuple[dict, dict]:
    return generated_pair(7, W, H)


def test_every_linear_becomes_int8_with_the_files_integers(made) -> None:
    model, result = made
    int8, report = int8_model_from_qdq(model, result["onnx_int8"], bf16_attention=False)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    converted = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert report["int8_linears"] == n_linear == len(converted) and report["float_linears"] == []
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    params = qdq_linear_params(result["onnx_int8"], {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    assert report["merged_calls"] == ["decoder_embed"]
    entry = params["dec_blocks.0.attn.qkv"]
    module = int8.get_submodule("dec_blocks.0.attn.qkv")
    assert torch.equal(module.weight_int8, torch.from_numpy(entry["weight_int8"]))
    assert module.weight_int8.dtype == torch.int8 and module.weight_scale.shape == (module.out_features,)
    # Per-channel symmetric: each row's largest |int| is 127 (scale = max|w| / 127).
    assert int(module.weight_int8.abs().amax(1).min()) >= 126
    # The float model is untouched (a copy was converted).
    assert isinstance(model.get_submodule("dec_blocks.0.attn.qkv"), torch.nn.Linear)


def test_int8_linear_matches_its_float_simulation() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 16) * 0.1
    scale = w.abs().amax(1) / 127
    w_int8 = torch.round(w / scale[:, None]).to(torch.int8)
    bias = torch.randn(32) * 0.01
    layer = Int8Linear(w_int8, scale, bias, input_scale=0.02, input_zero_point=128)
    x = torch.randn(3, 5, 16)
    xq = (torch.round(x / 0.02) + 128).clamp(0, 255)
    expected = ((xq - 128) * 0.02) @ (w_int8.float() * scale[:, None]).T + bias
    assert rel_l2(layer(x), expected) < 1e-5
    assert layer(x).shape == (3, 5, 32)


def test_outputs_agree_with_onnx_runtime_on_the_same_file(made, views) -> None:
    model, result = made
    int8, _ = int8_model_from_qdq(model, result["onnx_int8"], bf16_attention=False)
    ort = OrtPairRunner(result["onnx_int8"])
    with torch.inference_mode():
        res_fp32 = model(*views)
        res_int8 = int8(*views)
    res_ort = ort(*views)
    for key in ("pts3d", "conf"):
        err_vs_ort = rel_l2(res_int8[0][key], res_ort[0][key])
        err_vs_fp32 = rel_l2(res_int8[0][key], res_fp32[0][key])
        # Same integers, different engines (ORT re-quantizes some outputs): close, not equal.
        assert err_vs_ort < 0.1 and err_vs_fp32 < 0.2, (key, err_vs_ort, err_vs_fp32)
        assert torch.isfinite(res_int8[0][key]).all()


def test_bf16_attention_is_switchable_and_close(made, views) -> None:
    model, result = made
    plain, _ = int8_model_from_qdq(model, result["onnx_int8"], bf16_attention=False)
    bf16, report = int8_model_from_qdq(model, result["onnx_int8"], bf16_attention=True)
    assert "bf16 attention" in report["runtime"]
    with torch.inference_mode():
        a, b = plain(*views)[0]["pts3d"], bf16(*views)[0]["pts3d"]
    assert 0 < rel_l2(b, a) < 0.05  # really in bf16 (not bit-identical), still close


def test_missing_or_foreign_file_is_an_input_error(made, tmp_path: Path) -> None:
    model, _ = made
    with pytest.raises(InputError, match="not found"):
        int8_model_from_qdq(model, tmp_path / "nope.onnx")
    other = build_model(**{**TINY, "enc_embed_dim": 32, "dec_embed_dim": 32})
    with pytest.raises(InputError, match="no quantized Linear"):
        int8_model_from_qdq(other, made[1]["onnx_int8"])


def test_dpt_head_convolutions_run_in_bf16_and_stay_close(views) -> None:
    from pqk.backends.torch_int8 import Bf16Autocast, bf16_dpt_heads

    torch.manual_seed(0)
    model = build_model(**{**TINY, "head_type": "dpt", "dec_depth": 10}).eval()
    import copy

    fast = copy.deepcopy(model)
    assert bf16_dpt_heads(fast) == 2 and isinstance(fast.downstream_head1.dpt, Bf16Autocast)
    assert bf16_dpt_heads(fast) == 0  # idempotent
    with torch.inference_mode():
        a, b = model(*views)[0], fast(*views)[0]
    assert b["pts3d"].dtype == torch.float32
    assert 0 < rel_l2(b["pts3d"], a["pts3d"]) < 0.05
    assert bf16_dpt_heads(build_model(**TINY)) == 0  # linear heads: nothing to wrap
