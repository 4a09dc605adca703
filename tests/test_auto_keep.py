"""Accuracy-driven keep-list: groups, the choice rule, probing, and PTQ honouring it."""

from __future__ import annotations

import onnx
import pytest
import torch

from pqk.backends.torch_int8 import onednn_int8_available, qdq_linear_params
from pqk.data.pair_batches import pair_example
from pqk.data.scenes import generate_scene
from pqk.methods.auto_keep import choose_float_groups, float_modules_of, layer_groups, probe_groups
from pqk.methods.quantize import QuantSpec, calibration_pairs, quantize
from pqk.models.dust3r import build_model
from pqk.tasks.dust3r.measure import scene_view

TINY = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4,
            img_size=(64, 96), landscape_only=False)
H, W = 48, 64


def test_layer_groups_are_blocks_in_network_order() -> None:
    groups = layer_groups(build_model(**TINY))
    assert list(groups) == ["enc_blocks.0", "enc_blocks.1", "decoder_embed", "dec_blocks.0", "dec_blocks.1",
                            "dec_blocks2.0", "dec_blocks2.1", "downstream_head1", "downstream_head2"]
    assert groups["enc_blocks.0"] == ["enc_blocks.0.attn.qkv", "enc_blocks.0.attn.proj", "enc_blocks.0.mlp.fc1", "enc_blocks.0.mlp.fc2"]
    assert len(groups["dec_blocks.1"]) == 8  # self-attn 2, cross-attn 4, MLP 2


def _probes(base: float, rows: dict) -> dict:
    return {"reference_delta1": 0.90, "int8_delta1": base,
            "groups": {g: {"recovered": r, "int8_gain_ms": ms, "linears": 4, "delta1": base + r} for g, (r, ms) in rows.items()}}


def test_choice_keeps_nothing_when_int8_meets_the_gate() -> None:
    assert choose_float_groups(_probes(0.895, {"a": (0.004, 5.0), "b": (0.001, 5.0)}))[0] == []


def test_choice_takes_best_recovery_per_ms_until_the_gate_is_met() -> None:
    rows = {"cheap_big": (0.010, 1.0), "costly_big": (0.012, 20.0), "tiny": (0.0005, 1.0), "slow": (0.0, -0.5)}
    chosen, reasons = choose_float_groups(_probes(0.870, rows))
    # "slow" is not faster in INT8; then cheap_big (0.0100/ms) first; 0.880 is still > 1% below
    # 0.900, so the next best ratio (costly_big 0.0006/ms vs tiny 0.0005/ms) follows.
    assert chosen == ["slow", "cheap_big", "costly_big"]
    assert "INT8 not faster" in reasons[0] and len(reasons) == 3


@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN INT8 kernels")
def test_probe_and_ptq_with_float_groups(tmp_path) -> None:
    torch.manual_seed(42)
    model = build_model(**TINY).eval()
    spec = QuantSpec(calibration={"size": 4})
    calib = calibration_pairs(spec, W, H)
    made = quantize(model, spec, calib, tmp_path / "a", H, W)
    scene = generate_scene(2_000_777, n_views=3, width=W, height=H)
    examples = [pair_example(scene, 0, 1), pair_example(scene, 1, 2)]
    probes = probe_groups(model, made["onnx_int8"], examples, (scene_view(scene, 0), scene_view(scene, 1)),
                          rounds=2, log=lambda _m: None)
    assert set(probes["groups"]) == set(layer_groups(model))
    assert all(set(row) == {"linears", "delta1", "recovered", "int8_gain_ms"} for row in probes["groups"].values())
    keep = ["enc_blocks.1", "downstream_head2"]
    again = quantize(model, spec, calib, tmp_path / "b", H, W, float_modules=float_modules_of(model, keep), name="k.onnx")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = set(qdq_linear_params(again["onnx_int8"], linears))
    assert quantized == linears - set(float_modules_of(model, keep))
    assert again["summary"]["excluded_nodes"]["float_modules"] == 5  # 4 encoder Linears + the head's
    names = {n.name for n in onnx.load(str(again["onnx_int8"])).graph.node if n.op_type == "Gemm"}
    assert any("enc_blocks.1" in n for n in names)  # still there, in float
