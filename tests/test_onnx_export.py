"""ONNX export of the tiny DUSt3R (linear and DPT heads) must match torch under ONNX Runtime."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pqk.backends import onnx_export
from pqk.backends.onnx_export import OUTPUT_NAMES, OrtPairRunner, compare_with_torch, export_onnx
from pqk.errors import InputError
from pqk.models.dust3r import build_model

TINY = dict(
    enc_embed_dim=64,
    enc_depth=2,
    enc_num_heads=4,
    dec_embed_dim=48,
    dec_depth=2,
    dec_num_heads=4,
    img_size=(64, 96),
    landscape_only=False,
)
TOL = 1e-4


def _model(**extra: object) -> torch.nn.Module:
    torch.manual_seed(42)
    return build_model(**{**TINY, **extra}).eval()


def _view(height: int, width: int, seed: int, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
    return {"img": img, "true_shape": torch.tensor([[height, width]] * batch, dtype=torch.int32)}


def _assert_close(report: dict[str, float]) -> None:
    for name in OUTPUT_NAMES:
        assert report[f"{name}_rel_l2"] <= TOL, report
    assert report["max_rel_l2"] <= TOL


# Exports are the slow part (the tiny DPT has ~39M parameters): one per model and shape,
# shared by every test in the module.


@pytest.fixture(scope="module")
def linear_model() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def dpt_model() -> torch.nn.Module:
    return _model(head_type="dpt", dec_depth=10)


@pytest.fixture(scope="module")
def linear_onnx(linear_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(linear_model, tmp_path_factory.mktemp("linear") / "linear.onnx", 64, 96)


@pytest.fixture(scope="module")
def dpt_onnx(dpt_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The one DPT export is a mixed-orientation pair (landscape view 1, portrait view 2):
    # it covers the DPT head on both grid orientations, and the same-shape (batched
    # encoder) path is head-independent and covered by the linear export.
    return export_onnx(dpt_model, tmp_path_factory.mktemp("dpt") / "dpt.onnx", 64, 96, height2=96, width2=64)


@pytest.fixture(scope="module")
def linear_runner(linear_onnx: Path) -> OrtPairRunner:
    return OrtPairRunner(linear_onnx, threads=2)


@pytest.fixture(scope="module")
def dpt_runner(dpt_onnx: Path) -> OrtPairRunner:
    return OrtPairRunner(dpt_onnx, threads=2)


SHAPES = {"linear": ((64, 96), (64, 96)), "dpt": ((64, 96), (96, 64))}


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_ort_matches_torch(head: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(f"{head}_model")
    runner = request.getfixturevalue(f"{head}_runner")
    (h1, w1), (h2, w2) = SHAPES[head]
    view1, view2 = _view(h1, w1, seed=1), _view(h2, w2, seed=2)
    _assert_close(compare_with_torch(model, runner, view1, view2))

    with torch.no_grad():
        ref1, ref2 = model(view1, view2)
    got1, got2 = runner(view1, view2)
    assert set(got1) == set(ref1) and set(got2) == set(ref2)
    for got, ref in ((got1, ref1), (got2, ref2)):
        for key in ref:
            assert isinstance(got[key], torch.Tensor) and got[key].dtype == torch.float32
            assert got[key].shape == ref[key].shape
    assert got1["pts3d"].shape == (1, h1, w1, 3) and got1["conf"].shape == (1, h1, w1)
    assert got2["pts3d_in_other_view"].shape == (1, h2, w2, 3) and got2["conf"].shape == (1, h2, w2)


def test_mixed_orientation_metadata(dpt_runner: OrtPairRunner) -> None:
    runner = dpt_runner
    assert runner.input_shapes == ((1, 3, 64, 96), (1, 3, 96, 64))
    assert json.loads(runner.metadata["dust3r_kwargs"])["head_type"] == "dpt"
    with pytest.raises(InputError, match=r"1×3×64×96 \(view 1\) and 1×3×96×64 \(view 2\)"):
        runner(_view(64, 96, 0), _view(64, 96, 1))


def test_linear_batch_of_two(linear_model: torch.nn.Module, tmp_path: Path) -> None:
    path = export_onnx(linear_model, tmp_path / "b2.onnx", 64, 96, batch=2)
    _assert_close(compare_with_torch(linear_model, path, _view(64, 96, 5, batch=2), _view(64, 96, 6, batch=2)))


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_file_is_valid_and_described(head: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(f"{head}_model")
    path = request.getfixturevalue(f"{head}_onnx")
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    opset = {o.domain: o.version for o in proto.opset_import}
    assert opset[""] >= 17
    assert proto.ir_version <= onnx_export.MAX_IR_VERSION
    assert [i.name for i in proto.graph.input] == ["img1", "img2"]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer if t.dims)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["pqk_version"]
    assert json.loads(meta["dust3r_kwargs"]) == model.config.to_kwargs()
    (h1, w1), (h2, w2) = SHAPES[head]
    assert json.loads(meta["input_shapes"]) == {"img1": [1, 3, h1, w1], "img2": [1, 3, h2, w2]}
    # The atomic write leaves nothing but the model behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    "height, width, message",
    [(60, 96, "height .* got 60"), (64, 0, "width .* got 0"), (-16, 96, "height .* got -16")],
)
def test_bad_size_raises(linear_model: torch.nn.Module, tmp_path: Path, height: int, width: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        export_onnx(linear_model, tmp_path / "bad.onnx", height, width)
    assert not list(tmp_path.iterdir())


def test_runner_rejects_other_shapes(linear_runner: OrtPairRunner) -> None:
    runner = linear_runner
    with pytest.raises(InputError, match=r"exported for 1×3×64×96 inputs; got 1×3×96×128 .*--height/--width"):
        runner(_view(96, 128, 0), _view(96, 128, 1))
    with pytest.raises(InputError, match="--batch"):
        runner(_view(64, 96, 0, batch=2), _view(64, 96, 1, batch=2))
    view = _view(64, 96, 0)
    view["true_shape"] = torch.tensor([[96, 64]])
    with pytest.raises(InputError, match="true_shape"):
        runner(view, _view(64, 96, 1))
    pixels = {"img": np.zeros((1, 3, 64, 96), dtype=np.uint8)}
    with pytest.raises(InputError, match="view 2: img must be float"):
        runner(_view(64, 96, 0), pixels)


def test_runner_accepts_numpy(linear_runner: OrtPairRunner) -> None:
    runner = linear_runner
    view1, view2 = _view(64, 96, 7), _view(64, 96, 8)
    as_np = [{"img": v["img"].numpy()} for v in (view1, view2)]
    from_torch, from_np = runner(view1, view2), runner(*as_np)
    for a, b in zip(from_torch, from_np):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_large_models_write_external_data(
    linear_model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.onnx"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    export_onnx(linear_model, path, 64, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx.data").stat().st_mode == path.stat().st_mode
    view1, view2 = _view(64, 96, 9), _view(64, 96, 10)
    _assert_close(compare_with_torch(linear_model, path, view1, view2))
    # A small re-export to the same name must not leave the old weights behind.
    monkeypatch.undo()
    export_onnx(linear_model, path, 64, 96)
    assert [p.name for p in tmp_path.iterdir()] == ["big.onnx"]
    _assert_close(compare_with_torch(linear_model, path, view1, view2))


def test_half_model_exports_float32_and_is_left_unchanged(tmp_path: Path) -> None:
    half = _model().half().train()
    path = export_onnx(half, tmp_path / "half.onnx", 64, 96)
    assert half.training and next(half.parameters()).dtype == torch.float16
    proto = onnx.load(str(path))
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer if t.dims)
    assert np.isfinite(OrtPairRunner(path)(_view(64, 96, 0), _view(64, 96, 1))[0]["conf"].numpy()).all()


def test_expm1_stays_accurate_for_short_rays(tmp_path: Path) -> None:
    # pts3d = v/|v| * expm1(|v|): exp(x) - 1 would lose every digit for |v| ~ 1e-6.
    class Expm1(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.expm1(x)

    x = torch.tensor([0.0, 1e-30, 1e-6, -1e-6, 1e-3, 0.5, 3.0, 88.5, 100.0, -200.0, float("nan")])
    path = tmp_path / "expm1.onnx"
    with onnx_export._expm1_registered(17), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Expm1(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, torch.expm1(x).numpy(), rtol=1e-6, atol=0, equal_nan=True)


def test_ir_version_lowered_for_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 14  # what onnx 1.23 writes by default
    onnx_export.lower_ir_version(proto)
    assert proto.ir_version == onnx_export.MAX_IR_VERSION
    path = tmp_path / "id.onnx"
    onnx.save(proto, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_runner_rejects_unloadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        OrtPairRunner(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot load"):
        OrtPairRunner(garbage)
