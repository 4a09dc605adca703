"""Joint PQK: the mask schedule, masks equal removal, fake quantization calibrated in the run,
the INT8 export agreeing with the trained model, and a plan's joint experiment end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_KWARGS, generated_pair, rel_l2
from pqk.errors import ConfigError
from pqk.methods.distill import DistillSpec
from pqk.methods.joint import (
    JointSpec,
    calibrate_fake_quant,
    cubic_share,
    grow_masks,
    load_joint_spec,
    magnitude_scores,
    masked_indices,
    prepare_joint,
    settle,
    train_joint,
    uint8_range_params,
)
from pqk.methods.prune import PruneSpec
from pqk.methods.qat import activation_ranges, fake_quant_modules, set_fake_quant
from pqk.methods.quantize import QuantSpec
from pqk.models.dust3r import build_model, count_parameters

H, W = 48, 64
TRAIN = dict(epochs=2, steps_per_epoch=3, batch_size=2, lr=1e-3, warmup_steps=1, width=W, height=H, n_scenes=2,
             views_per_scene=4, window=2, val_scenes=1, val_pairs=2, patience=None, checkpoint_every=1)


def _spec(rho: float = 0.3, **kw) -> JointSpec:
    return JointSpec(distill=DistillSpec(T=3, beta=0.5, train=dict(TRAIN)), prune=PruneSpec(rho=rho, allocation="uniform"),
                     quant=QuantSpec(calibration={"size": 4}), **kw)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(42)
    return build_model(**TINY_KWARGS).eval()


def _views(seed: int = 11) -> tuple[dict, dict]:
    return generated_pair(seed, W, H)


def test_cubic_schedule_ramps_then_settles() -> None:
    shares = [cubic_share(p / 100, 0.5, 4) for p in range(101)]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares[50] == 1.0
    assert all(b >= a for a, b in zip(shares, shares[1:]))
    assert sorted(set(shares)) == [0.0, 1 - 0.75**3, 1 - 0.5**3, 1 - 0.25**3, 1.0]  # 4 updates, cubic


def test_spec_checks_and_exp_id() -> None:
    assert _spec(0.1).keyparams() == "joint_r010_K1"
    assert _spec(prune_until=0.5).prune.allocation == "uniform"
    with pytest.raises(ConfigError, match="prune_until"):
        _spec(prune_until=0.8, fake_quant_from=0.6)
    with pytest.raises(ConfigError, match="mask_updates"):
        _spec(mask_updates=0)
    spec = load_joint_spec(Path("configs/joint.yaml"))
    assert spec.rho == 0.1 and spec.distill_run == "K-1" and spec.quant.bits_w == 8
    assert load_joint_spec(Path("configs/joint.yaml"), run="K-2", rho=0.3).keyparams() == "joint_r030_K2"
    with pytest.raises(ConfigError, match="control"):
        load_joint_spec(Path("configs/joint.yaml"), run="control")


def test_masks_grow_by_magnitude_and_equal_removal() -> None:
    student, units, final = prepare_joint(_teacher(), _spec(0.3))
    assert sum(final.values()) > 0
    ffn = next(u for u in units if u.kind == "ffn")
    smallest = sorted(range(ffn.count), key=lambda i: float(magnitude_scores(student, ffn)[i]))[: final[ffn.name] // 2]
    grow_masks(student, units, final, 0.5)
    assert set(smallest) <= set(masked_indices(student, ffn))
    half = {u.name: masked_indices(student, u) for u in units}
    grow_masks(student, units, final, 1.0)
    for u in units:  # masks only grow, to the allocation
        assert set(half[u.name]) <= set(masked_indices(student, u)) and len(masked_indices(student, u)) == final[u.name]
    view1, view2 = _views()
    student.eval()
    with torch.no_grad():
        ref1, ref2 = student(view1, view2)  # fake quantization still off
    pruned, counts, _ = settle(student, units)
    assert counts == final and count_parameters(pruned) < count_parameters(student)
    with torch.no_grad():
        out1, out2 = pruned(view1, view2)
    torch.testing.assert_close(out1["pts3d"], ref1["pts3d"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out2["pts3d_in_other_view"], ref2["pts3d_in_other_view"], atol=1e-4, rtol=1e-4)


def test_calibration_sets_the_uint8_grid_of_each_linear_input() -> None:
    assert uint8_range_params(-1.0, 3.0) == (pytest.approx(4 / 255), 64)
    assert uint8_range_params(0.5, 2.0)[1] == 0  # widened to hold 0
    student, units, final = prepare_joint(_teacher(), _spec(0.3))
    grow_masks(student, units, final, 1.0)
    seen = calibrate_fake_quant(student, [_views(3), _views(4)])
    modules = fake_quant_modules(student)
    assert set(seen) == set(modules) and all(bool(m.enabled) for m in modules.values())
    for name, (low, high) in activation_ranges(student).items():  # the export's range is the observed one
        step = float(modules[name].input_scale)  # up to the zero point's rounding
        assert abs(low - min(seen[name][0], 0.0)) <= step and abs(high - max(seen[name][1], 0.0)) <= step


def test_joint_run_trains_settles_and_exports_an_int8_model_that_matches(tmp_path) -> None:
    from pqk.backends.onnx_export import OrtPairRunner
    from pqk.methods.qat import export_with_ranges
    from pqk.methods.quantize import calibration_pairs
    from pqk.methods.joint import install_fake_quant

    spec = _spec(0.3)
    outcome = train_joint(_teacher(), spec, tmp_path / "train", W, H, show_progress=False, log=lambda _m: None)
    events = [e["event"] for e in outcome.events]
    assert "fake_quant_on" in events and events.index("fake_quant_on") > max(i for i, e in enumerate(events) if e == "masks")
    assert outcome.stats["rho_achieved"] == pytest.approx(0.3, abs=0.05)
    assert outcome.stats["params_after"] < outcome.stats["params_student"]
    assert (tmp_path / "train" / "last.pth").is_file()
    # The INT8 file holds the trained ranges: ONNX Runtime ~ the pruned model fake-quantized in PyTorch.
    exported = export_with_ranges(outcome.model, outcome.ranges, spec.quant, calibration_pairs(spec.quant, W, H),
                                  tmp_path, H, W, name="joint_int8.onnx")
    fq = outcome.model.__class__(outcome.model.config)
    fq.load_state_dict(outcome.model.state_dict())
    install_fake_quant(fq)
    for name, module in fake_quant_modules(fq).items():
        scale, zp = uint8_range_params(*outcome.ranges[name])
        module.input_scale.fill_(scale)
        module.input_zero_point.fill_(zp)
    set_fake_quant(fq, True)
    view1, view2 = _views(5)
    with torch.no_grad():
        ref1, _ = fq.eval()(view1, view2)
    res1, _ = OrtPairRunner(exported["onnx_int8"])(view1, view2)
    assert rel_l2(res1["pts3d"], ref1["pts3d"]) < 0.02


def test_plan_with_joint_pqk(tmp_path) -> None:
    from pqk.models.dust3r import save_model
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    root = tmp_path
    save_model(_teacher(), root / "teacher.safetensors")
    w = make_workload(n_pairs=2, n_scenes=1, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride, w.scene_level = 5, 2, []
    save_workload(w, root / "workload.yaml")
    (root / "distill.yaml").write_text(yaml.safe_dump({"train": TRAIN, "runs": {"K-1": {"T": 3, "beta": 0.5}}}))
    (root / "quant.yaml").write_text(yaml.safe_dump({"calibration": {"size": 4}}))
    (root / "prune.yaml").write_text(yaml.safe_dump({"allocation": "uniform"}))
    (root / "joint.yaml").write_text(yaml.safe_dump({"distill": {"config": "distill.yaml", "run": "K-1"},
                                                     "prune": {"config": "prune.yaml", "rho": 0.3},
                                                     "quantize": {"config": "quant.yaml"}}))
    plan = {"name": "tinyjoint", "teacher": "teacher.safetensors", "workload": "workload.yaml", "gate_policy": "record",
            "experiments": [{"id": "baseline", "steps": []},
                            {"id": "PQK", "steps": [{"method": "joint", "config": "joint.yaml", "runtimes": "onnxruntime"}]}]}
    (root / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pqk", "run", str(root / "plan.yaml"), "--out", str(root / "runs"), "--repeats", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "runs" / "tinyjoint"
    rows = {r["exp_id"]: r for r in csv.DictReader((run_dir / "result_table.csv").open())}
    assert {"P0_teacher_run1", "PQK_joint_r030_K1_run1", "PQK_joint_r030_K1_FP32_run1"} == set(rows)
    joint = rows["PQK_joint_r030_K1_run1"]
    assert joint["combo"] == "PQK" and joint["rho"] == "0.3" and joint["T"] == "3.0" and joint["bits_w"] == "8"
    assert float(joint["params_M"]) < float(rows["P0_teacher_run1"]["params_M"])
    fp32 = rows["PQK_joint_r030_K1_FP32_run1"]
    assert fp32["rho"] == "0.3" and fp32["bits_w"] == "32" and fp32["params_M"] == joint["params_M"]
    details = json.loads((run_dir / "PQK_joint_r030_K1_run1_eval.json").read_text())["details"]
    assert details["gate"]["stage"] == "P3" and details["gate"]["reference"] == "PQK_joint_r030_K1_FP32_run1"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "cached" in again.stderr and "measured before" in again.stderr


def test_a_killed_joint_run_resumes_to_the_same_model(tmp_path) -> None:
    """Masks and fake-quant ranges live in the checkpoints: kill after the masks settled and
    the ranges were calibrated, rerun, and the settled model is the uninterrupted one."""
    spec = _spec(0.3)
    full = train_joint(_teacher(), spec, tmp_path / "full", W, H, show_progress=False, log=lambda _m: None)

    class Killed(Exception):
        pass

    def die(step: int, _logs: dict) -> None:
        if step == 5:  # of 6: past the last mask update (step 3) and the fake-quant onset (step 5)
            raise Killed

    with pytest.raises(Killed):
        train_joint(_teacher(), spec, tmp_path / "killed", W, H, show_progress=False, log=lambda _m: None, on_step=die)
    resumed = train_joint(_teacher(), spec, tmp_path / "killed", W, H, show_progress=False, log=lambda _m: None)
    assert resumed.counts == full.counts and resumed.ranges == full.ranges
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
