"""Rotate (`method: rotate`): Hadamard matrices, exact float equivalence of the transforms,
lower low-bit error than plain PTQ when activations have outlier channels, the FlatQuant fit,
save/restore, ONNX export of the transform-only model, and refused options."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import generated_pair, rel_l2

from pqk.errors import ConfigError
from pqk.methods.rotate.method import Rotate, RotateSpec, calibration_pairs, rotate_model
from pqk.methods.rotate.transforms import hadamard_like, kron_apply, kron_factors, walsh_hadamard

W, H = 96, 64
QUIET = dict(log=lambda message: None)


def _outputs(model, pair) -> list[torch.Tensor]:
    with torch.inference_mode():
        res1, res2 = model(*pair)
    return [res1["pts3d"], res1["conf"], res2["pts3d_in_other_view"], res2["conf"]]


def _max_rel(model, reference, pair) -> float:
    return max(rel_l2(a, b) for a, b in zip(_outputs(model, pair), _outputs(reference, pair)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from a second thread, and on a busy 2-core machine contended
    # OpenMP threads made the small Adam fits here up to 60x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outlier_model(tiny_model):
    """The tiny model with a few LayerNorm channels scaled x20: outlier channels in every
    LayerNorm-fed Linear's input, as trained transformers have."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) and name.split(".")[0] in ("enc_blocks", "dec_blocks", "dec_blocks2"):
                module.weight[[3, 17]] *= 20
    return model


@pytest.fixture(scope="module")
def pair():
    return generated_pair(7, W, H)  # any seed: not calibration (3,700,000+), not the workload's


def test_hadamard_matrices_are_orthonormal_and_kron_apply_is_the_kronecker_product():
    for n in (1, 2, 4, 64, 1024):
        h = walsh_hadamard(n)
        assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    for n in (3, 12, 48, 192, 768):
        h = hadamard_like(n)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12), n
    assert kron_factors(768) == (24, 32) and kron_factors(1024) == (32, 32) and kron_factors(4096) == (64, 64)
    # The Kronecker split of a power of 2 is the Walsh–Hadamard matrix itself (Sylvester).
    assert torch.allclose(torch.kron(walsh_hadamard(32), walsh_hadamard(32)), walsh_hadamard(1024))
    gen = torch.Generator().manual_seed(0)
    a, b, x = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 3), (4, 4), (5, 7, 12)))
    assert torch.allclose(kron_apply(x, a, b), x @ torch.kron(a, b))
    with pytest.raises(ValueError, match="12"):
        walsh_hadamard(12)


@pytest.mark.parametrize("transform", ["hadamard", "flatquant"])
def test_the_transform_alone_leaves_the_float_model_unchanged(tiny_model, outlier_model, pair, transform):
    # float32 throughout: orthogonal folds and online rotations change outputs by ~1e-7
    # relative (rounding only); a learned invertible P adds its conditioning. Tolerance 1e-5.
    for reference in (tiny_model, outlier_model) if transform == "hadamard" else (outlier_model,):
        model = copy.deepcopy(reference)
        spec = RotateSpec(transform=transform, bits_w=32, bits_a=32, flatquant_steps=3, calibration_tokens=64)
        details = rotate_model(model, spec, calibration_pairs(1, W, H), **QUIET)
        assert _max_rel(model, reference, pair) <= 1e-5 and details["float_rel_change"] <= 1e-5
        assert details["quantized_layers"] == 0
    if transform == "hadamard":
        # 2 encoder blocks (qkv, fc1, fc2 online; proj folded) + 2x2 decoder blocks (6 online, 2 folded).
        assert (details["online_layers"], details["folded_layers"]) == (2 * 3 + 4 * 6, 2 + 4 * 2)


@pytest.mark.parametrize("bits", [(4, 8), (4, 4)])
def test_rotation_beats_plain_ptq_at_the_same_bits_with_outlier_channels(outlier_model, pair, bits):
    errors = {}
    for transform in ("none", "hadamard"):
        model = copy.deepcopy(outlier_model)
        details = rotate_model(model, RotateSpec(transform=transform, bits_w=bits[0], bits_a=bits[1]),
                               calibration_pairs(1, W, H), **QUIET)
        assert details["quantized_layers"] == 40  # every Linear of the 2 + 2x2 blocks
        errors[transform] = _max_rel(model, outlier_model, pair)
    assert 0 < errors["hadamard"] < 0.75 * errors["none"], errors


def test_flatquant_fit_lowers_its_layer_objective(outlier_model):
    from pqk.methods.rotate.apply import block_linears
    from pqk.methods.rotate.flatquant import capture_inputs, fit_affine
    from pqk.methods.rotate.transforms import TransformedLinear

    model = copy.deepcopy(outlier_model)
    name = "enc_blocks.1.mlp.fc1"
    layer = block_linears(model)[name]
    inputs = capture_inputs(model, {name: layer}, calibration_pairs(2, W, H), tokens=96, n_pairs=2)[name]
    assert inputs.shape == (96, 64)
    fits = {init: fit_affine(inputs, layer.weight, 4, 4, init=init, steps=40, lr=0.01)
            for init in ("identity", "hadamard", "auto")}
    for init, fit in fits.items():
        assert fit.loss_after < 0.8 * fit.loss_before, (init, fit)
    assert fits["identity"].loss_before == pytest.approx(fits["identity"].loss_plain)
    # Outlier channels: the rotation is the better start, and auto takes it.
    assert fits["hadamard"].loss_before < fits["identity"].loss_before and fits["auto"].init == "hadamard"
    fit = fits["auto"]
    assert fit.loss_after < 0.5 * fit.loss_plain  # the learned transform beats plain W4A4 by far
    # Installed, the fitted transform is exact in float (P⁻¹ folded into the weight).
    with torch.no_grad():
        expected = layer(inputs)
        wrapped = TransformedLinear.build(copy.deepcopy(layer), fit.left, fit.right, fit.scale)
        assert rel_l2(wrapped(inputs), expected) < 1e-5


def _ctx(tmp_path, teacher):
    from pqk.methods.base import StepContext

    workload = SimpleNamespace(data={"width": W, "height": H}, resolution=W)
    return StepContext(teacher=teacher, workload=workload, out_dir=tmp_path / "step", **QUIET)


def test_step_result_is_saved_and_restored_to_the_same_model(tiny_model, pair, tmp_path):
    from pqk.pipeline.runner import _done_summary
    from pqk.tasks import get_task

    method = Rotate()
    spec = RotateSpec(transform="flatquant", bits_w=4, bits_a=8, calibration_pairs=1, calibration_tokens=64,
                      flatquant_steps=2)
    result = method.run(copy.deepcopy(tiny_model), _ctx(tmp_path, tiny_model), spec)
    assert result.fields == {"bits_w": 4, "bits_a": 8} and result.notes == ["rotate flatquant W4A8"]
    details = result.details
    assert details["online_layers"] == 40 and details["quantized_layers"] == 40 and details["folded_layers"] == 0
    assert details["flatquant"]["loss_after_mean"] <= details["flatquant"]["loss_before_mean"]
    assert method.keyparams({}, result) == "flatquant_W4A8"
    done = json.loads(json.dumps(_done_summary(result)))
    restored = method.restore(done, tiny_model, get_task()).model
    for a, b in zip(_outputs(restored, pair), _outputs(result.model, pair)):
        assert torch.equal(a, b)
    assert 0 < _max_rel(result.model, tiny_model, pair) < 0.5  # fake-quantized: close to, not equal to, float


def test_transform_only_model_exports_to_onnx_with_float_rotations(tiny_model, pair, tmp_path):
    from pqk.backends.onnx_export import OrtPairRunner, export_onnx
    from pqk.methods.quantize.graph import _Graph, _with_shapes
    from pqk.methods.quantize.keep import _plan

    import onnx

    model = copy.deepcopy(tiny_model)
    rotate_model(model, RotateSpec(transform="hadamard", bits_w=32, bits_a=32), calibration_pairs(1, W, H), **QUIET)
    path = export_onnx(model, tmp_path / "rotated.onnx", H, W)
    runner = OrtPairRunner(path, threads=1)
    res1, res2 = runner(*pair)
    expected = _outputs(model, pair)
    for got, want in zip((res1["pts3d"], res1["conf"], res2["pts3d_in_other_view"], res2["conf"]), expected):
        assert rel_l2(got, want) < 1e-4
    # pqk's INT8 quantizer would quantize the block Linears but leave the online rotations float.
    proto = onnx.load(str(path))
    rotations = [n.name for n in proto.graph.node if n.op_type == "MatMul" and "/transform/" in n.name]
    assert len(rotations) >= 30  # one or two products per online layer
    to_quantize = _plan(_Graph(_with_shapes(proto)), ["Softmax", "attention_scale", "LayerNorm"]).nodes_to_quantize
    assert not set(rotations) & set(to_quantize)
    assert sum("/linear/" in n for n in to_quantize) == 30  # the online layers' own Linears are still quantized


def test_load_spec_options_and_keyparams(tmp_path):
    method = Rotate()
    config = tmp_path / "rotate.yaml"
    config.write_text("transform: hadamard\nbits_w: 4\nbits_a: 8\n")
    assert method.load_spec(config, {}).bits_tag == "W4A8"
    assert method.load_spec(config, {"bits": "float"}).bits_tag == "float"
    assert method.load_spec(config, {"bits_w": 32}).bits_tag == "float"  # bits_w 32 alone: transform only
    spec = method.load_spec(config, {"transform": "none", "bits": "W4A4"})
    assert (spec.transform, spec.bits_w, spec.bits_a) == ("none", 4, 4)
    assert method.keyparams({"transform": "none", "bits_w": 4, "bits_a": 8}, None) == "none_W4A8"
    assert method.keyparams({"bits": "float"}, None) == "hadamard_float"
    assert method.stage(True) == "P2" and method.reference(True) == "input"


@pytest.mark.parametrize("bad, word", [
    ({"transform": "quarot"}, "quarot"), ({"bits_w": 5.5}, "5.5"), ({"bits_w": 9}, "9"), ({"bits_a": 1}, "1"),
    ({"bits_w": 32, "bits_a": 8}, "32"), ({"transform": "none", "bits_w": 32, "bits_a": 32}, "none"),
    ({"calibration_pairs": 0}, "0"), ({"flatquant_lr": 2}, "2"), ({"flatquant_init": "smooth"}, "smooth"),
    ({"flatquant_steps": -1}, "-1"),
])
def test_bad_values_are_refused_naming_them(bad, word):
    with pytest.raises(ConfigError, match=word) as info:
        RotateSpec(**bad)
    assert "\n" not in str(info.value)


def test_bad_step_options_and_config_keys_are_refused(tmp_path):
    method = Rotate()
    config = tmp_path / "rotate.yaml"
    config.write_text("transform: hadamard\n")
    for options, word in (({"bits": "int4"}, "int4"), ({"bits": "W9A8"}, "9"), ({"bits": "float", "bits_w": 4}, "bits_w"),
                          ({"transform": "smooth"}, "smooth")):
        with pytest.raises(ConfigError, match=word):
            method.load_spec(config, options)
    config.write_text("transform: hadamard\nrotation: random\n")
    with pytest.raises(ConfigError, match="rotation"):
        method.load_spec(config, {})


def test_only_a_transform_only_rotate_may_come_before_another_step(tmp_path):
    import yaml

    from pqk.pipeline.plan import load_plan

    def plan(bits: str):
        path = tmp_path / f"plan_{bits}.yaml"
        path.write_text(yaml.safe_dump({"name": "x", "experiments": [{"id": "RQ", "steps": [
            {"method": "rotate", "transform": "hadamard", "bits": bits}, {"method": "quantize"}]}]}))
        return load_plan(path)

    assert [s.method for s in plan("float").experiments[0].steps] == ["rotate", "quantize"]
    with pytest.raises(ConfigError, match="fake-quantized rotate .* must come last; give the step bits: float"):
        plan("W4A8")
