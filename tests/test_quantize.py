"""Q-only PTQ: the spec, the calibration set, and the QDQ graph it produces for a tiny DUSt3R."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pqk.backends.onnx_export import (
    MAX_IR_VERSION,
    OUTPUT_NAMES,
    OrtPairRunner,
    ShapeRoutedRunner,
    shape_variants,
)
from pqk.data.images import normalize_array
from pqk.data.scenes import generate_scene
from pqk.errors import ConfigError, InputError
from pqk.methods.quantize import (
    CALIBRATION_SEED_MIN,
    KEEP_KINDS,
    PairCalibrationReader,
    QuantSpec,
    calibration_pairs,
    calibration_seeds,
    inspect_qdq,
    keep_list_node_names,
    load_quant_spec,
    quantize,
    quantize_ptq,
)
from pqk.models.dust3r import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
    dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
    img_size=(64, 96), landscape_only=False,
)
H, W = 64, 96
CALIB = 4
# Observed on this tiny random-weight model: 0.06 for the pointmaps, 0.01 for the confidences.
# Calibrating on raw 0..255 pixels (ranges all wrong) gives 0.23-1.5, so the bound catches
# broken scales while leaving room for the poor quantizability of random weights.
MAX_REL_L2 = 0.2


def _spec(**kw: object) -> QuantSpec:
    return QuantSpec(calibration={"size": CALIB}, **kw)


# --- the spec -------------------------------------------------------------------------------


def test_shipped_config_is_the_protocol_default() -> None:
    spec = load_quant_spec(REPO / "configs" / "quant.yaml")
    assert spec == QuantSpec()
    assert (spec.bits_w, spec.bits_a, spec.per_channel, spec.activation_symmetric) == (8, 8, True, False)
    assert spec.keep_list == list(KEEP_KINDS)
    assert (spec.calibration.size, spec.calibration.method) == (512, "minmax")
    assert spec.to_record_fields() == {"bits_w": 8, "bits_a": 8, "keep_list": "Softmax+attention_scale+LayerNorm"}


def test_keep_list_is_canonicalised() -> None:
    spec = _spec(keep_list=["layernorm", "Softmax", "LayerNorm"])
    assert spec.keep_list == ["LayerNorm", "Softmax"]
    assert _spec(keep_list=[]).to_record_fields()["keep_list"] == "none"


@pytest.mark.parametrize(
    "text, match",
    [
        ("bits_w: 4", "bits_w: 4 is not supported"),
        ("bits_a: 16", "bits_a: 16 is not supported"),
        ("keep_list: [Softmax, GELU]", "unknown operator kind 'GELU'; accepted: Softmax, attention_scale, LayerNorm"),
        ("calibration: {method: kl}", "unknown method 'kl'; accepted: minmax, percentile, entropy"),
        ("calibration: {size: 0}", "calibration.size"),
        ("weights: per_group", "weights: unknown mode"),
        ("keeplist: [Softmax]", "unknown key"),
        ("calibration_seed_base: 42", "calibration_seed_base"),
        ("bits_w: [8", "not valid YAML"),
    ],
)
def test_bad_spec_is_a_config_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "quant.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        load_quant_spec(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_quant_spec(tmp_path / "nope.yaml")


# --- the calibration set --------------------------------------------------------------------


def test_calibration_pairs_are_deterministic_and_never_evaluation_scenes() -> None:
    spec = QuantSpec(calibration={"size": 5})
    a = calibration_pairs(spec, W, H, n_views=3)
    b = calibration_pairs(spec, W, H, n_views=3)
    assert len(a) == 5
    for (a1, a2), (b1, b2) in zip(a, b):
        assert a1.shape == a2.shape == (1, 3, H, W) and a1.dtype == np.float32
        assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
        assert -1.0 <= a1.min() and a1.max() <= 1.0
    assert not np.array_equal(a[0][0], a[0][1])  # two different views
    seeds = calibration_seeds(spec, n_views=3)
    assert seeds == [CALIBRATION_SEED_MIN + k for k in range(3)]  # 2 neighbour pairs per scene
    # Evaluation workloads (42..46), the teacher's training (1e6..) and validation (2e6..) seeds.
    assert not set(seeds) & set(range(42, 47))
    assert min(seeds) >= 3_000_000


def test_reader_feeds_named_inputs_and_ranges() -> None:
    pairs = [(np.full((1, 3, 2, 2), k, np.float32), np.zeros((1, 3, 2, 2), np.float32)) for k in range(5)]
    reader = PairCalibrationReader(pairs)
    assert len(reader) == 5
    assert [int(d["img1"][0, 0, 0, 0]) for d in reader] == [0, 1, 2, 3, 4]
    reader.set_range(3, 10)
    assert [sorted(d) for d in reader] == [["img1", "img2"]] * 2


# --- the attention-scale pattern on hand-built graphs ---------------------------------------


def _attention_graph(scale_after_product: bool) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    c = helper.make_tensor("c", f, [], [0.125])
    w = helper.make_tensor("w", f, [8, 8], np.ones(64, np.float32))
    if scale_after_product:
        nodes = [
            helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
            helper.make_node("Div", ["s", "c"], ["ss"], name="scale"),
        ]
    else:
        nodes = [
            helper.make_node("Mul", ["q", "c"], ["qs"], name="scale_q"),
            helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 2, 1]),
            helper.make_node("Mul", ["kt", "c"], ["kts"], name="scale_k"),
            helper.make_node("MatMul", ["qs", "kts"], ["ss"], name="qk"),
        ]
    nodes += [
        helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        # A Softmax over a Linear's output divided by a temperature is not attention.
        helper.make_node("MatMul", ["p", "w"], ["logits"], name="head"),
        helper.make_node("Div", ["logits", "c"], ["z"], name="temperature"),
        helper.make_node("Softmax", ["z"], ["y"], name="classifier", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        [helper.make_tensor_value_info(n, f, [1, 8, 8]) for n in ("q", "k")],
        [helper.make_tensor_value_info("y", f, [1, 8, 8])],
        initializer=[c, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("after, scales", [(True, {"scale"}), (False, {"scale_q", "scale_k"})])
def test_attention_scale_found_before_or_after_the_product(after: bool, scales: set[str]) -> None:
    names = set(keep_list_node_names(_attention_graph(after), ["attention_scale"]))
    assert names == scales | {"qk"}  # plus the activation-only MatMul, always kept


# --- PTQ of the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(42)
    return build_model(**TINY).eval()


@pytest.fixture(scope="module")
def calib() -> list:
    return calibration_pairs(_spec(), W, H)


@pytest.fixture(scope="module")
def ptq(tiny: torch.nn.Module, calib: list, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return quantize(tiny, _spec(), calib, tmp_path_factory.mktemp("ptq"), H, W)


@pytest.fixture(scope="module")
def fp32_graph(ptq: dict) -> onnx.ModelProto:
    return onnx.load(str(ptq["onnx_fp32"]))


@pytest.fixture(scope="module")
def int8_graph(ptq: dict) -> onnx.ModelProto:
    return onnx.load(str(ptq["onnx_int8"]))


def _count(proto: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in proto.graph.node)


def _n_linear(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_quantize_writes_both_files_and_a_summary(
    ptq: dict, fp32_graph: onnx.ModelProto, int8_graph: onnx.ModelProto
) -> None:
    assert ptq["onnx_int8"].name == "ptq_int8.onnx" and ptq["onnx_int8"].is_file()
    assert ptq["record_fields"] == {"bits_w": 8, "bits_a": 8, "keep_list": "Softmax+attention_scale+LayerNorm"}
    summary = ptq["summary"]
    n_softmax = _count(fp32_graph, "Softmax")
    assert summary["excluded_nodes"] == {
        "Softmax": n_softmax,
        "attention_scale": 2 * n_softmax,  # q and kᵀ are scaled separately
        # ORT's pre-processing merges LayerNorms that compute the same thing (in a fresh
        # model every LayerNorm is the identity affine map, so two on one input coincide).
        "LayerNorm": _count(int8_graph, "LayerNormalization"),
        "activation_matmul": 2 * n_softmax,
    }
    # Each Linear is a Gemm (MatMul + bias fused); the patch Conv's output Q/DQ feeds a Reshape.
    assert summary["quantized_nodes"] == {"Conv": 1, "Gemm": _count(int8_graph, "Gemm"), "Reshape": 1}
    assert summary["size_int8_bytes"] < 0.5 * summary["size_fp32_bytes"]
    assert summary["calibration"]["pairs"] == CALIB and summary["notes"] == []
    assert int8_graph.ir_version <= MAX_IR_VERSION
    assert [(o.domain, o.version) for o in int8_graph.opset_import] == [("", 17)]  # standard ops only
    assert "pqk_quant" in {p.key for p in int8_graph.metadata_props}


def test_linear_weights_are_int8_per_output_channel(ptq: dict, tiny: torch.nn.Module) -> None:
    report = inspect_qdq(ptq["onnx_int8"])
    weights = [w for w in report["weights"].values() if w["role"] == "weight"]
    linear = [w for w in weights if w["consumer_op"] == "Gemm"]
    # Every nn.Linear (decoder_embed serves both views with one weight) and the patch Conv.
    assert len(linear) == _n_linear(tiny)
    assert len(weights) == len(linear) + 1
    for w in weights:
        # Gemm B is (in, out) (transB = 0), a Conv weight (out, in, kh, kw).
        out_axis = 1 if w["consumer_op"] == "Gemm" else 0
        assert w["dtype"] == "int8" and w["per_channel"], w
        assert w["axis"] == out_axis and w["scale_len"] == w["shape"][out_axis], w
    biases = [w for w in report["weights"].values() if w["role"] == "bias"]
    assert biases and all(w["dtype"] == "int32" for w in biases)


def test_onnx_runtime_runs_the_layers_on_int8_kernels(ptq: dict, int8_graph: onnx.ModelProto) -> None:
    # The whole point of the QDQ file: ORT's CPU provider fuses DQ -> Gemm into QGemm. In the
    # MatMul + Add form it would fuse MatMul + Add into a float Gemm first and run in float.
    assert ptq["summary"]["ort_cpu_kernels"] == {
        "int8": {"QGemm": _count(int8_graph, "Gemm"), "QLinearConv": 1},
        "float_weighted": 0,
    }


def test_keep_list_ops_stay_float(ptq: dict, fp32_graph: onnx.ModelProto, int8_graph: onnx.ModelProto) -> None:
    report = inspect_qdq(ptq["onnx_int8"])
    for op in ("Softmax", "LayerNormalization"):
        assert op not in report["quantized"]
        assert len(report["float"][op]) == _count(int8_graph, op) > 0
    n_softmax = _count(fp32_graph, "Softmax")
    scales = set(keep_list_node_names(fp32_graph, ["attention_scale"])) - set(report["float"]["MatMul"])
    assert len(scales) == 2 * n_softmax
    assert scales <= set(report["float"]["Mul"])
    # q·kᵀ and attn·v: activation-only MatMuls stay float too.
    assert len(report["float"]["MatMul"]) == _count(int8_graph, "MatMul") == 2 * n_softmax


@pytest.mark.parametrize("dropped, op", [("LayerNorm", "LayerNormalization"), ("Softmax", "Softmax")])
def test_dropping_a_kind_from_the_keep_list_quantizes_it(
    dropped: str, op: str, ptq: dict, calib: list, tmp_path: Path
) -> None:
    keep = [k for k in KEEP_KINDS if k != dropped]
    summary = quantize_ptq(ptq["onnx_fp32"], tmp_path / "ablation.onnx", _spec(keep_list=keep), calib)
    base, ablation = inspect_qdq(ptq["onnx_int8"]), inspect_qdq(tmp_path / "ablation.onnx")
    assert op not in base["quantized"] and op not in ablation["float"]
    assert len(ablation["quantized"][op]) == len(base["float"][op])
    assert summary["quantized_kinds"] == {dropped: len(base["float"][op])}
    assert dropped not in summary["excluded_nodes"]


def test_int8_model_runs_in_ort_close_to_fp32(ptq: dict) -> None:
    # An evaluation scene (seed 42), never seen in calibration.
    scene = generate_scene(42, n_views=2, width=W, height=H)
    view1, view2 = ({"img": normalize_array(v.img).unsqueeze(0)} for v in scene.views)
    ref = OrtPairRunner(ptq["onnx_fp32"], threads=1)(view1, view2)
    got = OrtPairRunner(ptq["onnx_int8"], threads=1)(view1, view2)
    errors = {}
    for name, (r, g) in zip(OUTPUT_NAMES, [(ref[0]["pts3d"], got[0]["pts3d"]), (ref[0]["conf"], got[0]["conf"]),
                                           (ref[1]["pts3d_in_other_view"], got[1]["pts3d_in_other_view"]),
                                           (ref[1]["conf"], got[1]["conf"])]):
        assert torch.isfinite(g).all()
        errors[name] = ((g - r).norm() / r.norm()).item()
    assert max(errors.values()) < MAX_REL_L2, errors
    assert min(errors.values()) > 0  # really quantized


def _scales(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith(("_scale", "_zero_point"))}


def _views(height: int, width: int) -> tuple[dict, dict]:
    scene = generate_scene(42, n_views=2, width=width, height=height)
    return tuple({"img": normalize_array(v.img).unsqueeze(0)} for v in scene.views)  # type: ignore[return-value]


def test_other_shapes_are_the_same_quantized_model_in_their_own_static_files(
    tiny: torch.nn.Module, calib: list, ptq: dict, tmp_path: Path
) -> None:
    # The workload's real photographs are 512x336 while its generated views are 512x384: the
    # deployed model must run both, with the scales calibrated once.
    other = ((48, 96), (48, 96))
    result = quantize(tiny, _spec(), calib, tmp_path, H, W, other_shapes=[other])
    variant = tmp_path / "ptq_int8.48x96.onnx"
    assert result["summary"]["shape_variants"] == [variant.name]
    assert shape_variants(result["onnx_int8"]) == {other: variant}
    main_scales, variant_scales = _scales(result["onnx_int8"]), _scales(variant)
    assert len(main_scales) > 20 and main_scales.keys() == variant_scales.keys()
    assert all(np.array_equal(main_scales[k], variant_scales[k]) for k in main_scales)
    # The same ranges as a file quantized without variants: calibration did not change.
    assert all(np.array_equal(v, _scales(ptq["onnx_int8"])[k]) for k, v in main_scales.items())

    runner = ShapeRoutedRunner(result["onnx_int8"], lambda path: OrtPairRunner(path, threads=1))
    view1, view2 = _views(48, 96)
    assert runner.supports(view1, view2) and runner.supports(*_views(H, W))
    got = runner(view1, view2)
    ref = OrtPairRunner(tmp_path / "model_fp32.48x96.onnx", threads=1)(view1, view2)
    err = ((got[0]["pts3d"] - ref[0]["pts3d"]).norm() / ref[0]["pts3d"].norm()).item()
    assert 0 < err < MAX_REL_L2
    assert set(runner.runners) == {((H, W), (H, W)), other}  # opened on first use
    # A shape with no file is not supported, and running it names the shapes the model takes.
    odd = _views(32, 96)
    assert not runner.supports(*odd)
    with pytest.raises(InputError, match="exported for"):
        runner(*odd)


def test_bad_calibration_data(ptq: dict, calib: list, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    with pytest.raises(InputError, match="no calibration data"):
        quantize_ptq(ptq["onnx_fp32"], out, _spec(), [])
    with pytest.raises(InputError, match="exported for"):
        quantize_ptq(ptq["onnx_fp32"], out, _spec(), [(a[..., :32], b[..., :32]) for a, b in calib])
    with pytest.raises(InputError, match=r"normalized to \[-1, 1\]"):
        quantize_ptq(ptq["onnx_fp32"], out, _spec(), [(a * 127.5 + 127.5, b) for a, b in calib])
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_short_calibration_set_warns_and_is_recorded(ptq: dict, calib: list, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="calibration used 2 pairs, fewer than the 4"):
        summary = quantize_ptq(ptq["onnx_fp32"], tmp_path / "q.onnx", _spec(), calib[:2])
    assert summary["calibration"] == {**summary["calibration"], "pairs": 2, "asked": CALIB}
    assert summary["notes"]


def _activation_scales(path: Path) -> dict[str, float]:
    proto = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.input[0]: float(init[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}


def test_percentile_calibration_clips_ranges(ptq: dict, calib: list, tmp_path: Path) -> None:
    spec = QuantSpec(calibration={"size": CALIB, "method": "percentile", "percentile": 99.0})
    quantize_ptq(ptq["onnx_fp32"], tmp_path / "p.onnx", spec, calib)
    minmax, pct = _activation_scales(ptq["onnx_int8"]), _activation_scales(tmp_path / "p.onnx")
    assert minmax.keys() == pct.keys()
    assert all(pct[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    assert sum(pct[k] < 0.9 * minmax[k] for k in minmax) > len(minmax) // 2
