"""OpenVINO runs pqk's ONNX artifacts: the FP32 export in f32 (equal to ONNX Runtime), the QDQ
file on INT8 kernels with its float parts in bf16, behind the same pair-runner interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pqk.backends.onnx_export import OrtPairRunner
from pqk.backends.openvino_runtime import OvPairRunner, int8_layers, int8_precision
from pqk.errors import InputError
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.models.dust3r import build_model

from conftest import TINY_KWARGS, generated_pair, rel_l2

H, W = 64, 96


def _tiny() -> torch.nn.Module:
    torch.manual_seed(42)
    return build_model(**TINY_KWARGS).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = QuantSpec(calibration={"size": 4, "method": "minmax"})
    return quantize(_tiny(), spec, calibration_pairs(spec, W, H), tmp_path_factory.mktemp("ov"), H, W)


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    return generated_pair(42, W, H)  # an evaluation scene: never calibrated on


def _outputs(res: tuple[dict, dict]) -> list[torch.Tensor]:
    return [res[0]["pts3d"], res[0]["conf"], res[1]["pts3d_in_other_view"], res[1]["conf"]]


def test_fp32_export_runs_in_f32_and_equals_onnx_runtime(files: dict, pair: tuple) -> None:
    ov = OvPairRunner(files["onnx_fp32"], threads=2)
    assert not ov.quantized and ov.precision == "f32" and ov.label == "openvino fp32, f32"
    # Same float32 graph, two engines: only summation order differs (1e-5 is ~100 float32 ulps of
    # accumulated rounding over the network; bf16 anywhere would show as ~1e-2).
    for got, ref in zip(_outputs(ov(*pair)), _outputs(OrtPairRunner(files["onnx_fp32"], threads=2)(*pair))):
        assert rel_l2(got, ref) < 1e-5


def test_qdq_file_runs_on_int8_kernels_close_to_onnx_runtime(files: dict, pair: tuple) -> None:
    ov = OvPairRunner(files["onnx_int8"], threads=2)
    assert ov.quantized and ov.precision == int8_precision()
    layers = int8_layers(ov)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in build_model(**TINY_KWARGS).modules())
    assert layers.get("u8", 0) >= n_linear - 1  # every Linear (decoder_embed serves both views) on u8 x i8
    # The same integers, different float parts (bf16 vs float32) and requantisation points:
    # both must stay as close to each other as each is to the FP32 model (test_quantize's bound 0.2).
    fp32 = _outputs(OrtPairRunner(files["onnx_fp32"], threads=2)(*pair))
    ort = _outputs(OrtPairRunner(files["onnx_int8"], threads=2)(*pair))
    for got, ref, f in zip(_outputs(ov(*pair)), ort, fp32):
        assert torch.isfinite(got).all()
        assert rel_l2(got, ref) < 0.2 and rel_l2(got, f) < 0.2


def test_precision_and_shape_errors_are_one_line(files: dict) -> None:
    with pytest.raises(InputError, match="precision 'fp8'.*accepted: auto, f32, bf16"):
        OvPairRunner(files["onnx_fp32"], precision="fp8")
    ov = OvPairRunner(files["onnx_fp32"], precision="f32")
    view = {"img": torch.zeros(1, 3, 32, 32)}
    with pytest.raises(InputError, match="exported for"):
        ov(view, view)


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(InputError, match="OpenVINO cannot read"):
        OvPairRunner(bad)


@pytest.mark.parametrize("mode, kinds", [("int8_qk", {"attention_qk"}), ("int8_qkv", {"attention_qk", "attention_pv"})])
def test_8bit_attention_quantizes_the_attention_matmuls(files: dict, pair: tuple, tmp_path: Path, mode: str,
                                                        kinds: set) -> None:
    import onnx

    spec = QuantSpec(attention=mode, calibration={"size": 4, "method": "minmax"})
    made = quantize(_tiny(), spec, calibration_pairs(spec, W, H), tmp_path, H, W)
    n_softmax = sum(n.op_type == "Softmax" for n in onnx.load(str(files["onnx_fp32"])).graph.node)
    assert made["summary"]["quantized_kinds"] == {k: n_softmax for k in kinds}  # one q·kᵀ (and P·V) per attention
    assert made["summary"]["excluded_nodes"]["activation_matmul"] == (n_softmax if mode == "int8_qk" else 0)
    assert made["record_fields"]["keep_list"].endswith(f"+attention:{mode}")
    # Everything else is the float-attention file: the two differ by the attention core's rounding only.
    base = _outputs(OrtPairRunner(files["onnx_int8"], threads=2)(*pair))
    for got, ref in zip(_outputs(OvPairRunner(made["onnx_int8"], threads=2)(*pair)), base):
        assert torch.isfinite(got).all() and rel_l2(got, ref) < 0.2


def test_attn8_method_is_quantize_with_8bit_attention() -> None:
    from pqk.errors import ConfigError
    from pqk.methods.base import get_method

    method = get_method("attn8")
    spec = method.load_spec(Path("configs/quant.yaml"), {"variant": "int_flash"})
    assert spec.quant.attention == "int8_qkv" and method.keyparams({"variant": "sage"}, None) == "PTQ_attnqk"
    with pytest.raises(ConfigError, match="attn8 variant 'fp4' is not known; accepted: sage, int_flash"):
        method.load_spec(Path("configs/quant.yaml"), {"variant": "fp4"})
    with pytest.raises(ConfigError, match="attention: unknown mode 'int4'"):
        QuantSpec(attention="int4")


def test_linears_compile_as_matmuls_with_the_files_integers(files: dict, pair: tuple) -> None:
    import onnx

    from pqk.backends.openvino_form import matmul_form

    proto = onnx.load(str(files["onnx_int8"]))
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    scales = {n.input[0]: tuple(n.input[1:]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert gemms and matmul_form(proto) == len(gemms)
    onnx.checker.check_model(proto)
    assert not any(n.op_type == "Gemm" for n in proto.graph.node)
    # Each Linear's input is quantized with the scale and zero point it had before the rewrite.
    new_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("pqk_ov_Q")]
    assert len(new_q) == len(gemms) and all(tuple(n.input[1:]) in set(scales.values()) for n in new_q)
    # Quantizing the 3-D tensor gives the integers of the 2-D one; only float summation order and
    # the rounding flips it causes differ, which must stay well inside the INT8 error itself.
    as_file = OvPairRunner(files["onnx_int8"], threads=2, linears_as_matmul=False)
    as_matmul = OvPairRunner(files["onnx_int8"], threads=2)
    assert as_file.rewritten_linears == 0 and as_matmul.rewritten_linears == len(gemms)
    fp32 = _outputs(OrtPairRunner(files["onnx_fp32"], threads=2)(*pair))
    for a, b, ref in zip(_outputs(as_file(*pair)), _outputs(as_matmul(*pair)), fp32):
        assert rel_l2(b, a) <= max(rel_l2(a, ref), 1e-3)
