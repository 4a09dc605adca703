"""`pqk quantize` end to end on a tiny model and workload: PTQ, both INT8 runtimes measured
by `evaluate`, side-by-side latency, the P2 gate, QAT when forced; bad options are one line."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import TINY_KWARGS
from test_cli import run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from pqk.models.dust3r import build_model, save_model
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    root = tmp_path_factory.mktemp("q")
    torch.manual_seed(42)
    ckpt = save_model(build_model(**TINY_KWARGS), root / "tiny.pth")
    # The real check's motorcycle pair is 32x64 at this resolution, the generated views 48x64.
    w = make_workload(n_pairs=3, n_scenes=1, views=4, resolution=64, real_check=True)
    w.ga_niter, w.ga_stride, w.scene_level = 5, 2, []
    workload = save_workload(w, root / "workload.yaml")
    config = root / "quant.yaml"
    config.write_text(yaml.safe_dump({
        "calibration": {"size": 4},
        "qat": {"train": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "warmup_steps": 1, "patience": None,
                          "width": 64, "height": 48, "n_scenes": 2, "views_per_scene": 3, "window": 1,
                          "val_scenes": 1, "val_pairs": 2}},
    }))
    return ckpt, workload, config


def test_quantize_writes_records_for_each_runtime_and_qat(tmp_path, setup):
    ckpt, workload, config = setup
    out = tmp_path / "quant"
    res = run_cli("quantize", "--model", str(ckpt), "--workload", str(workload), "--config", str(config),
                  "--out", str(out), "--repeats", "5", "--qat", "always")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["exp_id"]: r for r in csv.DictReader((out / "result_table.csv").open())}
    assert set(rows) == {"P0_teacher_run1", "Q_PTQ_onednn_run1", "Q_PTQ_ort_run1", "Q_PTQ_openvino_run1",
                         "Q_QAT_onednn_run1", "Q_QAT_ort_run1", "Q_QAT_openvino_run1"}
    teacher = rows["P0_teacher_run1"]
    for exp in ("Q_PTQ_onednn_run1", "Q_PTQ_ort_run1", "Q_PTQ_openvino_run1", "Q_QAT_onednn_run1"):
        row = rows[exp]
        assert (row["bits_w"], row["bits_a"], row["keep_list"]) == ("8", "8", "Softmax+attention_scale+LayerNorm")
        assert row["params_M"] == teacher["params_M"] and row["flops_G"] == teacher["flops_G"]  # counted on the float model
        assert float(row["size_MB"]) < float(teacher["size_MB"])
        assert "gate P2:" in row["notes"] and "runtime:" in row["notes"] and "no TensorRT here" in row["notes"]
    payload = json.loads((out / "Q_PTQ_onednn_run1_eval.json").read_text())
    assert payload["details"]["runtime"].startswith("torch oneDNN int8 + bf16 attention")
    gate = payload["details"]["gate"]
    assert gate["reference"] == "P0_teacher_run1" and gate["figures"]["latency_source"] == "side by side"
    side = payload["details"]["step"]["latency_side_by_side"]["variants"]
    assert set(side) == {"torch eager fp32", "torch eager bf16 (autocast)", "onnxruntime fp32",
                         "onnxruntime int8 (QDQ)", "torch oneDNN int8 + bf16 attention", "openvino int8 (QDQ)"}
    ov = json.loads((out / "Q_PTQ_openvino_run1_eval.json").read_text())["details"]
    assert ov["runtime"].startswith("openvino file ptq_int8.onnx (+1 static-shape variant)")  # the QDQ files themselves
    for exp in ("Q_PTQ_ort_run1", "Q_PTQ_openvino_run1", "Q_QAT_ort_run1"):
        details = json.loads((out / f"{exp}_eval.json").read_text())["details"]
        # Every pair measured on the deployed runtime, the real photographs too (their own static file).
        assert details["skipped_pairs"] == [] and details["real_check_motorcycle"]["n_views"] == 2, exp
    assert (out / "ptq_int8.32x64.onnx").is_file() and (out / "qat_int8.32x64.onnx").is_file()
    qat = json.loads((out / "Q_QAT_onednn_run1_eval.json").read_text())["details"]["step"]["qat"]
    assert qat["steps"] == 4
    assert (out / "qat_int8.onnx").is_file() and (out / "quant_ckpt.pth").is_file() and (out / "ptq_int8.onnx").is_file()
    assert json.loads((out / "quant_eval.json").read_text())["record"]["exp_id"] == "Q_QAT_onednn_run1"
    assert "pair latency side by side" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--runtimes", "tensorrt"], "--runtimes value 'tensorrt' is not known"),
    (["--qat", "sometimes"], "--qat value 'sometimes' is not known"),
])
def test_bad_options_are_one_line(tmp_path, setup, args, message):
    ckpt, workload, config = setup
    res = run_cli("quantize", "--model", str(ckpt), "--workload", str(workload), "--config", str(config),
                  "--out", str(tmp_path / "o"), *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_tensorrt_absent_is_a_note_not_an_error(tmp_path) -> None:
    from pqk.backends.tensorrt_engine import build_engine, tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    engine, note = build_engine(tmp_path / "missing.onnx", tmp_path / "x.trt")
    assert engine is None and note.startswith("no TensorRT here")


def test_plan_step_measures_the_fastest_runtime() -> None:
    from pathlib import Path

    from pqk.methods.quantize_step import PtqOutcome, fastest_runtime

    def outcome(ort_ms: float, onednn_ms: float, ov_ms: float = float("inf")) -> PtqOutcome:
        variants = {"onnxruntime int8 (QDQ)": {"p50_ms": ort_ms}, "torch oneDNN int8 + bf16 attention": {"p50_ms": onednn_ms},
                    "openvino int8 (QDQ)": {"p50_ms": ov_ms}}
        return PtqOutcome(None, Path("a"), Path("b"), object(), {}, {"latency_side_by_side": {"variants": variants}}, [], 0.0)

    assert fastest_runtime(outcome(170.0, 273.0), ("onednn", "onnxruntime")) == "onnxruntime"
    assert fastest_runtime(outcome(300.0, 120.0), ("onednn", "onnxruntime")) == "onednn"
    assert fastest_runtime(outcome(170.0, 120.0), ("onnxruntime",)) == "onnxruntime"
    assert fastest_runtime(outcome(250.0, 240.0), ("onednn", "onnxruntime")) == "onnxruntime"  # a near-tie: no flip
    assert fastest_runtime(outcome(250.0, 200.0), ("onednn", "onnxruntime")) == "onnxruntime"  # 20 %: still no flip
    assert fastest_runtime(outcome(250.0, 240.0), ("onednn",)) == "onednn"
    # OpenVINO is preferred when asked for, unless another is more than 30 % faster.
    every = ("onednn", "onnxruntime", "openvino")
    assert fastest_runtime(outcome(250.0, 300.0, 240.0), every) == "openvino"
    assert fastest_runtime(outcome(200.0, 300.0, 240.0), every) == "openvino"  # 17 % faster: no flip
    assert fastest_runtime(outcome(150.0, 300.0, 240.0), every) == "onnxruntime"
    # A timing taken on a loaded machine decides nothing: the preference stands.
    loaded = outcome(200.0, 80.0, 240.0)
    loaded.details["latency_side_by_side"]["contention"] = {"others_share": 0.6, "contended": True}
    assert fastest_runtime(loaded, every) == "openvino"
