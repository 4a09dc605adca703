"""K-only distillation: the student derivation (structure, inheritance, rounding, loadable,
exportable), the loss pieces, the step, the grid config and `pqk distill` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_KWARGS
from pqk.errors import ConfigError, InputError
from pqk.methods.distill import (
    DistillLoss, DistillSpec, channel_kl, derive_student, distill, distill_step, evenly_spaced, kept_depth, kept_heads,
    kept_hidden, load_distill_config, output_maps,
)
from pqk.models.dust3r import build_model, count_parameters, load_checkpoint, save_model
from pqk.train.trainer import TrainSpec

# Deep enough for the cuts to show: 6 encoder and 4 decoder layers, like the embedded teacher.
TEACHER_KWARGS = {**TINY_KWARGS, "enc_depth": 6, "dec_depth": 4}
TINY_TRAIN = dict(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-3, warmup_steps=1, width=64, height=48,
                  n_scenes=2, views_per_scene=4, val_scenes=1, val_pairs=2, patience=None)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(42)
    return build_model(**TEACHER_KWARGS).eval()


def _pair(h=48, w=64, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    view = lambda: {"img": torch.rand(b, 3, h, w, generator=g) * 2 - 1, "true_shape": torch.tensor([[h, w]] * b)}  # noqa: E731
    return view(), view()


def test_rounding_rule_on_the_embedded_teacher_sizes():
    assert kept_depth(6, 0.3) == 4 and evenly_spaced(6, 4) == [0, 2, 3, 5]
    assert kept_depth(4, 0.3) == 3 and evenly_spaced(4, 3) == [0, 2, 3]
    assert kept_heads(4, 0.3) == 3 and kept_heads(16, 0.3) == 11
    assert kept_hidden(768, 0.3) == 536 and kept_hidden(512, 0.3) == 360 and kept_hidden(3072, 0.3) % 8 == 0
    assert kept_depth(12, 0.3, minimum=10) == 10  # DPT: the official head needs dec_depth > 9
    assert evenly_spaced(5, 1) == [4] and evenly_spaced(3, 5) == [0, 1, 2]


def test_student_is_smaller_inherits_and_round_trips(teacher, tmp_path):
    student = derive_student(teacher, 0.3)
    cfg = student.config
    assert (cfg.enc_depth, cfg.dec_depth) == (4, 3)
    assert cfg.enc_head_dim == teacher.config.enc_head_dim and cfg.dec_head_dim == teacher.config.dec_head_dim
    assert cfg.block_widths["enc_heads"] == [3] * 4 and cfg.block_widths["dec2_cross_heads"] == [3] * 3
    assert count_parameters(student) < 0.7 * count_parameters(teacher)
    assert student.pqk_layer_map == {"enc": [0, 2, 3, 5], "dec": [0, 2, 3]}
    # Whole modules and the last kept block's norms are the teacher's.
    assert torch.equal(student.downstream_head1.proj.weight, teacher.downstream_head1.proj.weight)
    assert torch.equal(student.enc_blocks[3].norm1.weight, teacher.enc_blocks[5].norm1.weight)
    # Loadable by load_checkpoint (both formats) with the same outputs.
    v1, v2 = _pair()
    with torch.no_grad():
        ref = student.eval()(v1, v2)[0]["pts3d"]
    for name in ("s.safetensors", "s.pth"):
        again = load_checkpoint(save_model(student, tmp_path / name))
        with torch.no_grad():
            torch.testing.assert_close(again(v1, v2)[0]["pts3d"], ref)
    # ratio 0 is an exact copy
    same = derive_student(teacher, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(v1, v2)[0]["pts3d"], teacher(v1, v2)[0]["pts3d"])
    with pytest.raises(ConfigError, match="ratio = 1.2"):
        derive_student(teacher, 1.2)


def test_the_most_important_heads_and_channels_are_kept():
    torch.manual_seed(0)
    t = build_model(**TEACHER_KWARGS).eval()  # block 0 is always kept
    attn, mlp = t.enc_blocks[0].attn, t.enc_blocks[0].mlp
    hd = attn.head_dim
    with torch.no_grad():
        for part in range(3):  # head 1 carries almost nothing: it must be the one dropped
            attn.qkv.weight[part * attn.num_heads * hd + hd: part * attn.num_heads * hd + 2 * hd] *= 1e-3
        attn.proj.weight[:, hd:2 * hd] *= 1e-3
        mlp.fc1.weight[5] *= 100.0  # channel 5 is the most important
    s = derive_student(t, 0.3)
    kept = s.pqk_derivation
    assert s.enc_blocks[0].attn.num_heads == 3
    # Heads 0, 2, 3 kept in order: the student's head 1 is the teacher's head 2.
    torch.testing.assert_close(s.enc_blocks[0].attn.qkv.weight[hd:2 * hd], attn.qkv.weight[2 * hd:3 * hd])
    assert kept["block_widths"]["enc_mlp_hidden"][0] == kept_hidden(256, 0.3)
    assert any(torch.equal(row, mlp.fc1.weight[5]) for row in s.enc_blocks[0].mlp.fc1.weight)


def test_student_exports_to_onnx(teacher, tmp_path):
    pytest.importorskip("onnxruntime")
    from pqk.backends.onnx_export import compare_with_torch, export_onnx

    student = derive_student(teacher, 0.3).eval()
    path = export_onnx(student, tmp_path / "student.onnx", 48, 64)
    v1, v2 = _pair()
    assert compare_with_torch(student, path, v1, v2)["max_rel_l2"] < 1e-4


def test_channel_kl():
    t = torch.randn(2, 8, 300)
    assert float(channel_kl(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    s = t + 0.3 * torch.randn_like(t)
    kl3, kl5 = float(channel_kl(s, t, 3.0)), float(channel_kl(s, t, 5.0))
    assert kl3 > 0 and kl5 > 0
    # Standardised by the teacher's statistics: the same relative error at another scale costs the same.
    assert float(channel_kl(10 * s + 4, 10 * t + 4, 3.0)) == pytest.approx(kl3, rel=1e-4)
    # High-temperature limit: T^2 * KL -> half the variance of the standardised difference.
    std = t.std(-1, keepdim=True)
    half_var = 0.5 * ((s - t) / std).var(-1, unbiased=False).mean()
    assert float(channel_kl(s, t, 200.0)) == pytest.approx(float(half_var), rel=0.05)
    # Unstandardised at a matched temperature: one scale for the whole batch. With equal spreads
    # and zero means the two forms agree; with one map 5x wider the batch scale grows to 1.5, so
    # the same error on the seven narrow maps weighs (1/1.5)^2 as much (measured 0.020 vs 0.039).
    flat = torch.randn(2, 8, 300)
    flat = (flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True)
    noisy = flat + 0.3 * torch.randn_like(flat)
    assert float(channel_kl(noisy, flat, 3.0, standardize=False)) == pytest.approx(float(channel_kl(noisy, flat, 3.0)), rel=1e-4)
    wide = flat.clone()
    wide[:, 0] *= 5
    student = wide + 0.3 * torch.randn_like(wide)
    assert float(channel_kl(student, wide, 3.0, standardize=False)) < 0.75 * float(channel_kl(student, wide, 3.0))


def test_output_maps_ignore_global_scale(teacher):
    v1, v2 = _pair()
    with torch.no_grad():
        r1, r2 = teacher(v1, v2)
    scaled1 = {"pts3d": 3 * r1["pts3d"], "conf": r1["conf"]}
    scaled2 = {"pts3d_in_other_view": 3 * r2["pts3d_in_other_view"], "conf": r2["conf"]}
    maps = output_maps(r1, r2)
    assert maps.shape == (1, 8, 48 * 64)
    torch.testing.assert_close(output_maps(scaled1, scaled2), maps)


def test_loss_terms_pseudo_labels_and_projections(teacher):
    student = derive_student(teacher, 0.3)
    v1, v2 = _pair(b=2)
    gt = {"pts1": torch.rand(2, 48, 64, 3) + 1, "pts2": torch.rand(2, 48, 64, 3) + 1,
          "valid1": torch.ones(2, 48, 64, dtype=torch.bool), "valid2": torch.ones(2, 48, 64, dtype=torch.bool)}
    loss_fn = DistillLoss(student, teacher, DistillSpec(T=3, beta=0.5, gamma=0.1, train=TrainSpec(**TINY_TRAIN)))
    loss, logs = loss_fn(student, v1, v2, gt, 0.0)
    assert set(logs) >= {"task", "kl", "feat", "loss"} and torch.isfinite(loss)
    assert logs["loss"] == pytest.approx(logs["task"] + 0.5 * logs["kl"] + 0.1 * logs["feat"], rel=1e-5)
    loss.backward()
    assert student.enc_blocks[0].attn.qkv.weight.grad is not None
    assert not loss_fn.projections  # same widths: identity, no projection
    loss_fn.close()
    # No ground truth at all: L_task is scored against the teacher's pointmaps.
    no_gt = {**gt, "valid1": torch.zeros_like(gt["valid1"]), "valid2": torch.zeros_like(gt["valid2"])}
    control = DistillLoss(student, teacher, DistillSpec(task_only=True, train=TrainSpec(**TINY_TRAIN)))
    loss, logs = control(student, v1, v2, no_gt, 0.0)
    assert set(logs) == {"task", "loss"} and torch.isfinite(loss) and logs["task"] != 0.0
    # Another width: FitNet projections appear, per matched layer.
    other = build_model(**{**TINY_KWARGS, "enc_embed_dim": 32, "dec_embed_dim": 32})
    fitnet = DistillLoss(other, teacher, DistillSpec(gamma=0.1, train=TrainSpec(**TINY_TRAIN)))
    assert fitnet.projections["enc0"].weight.shape == (64, 32) and "dec2_1" in fitnet.projections
    _, logs = fitnet(other, v1, v2, gt, 0.5)
    assert logs["feat"] > 0
    fitnet.close()


def test_beta_schedule_and_spec_validation():
    spec = DistillSpec(beta=0.5, beta_schedule=[[0.7, 0.7]])
    assert (spec.beta_at(0.0), spec.beta_at(0.69), spec.beta_at(0.7), spec.beta_at(1.0)) == (0.5, 0.5, 0.7, 0.7)
    assert spec.keyparams() == "T3B05_sched" and DistillSpec(T=5).keyparams() == "T5B05"
    assert DistillSpec(gamma=0.1).keyparams() == "T3B05G01" and DistillSpec(task_only=True).keyparams() == "taskonly"
    with pytest.raises(ConfigError, match="T = -1"):
        DistillSpec(T=-1)
    with pytest.raises(ConfigError, match="beta_schedule entry"):
        DistillSpec(beta_schedule=[[1.5, 0.7]])
    with pytest.raises(ConfigError, match="unknown distillation field 'temperature'"):
        DistillSpec.from_dict({"temperature": 3})


def test_grid_config(tmp_path):
    from pqk.methods.distill.select import parse_runs

    grid = load_distill_config("configs/distill.yaml")
    assert [grid.exp_id(n) for n in grid.runs] == ["K_T3B05_run1", "K_T5B05_run1", "K_T3B05_sched_run1", "K_taskonly_run1"]
    assert grid.runs["K-1"].train.patience == 3 and grid.runs["K-1"].train.epochs == 30
    # Students end at the workload's resolution and are validated there (issue 18's recipe).
    assert grid.runs["K-1"].train.stages()[-1][1:3] == (512, 384) and grid.runs["K-1"].train.val_size() == (512, 384)
    assert grid.select == {"K-4": ["K-1", "K-2", "K-3"]}
    assert parse_runs(None, grid) == ["K-1", "K-2", "K-3", "control", "K-4"]
    with pytest.raises(InputError, match="'K-9'"):
        parse_runs("K-1,K-9", grid)
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  K-1: {T: 3, beta: 0.5}\ntrain: {epochs: 0}\n")
    with pytest.raises(ConfigError, match="runs.K-1: train.epochs = 0"):
        load_distill_config(bad)
    bad.write_text("runs:\n  K-1: {T: 3}\nselect:\n  K-4: [K-7]\n")
    with pytest.raises(ConfigError, match="select.K-4 names run 'K-7'"):
        load_distill_config(bad)


def test_distill_step_trains_saves_and_records(teacher, tmp_path):
    from pqk.methods.base import StepContext

    ctx = StepContext(teacher=teacher, workload=None, out_dir=tmp_path / "K", log=lambda _m: None)
    spec = DistillSpec(T=3, beta=0.5, train=TrainSpec(**TINY_TRAIN))
    result = distill_step(teacher, ctx, spec)
    assert result.fields == {"T": 3.0, "beta": 0.5, "gamma": 0.0} and result.device_hours > 0
    log = json.loads((tmp_path / "K" / "distill_log.json").read_text())
    assert len(log["history"]) == 1 and "train_kl" in log["history"][0] and "val_absrel" in log["history"][0]
    again = load_checkpoint(result.artifact)
    assert again.config.enc_depth == 4 and again.pqk_history[-1]["step"] == "distill"
    assert again.pqk_history[-1]["derivation"]["enc_layers"] == [0, 2, 3, 5]


def test_interrupted_distillation_resumes_to_the_same_result(teacher, tmp_path):
    spec = DistillSpec(T=3, beta=0.5, train=TrainSpec(**{**TINY_TRAIN, "epochs": 2, "steps_per_epoch": 3, "checkpoint_every": 2}))

    def run(out, on_step=None):
        return distill(derive_student(teacher, 0.3), teacher, spec, out, show_progress=False, log=lambda _m: None,
                       on_step=on_step)

    full = run(tmp_path / "full")

    class Kill(Exception):
        pass

    def die(step, logs):
        if step == 5:  # epoch 2, one step after the mid-epoch checkpoint at step 4
            raise Kill

    with pytest.raises(Kill):
        run(tmp_path / "killed", die)
    resumed = run(tmp_path / "killed")
    keys = ("val_absrel", "val_delta1", "val_loss", "train_kl", "train_task")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_pqk_distill_end_to_end(teacher, tmp_path):
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    w = make_workload(n_pairs=2, n_scenes=2, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride = 5, 2
    workload = save_workload(w, tmp_path / "workload.yaml")
    teacher_path = save_model(teacher, tmp_path / "teacher.safetensors")
    config = tmp_path / "distill.yaml"
    train = ", ".join(f"{k}: {v}" for k, v in TINY_TRAIN.items() if k != "patience")
    config.write_text(f"train: {{{train}}}\nruns:\n  K-1: {{T: 3, beta: 0.5}}\n  control: {{task_only: true}}\n"
                      "select:\n  K-4: [K-1]\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pqk", "distill", "--teacher", str(teacher_path), "--config", str(config),
            "--workload", str(workload), "--out", str(out), "--repeats", "5"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names >= {"teacher_eval.json", "K_T3B05_run1_eval.json", "K_taskonly_run1_eval.json", "result_table.csv",
                     "student_fp32_best.safetensors", "K-4_select.json", "K_T3B05_run1", "K_taskonly_run1"}
    payload = json.loads((out / "K_T3B05_run1_eval.json").read_text())
    assert payload["record"]["combo"] == "K" and payload["record"]["T"] == 3.0
    assert payload["details"]["gate"]["stage"] == "P1" and "gate P1" in payload["record"]["notes"]
    assert (out / "K_T3B05_run1" / "distill_log.json").is_file()
    rows = (out / "result_table.csv").read_text().splitlines()
    assert len(rows) == 4  # header, teacher, K-1, control
    # A rerun keeps what is done; bad input is one line, exit 2.
    again = subprocess.run(args + ["--runs", "K-1"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already trained and measured" in again.stderr
    bad = subprocess.run(args + ["--runs", "K-9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
