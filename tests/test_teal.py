"""TEAL activation sparsity (pqk.methods.teal): thresholds calibrated on generated pairs reach
the target on other pairs, the sparsified Linear keeps the checkpoint's keys, the structured
variant is the masked dense computation, the masks survive ONNX export and the oneDNN INT8
runtime, and the method runs and restores as a plan step."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import generated_pair, rel_l2
from pqk.errors import ConfigError
from pqk.methods import teal
from pqk.methods.base import StepContext, get_method

H, W = 64, 96


@pytest.fixture(scope="module")
def calibration() -> list:
    return teal.teal_pairs(12, W, H, teal.SEED_CALIBRATION, batch=4)  # 4 pairs a forward call: quick


@pytest.fixture(scope="module")
def held_out() -> list:
    return teal.teal_pairs(8, W, H, teal.SEED_HELD_OUT, batch=4)


@pytest.fixture(scope="module")
def views() -> tuple[dict, dict]:
    return generated_pair(7, W, H)


def sparsified(model: torch.nn.Module, pairs: list, sparsity: float, variant: str) -> tuple[torch.nn.Module, dict]:
    out = copy.deepcopy(model)
    return out, teal.calibrate(out, pairs, sparsity, variant)


@pytest.fixture(scope="module")
def calibrated(tiny_model, calibration):
    """(variant, target) -> (sparsified copy of the tiny model, thresholds), each made once."""
    made: dict = {}

    def get(variant: str, target: float):
        if (variant, target) not in made:
            made[variant, target] = sparsified(tiny_model, calibration, target, variant)
        return made[variant, target]

    return get


@pytest.mark.parametrize("variant", teal.VARIANTS)
def test_thresholds_reach_the_target_on_held_out_pairs(tiny_model, calibrated, held_out, variant):
    names = teal.sparsifiable_linears(tiny_model)
    # every Linear of the blocks (qkv/proj, projq/k/v/proj, fc1/fc2); decoder_embed and the heads stay dense
    assert len(names) == 2 * 4 + 2 * 2 * 8 and "decoder_embed" not in names
    assert not any(n.startswith("downstream_head") for n in names)
    for target in (0.25, 0.4, 0.5):
        model, thresholds = calibrated(variant, target)
        assert set(thresholds) == set(names) and all(t > 0 for t in thresholds.values())
        measured = teal.measure_sparsity(model, held_out, names)
        assert measured["layers"] == len(names)
        assert abs(measured["mean"] - target) <= 0.02, (variant, target, measured)


def test_sparsity_zero_is_the_dense_model(tiny_model, calibration, views):
    model, thresholds = sparsified(tiny_model, calibration[:2], 0.0, "unstructured")
    assert set(thresholds.values()) == {0.0}
    with torch.inference_mode():
        dense, sparse = tiny_model(*views), model(*views)
    for a, b in zip(dense, sparse):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_state_dict_keys_are_unchanged_and_load_strictly(tiny_model, calibrated):
    from conftest import TINY_KWARGS

    from pqk.models.dust3r import build_model

    model, _ = calibrated("unstructured", 0.4)
    assert isinstance(model.get_submodule("enc_blocks.0.attn.qkv"), teal.SparseInputLinear)
    assert list(model.state_dict()) == list(tiny_model.state_dict())
    fresh = build_model(**TINY_KWARGS)
    fresh.load_state_dict(model.state_dict(), strict=True)
    # the threshold is a plain attribute, not a buffer: it lives in teal_thresholds.json
    assert isinstance(model.get_submodule("enc_blocks.0.attn.qkv").input_threshold, float)


def test_unstructured_linear_zeroes_small_entries():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    sparse = teal.SparseInputLinear.from_linear(linear, 0.5)
    assert sparse.weight is linear.weight and sparse.bias is linear.bias
    x = torch.randn(2, 10, 32)
    expected = F.linear(torch.where(x.abs() > 0.5, x, torch.zeros_like(x)), linear.weight, linear.bias)
    assert torch.equal(sparse(x), expected)


def test_structured_drops_the_target_share_and_equals_the_masked_dense(calibrated, calibration):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(2, 24, 64) * torch.rand(64) ** 2  # channels of different scales
    t = float(x.abs().mean(dim=1).flatten().quantile(0.4))
    sparse = teal.SparseInputLinear.from_linear(linear, t, structured=True)
    keep = teal.channel_keep(x, t)
    assert keep.shape == (2, 64) and abs((~keep).float().mean().item() - 0.4) <= 1 / 64
    masked_dense = F.linear(x * keep[:, None, :], linear.weight, linear.bias)
    # The gathered GEMM sums fewer products than the masked one (zeros skipped): same value up to
    # float32 reassociation, hence a tolerance of a few ulps of the outputs' scale.
    torch.testing.assert_close(sparse(x), masked_dense, rtol=1e-5, atol=1e-6)
    # model level: the share of channels dropped per view is the target, on the calibration pairs
    model, _ = calibrated("structured", 0.4)
    measured = teal.measure_sparsity(model, calibration, teal.sparsifiable_linears(model))
    assert abs(measured["mean"] - 0.4) <= 0.02, measured


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    from pqk.backends.onnx_export import export_onnx

    model, _ = calibrated("unstructured", 0.4)
    return model, export_onnx(model, tmp_path_factory.mktemp("teal") / "teal.onnx", H, W)


def test_unstructured_exports_to_onnx_and_matches_torch(exported, views):
    import onnx

    from pqk.backends.onnx_export import compare_with_torch

    model, path = exported
    # one Greater per distinct threshold: projk and projv read the same tensor, so share one
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Greater") == len(set(teal.sparsifiable_linears(model))) - 4
    report = compare_with_torch(model, path, *views)
    # Float32 reassociation in ORT (~1e-7 relative); an entry within rounding of its threshold
    # may flip its mask, which moves the output by about t·|w| at one position: 1e-4 is the
    # bound pqk's pruning check uses for "the export matches".
    assert report["max_rel_l2"] < 1e-4, report


def test_structured_exports_as_the_masked_dense_graph(tmp_path):
    """The structured Linear traces to its mask form (ReduceMean, Greater, Mul before one MatMul
    with a constant weight, which the quantizer can turn into int8); checked on one Linear, as
    the whole-model export path is the unstructured test's."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    x = torch.randn(2, 24, 64) * torch.rand(64) ** 2
    layer = teal.SparseInputLinear.from_linear(torch.nn.Linear(64, 32), 0.0, structured=True).eval()
    layer.input_threshold = float(x.abs().mean(dim=1).flatten().quantile(0.4))
    path = tmp_path / "linear.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, chosen as export_onnx does
        torch.onnx.export(layer, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ReduceMean", "Greater", "Mul", "MatMul"} <= ops and "NonZero" not in ops and "Gather" not in ops
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = layer(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_onednn_int8_runtime_keeps_the_threshold(exported, views, tmp_path):
    from pqk.backends.onnx_export import OrtPairRunner
    from pqk.backends.torch_int8 import Int8Linear, int8_model_from_qdq, onednn_int8_available
    from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize_ptq

    if not onednn_int8_available():
        pytest.skip("no oneDNN INT8 kernels in this torch")
    model, onnx_fp32 = exported
    spec = QuantSpec(calibration={"size": 4})
    qdq = tmp_path / "ptq_int8.onnx"
    quantize_ptq(onnx_fp32, qdq, spec, calibration_pairs(spec, W, H))
    int8, report = int8_model_from_qdq(model, qdq, bf16_attention=False)
    for name, module in int8.named_modules():
        if isinstance(module, Int8Linear):
            source = model.get_submodule(name)
            assert module.input_threshold == getattr(source, "input_threshold", 0.0), name
    assert int8.get_submodule("enc_blocks.0.mlp.fc1").input_threshold > 0
    # The mask runs on the float input before quantizing: the same as quantizing a masked input.
    layer = int8.get_submodule("enc_blocks.0.mlp.fc2")
    x = torch.randn(1, 24, layer.in_features) * 0.3
    plain = copy.copy(layer)
    plain.input_threshold = 0.0
    assert torch.equal(layer(x), plain(x * (x.abs() > layer.input_threshold)))
    # The QDQ file masks too: the INT8 model is closer to ONNX Runtime on it with its thresholds
    # than with them removed (tiny random models quantize coarsely, hence a comparison, not a bound).
    with torch.inference_mode():
        kept = int8(*views)[0]["pts3d"]
        for m in int8.modules():
            if isinstance(m, Int8Linear):
                m.input_threshold = 0.0
        dropped = int8(*views)[0]["pts3d"]
    ort = OrtPairRunner(qdq)(*views)[0]["pts3d"]
    assert rel_l2(kept, ort) < rel_l2(dropped, ort)


def test_bad_options_are_config_errors_naming_the_value(tmp_path):
    for bad in ({"sparsity": 1.5}, {"sparsity": -0.1}, {"sparsity": "half"}, {"sparsity": True},
                {"variant": "blocky"}, {"calibration_pairs": 0}, {"held_out_pairs": 2.5}):
        with pytest.raises(ConfigError, match=str(next(iter(bad.values())))) as info:
            teal.TealSpec(**bad)
        assert "\n" not in str(info.value)
    method = get_method("teal")
    config = tmp_path / "teal.yaml"
    config.write_text("sparsity: 0.4\nvariant: unstructured\nthreshold: 3\n")
    with pytest.raises(ConfigError, match="threshold"):
        method.load_spec(config, {})
    config.write_text("sparsity: 0.4\n")
    with pytest.raises(ConfigError, match="diagonal"):
        method.load_spec(config, {"variant": "diagonal"})
    assert method.load_spec(config, {"sparsity": 0.25}).sparsity == 0.25
    default = method.load_spec(Path(__file__).resolve().parents[1] / "configs" / "teal.yaml", {})
    assert default == teal.TealSpec(0.4, "unstructured", 16, 4)


def test_method_runs_end_to_end_and_restores(tiny_model, views, tmp_path):
    from pqk.tasks import get_task
    from pqk.tasks.dust3r.workload import make_workload

    method = get_method("teal")
    workload = make_workload(n_pairs=2, n_scenes=1, views=4, resolution=64, real_check=False)
    ctx = StepContext(teacher=tiny_model, workload=workload, out_dir=tmp_path / "step", log=lambda m: None)
    spec = method.load_spec(Path(__file__).resolve().parents[1] / "configs" / "teal.yaml",
                            {"sparsity": 0.25, "variant": "structured", "calibration_pairs": 4})
    result = method.run(copy.deepcopy(tiny_model), ctx, spec)
    details = result.details
    assert details["variant"] == "structured" and details["target"] == 0.25 and details["layers"] == 40
    assert abs(details["sparsity_calibration"]["mean"] - 0.25) < 0.05 and 0 < details["sparsity_held_out"]["mean"] < 0.5
    assert result.notes[0] == "teal structured 0.25" and result.fields == {}
    saved = json.loads((tmp_path / "step" / teal.THRESHOLDS_FILE).read_text())
    assert saved["variant"] == "structured" and saved["target"] == 0.25 and len(saved["thresholds"]) == 40
    assert method.keyparams({"sparsity": 0.25, "variant": "structured"}, result) == "s25"
    assert method.keyparams({}, None) == "u40" and method.stage(True) == "P2" and method.reference(True) == "input"

    done = {"artifact": str(result.artifact), "fields": result.fields, "device_hours": result.device_hours,
            "notes": result.notes, "details": details}
    restored = method.restore(done, tiny_model, get_task())
    for name, t in saved["thresholds"].items():
        module = restored.model.get_submodule(name)
        assert isinstance(module, teal.SparseInputLinear) and module.structured and module.input_threshold == t
    with torch.inference_mode():
        a, b = result.model(*views), restored.model(*views)
    assert torch.equal(a[0]["pts3d"], b[0]["pts3d"]) and restored.details == details


def test_cost_bills_the_calibration_passes(tiny_model):
    from types import SimpleNamespace

    calls = []

    class Costing:
        budget = 0.5
        shape = {"width": 64, "height": 48}

        def config(self, step):
            return {"calibration_pairs": 16, "held_out_pairs": 4}

        def forwards(self, step, what, model, count, width, height):
            calls.append((count, width, height))
            return what

    step = SimpleNamespace(options={})
    items, leaving = get_method("teal").cost(Costing(), step, tiny_model, "exp T")
    assert calls == [(3 * 8 + 4, 64, 48)] and leaving is tiny_model and len(items) == 1
