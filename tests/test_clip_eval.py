"""The CLIP family end to end through the one evaluation and the plan runner: `pqk workload make
--family clip`, `pqk eval` (family read from the model file, torch and ONNX Runtime), and a
plan with a distilled student and its INT8 towers, on a tiny CLIP and a tiny workload."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pqk.cli import app
from pqk.models.clip import CLIP
from pqk.models.clip.family import save_family_model
from pqk.tasks.clip.record import ClipRecord

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2)


def _ok(result) -> None:
    assert result.exit_code == 0, f"{result.exception!r}\n{result.output[-3000:]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    save_family_model(CLIP(**TINY), root / "tiny_clip.safetensors")
    _ok(CliRunner().invoke(app, ["workload", "make", "--family", "clip", "--images", "24", "--image-size", "32",
                                 "--no-photos", "--out", str(root / "w.yaml")]))
    return root


def test_eval_reads_the_family_from_the_file_and_fills_the_record(project):
    out = project / "eval"
    _ok(CliRunner().invoke(app, ["eval", "--model", str(project / "tiny_clip.safetensors"), "--workload",
                                 str(project / "w.yaml"), "--out", str(out), "--repeats", "5"]))
    payload = json.loads((out / "teacher_eval.json").read_text())
    record = payload["record"]
    for key in ("r_mean", "r1_i2t", "r10_t2i", "zs_top1", "zs_top5", "vqa_acc", "vqa_yesno", "vqa_number",
                "t_image_p50_ms", "t_text_p50_ms", "images_per_sec", "params_M", "flops_G", "size_MB"):
        assert record[key] != "", key
    with (out / "result_table.csv").open() as f:
        assert next(csv.reader(f)) == list(ClipRecord.__dataclass_fields__)
    baselines = payload["details"]["baselines"]["generated"]
    assert baselines["chance"]["r1_t2i"] == pytest.approx(1 / 24)
    assert 0 <= baselines["bag_of_attributes"]["r_mean"] <= 1


def test_onnx_runtime_scores_what_pytorch_scores(project):
    from pqk.backends.clip_onnx import export_towers
    from pqk.models.clip.family import load_family_model

    files = export_towers(load_family_model(project / "tiny_clip.safetensors"), project / "onnx" / "tiny.onnx")
    records = {}
    for name, args in (("torch", ["--model", str(project / "tiny_clip.safetensors")]),
                       ("ort", ["--model", str(files.image), "--backend", "onnxruntime"])):
        out = project / f"eval_{name}"
        _ok(CliRunner().invoke(app, ["eval", *args, "--workload", str(project / "w.yaml"), "--out", str(out),
                                     "--repeats", "5"]))
        records[name] = json.loads((out / "teacher_eval.json").read_text())["record"]
    for key in ("r_mean", "zs_top1", "vqa_acc"):  # the same rankings up to fp32 ties
        assert records["ort"][key] == pytest.approx(records["torch"][key], abs=0.02), key


def test_clip_plan_distills_and_quantizes(project):
    configs = project / "configs"
    configs.mkdir()
    student = {**TINY, "vision_layers": 1, "transformer_layers": 1, "embed_dim": 16}
    (configs / "distill.yaml").write_text(json.dumps({
        "student": student, "train": {"n_train": 128, "n_val": 32, "epochs": 1, "batch_size": 32, "warmup_steps": 1},
        "runs": {"K-1": {}}}))
    (configs / "quant.yaml").write_text("calibration: {size: 16}\n")
    (configs / "prune.yaml").write_text("rho: 0.5\nfinetune: {n_train: 64, n_val: 16, epochs: 1, batch_size: 32, warmup_steps: 1}\n")
    plan = project / "plan.yaml"
    plan.write_text(f"""name: clip_tiny
task: clip
teacher: {project / 'tiny_clip.safetensors'}
workload: {project / 'w.yaml'}
budget: 1.0
gate_policy: record
experiments:
  - {{id: baseline, steps: []}}
  - {{id: K, steps: [{{method: distill, config: {configs / 'distill.yaml'}}}]}}
  - {{id: P, steps: [{{method: prune, config: {configs / 'prune.yaml'}}}]}}
  - id: KQ
    steps: [{{method: distill, config: {configs / 'distill.yaml'}}}, {{method: quantize, config: {configs / 'quant.yaml'}}}]
""")
    _ok(CliRunner().invoke(app, ["run", str(plan), "--out", str(project / "runs"), "--repeats", "5", "--no-report"]))
    run = project / "runs" / "clip_tiny"
    rows = {r["exp_id"]: r for r in csv.DictReader((run / "result_table.csv").open())}
    assert set(rows) == {"P0_teacher_run1", "K_K1_run1", "P_r050_run1", "KQ_PTQ_run1"}, set(rows)
    pruned = rows["P_r050_run1"]
    assert float(pruned["params_M"]) < float(rows["P0_teacher_run1"]["params_M"]) and pruned["rho"] == "0.5"
    assert "gate P4" in pruned["notes"]
    kq = rows["KQ_PTQ_run1"]
    assert kq["bits_w"] == "8" and float(kq["size_MB"]) < float(rows["K_K1_run1"]["size_MB"])
    assert float(kq["params_M"]) == float(rows["K_K1_run1"]["params_M"])  # the float model is counted
    assert all(kq[k] != "" for k in ("r_mean", "t_image_p50_ms", "t_text_p50_ms", "gpu_hours"))
    assert "gate P3" in kq["notes"]
    _ok(CliRunner().invoke(app, ["report", str(run), "--no-estimate"]))
    assert (run / "report" / "report.html").is_file()
    results = (run / "report" / "results.md").read_text()
    assert "| R mean ↑ |" in results and "| KQ_PTQ_run1 | KQ |" in results  # the family's own columns


@pytest.mark.parametrize("case", ["dust3r-checkpoint", "unknown-family", "empty-captions", "missing-image", "not-an-image"])
def test_bad_clip_input_is_one_line_and_writes_nothing(project, tmp_path, case):
    from pqk.assets import default_checkpoint
    from pqk.errors import PqkError

    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out.yaml"
    if case == "dust3r-checkpoint":
        args = ["eval", "--family", "clip", "--model", str(default_checkpoint()[0]), "--workload", str(project / "w.yaml"),
                "--out", str(tmp_path / "eval")]
        expected = "DUSt3R"
    elif case == "unknown-family":
        args = ["eval", "--family", "clipp", "--out", str(tmp_path / "eval")]
        expected = "unknown task 'clipp'"
    else:
        if case == "empty-captions":
            (data / "captions.jsonl").write_text("")
        elif case == "missing-image":
            (data / "captions.jsonl").write_text('{"image": "a.jpg", "captions": ["a cat"]}\n')
        else:
            (data / "a.jpg").write_text("not a jpeg")
            (data / "captions.jsonl").write_text('{"image": "a.jpg", "captions": ["a cat"]}\n')
        args = ["workload", "make", "--family", "clip", "--data", str(data), "--out", str(out)]
        expected = "captions.jsonl" if case != "not-an-image" else "a.jpg"
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, PqkError), f"{case}: {result.exception!r}"
    message = str(result.exception)
    assert "\n" not in message and expected in message, message
    assert not out.exists() and not (tmp_path / "eval").exists()
