"""The `pqk` command as a user runs it: outputs on success, one-line errors and no
half-written output on bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_KWARGS


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pqk", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import torch

    from pqk.models.dust3r import build_model, save_model

    torch.manual_seed(42)
    return save_model(build_model(**TINY_KWARGS), tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(42)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


def test_help_teaches_every_command():
    for args in ([], ["infer"], ["export"], ["export", "onnx"]):
        res = run_cli(*args, "--help")
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout
    assert "Example" in run_cli("infer", "--help").stdout


def test_infer_demo_pair_writes_pointmaps_and_clouds(tmp_path):
    import trimesh

    out = tmp_path / "demo"
    res = run_cli("infer", "--demo-pair", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "bundled teacher" in res.stderr
    summary = json.loads((out / "pairs.json").read_text())
    assert len(summary["pairs"]) == 2  # one pair, symmetrized
    for rec in summary["pairs"]:
        data = np.load(out / rec["npz"])
        assert data["pts3d"].shape == (336, 512, 3) and data["conf"].shape == (336, 512)
        assert data["pts3d_in_other_view"].shape == (336, 512, 3)
        assert np.isfinite(data["pts3d"]).all() and (data["conf"] > 1).all()
        cloud = trimesh.load(out / rec["ply"])
        assert len(cloud.vertices) == rec["points"] > 0
        assert cloud.colors.shape[0] == rec["points"]
    assert not list(tmp_path.glob(".*partial*"))


def test_infer_folder_with_scene_graph_and_checkpoint(tmp_path, tiny_ckpt, three_images):
    out = tmp_path / "out"
    res = run_cli("infer", str(three_images), "-c", str(tiny_ckpt), "-g", "swin-1-noncyclic", "--size", "224",
                  "--batch-size", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "pairs.json").read_text())
    assert [(p["view1"], p["view2"]) for p in summary["pairs"]] == [
        ("im0", "im1"), ("im1", "im2"), ("im1", "im0"), ("im2", "im1")
    ]
    assert np.load(out / summary["pairs"][0]["npz"])["pts3d"].shape == (224, 224, 3)


def _evil_pth(path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with path.open("wb") as f:
        pickle.dump({"args": Evil(), "model": {}}, f)
    return path


@pytest.mark.parametrize(
    "case",
    ["missing", "not_image", "one_image", "scene_graph", "too_thin", "not_dust3r", "pickle", "both_inputs"],
)
def test_infer_bad_input_is_one_line_exit_2(tmp_path, three_images, case):
    good = [str(three_images / "im0.png"), str(three_images / "im1.png")]
    (tmp_path / "fake.png").write_text("not an image")
    Image.fromarray(np.zeros((10, 1000, 3), np.uint8)).save(tmp_path / "thin.png")
    (tmp_path / "notes.pth").write_bytes(b"PK\x03\x04junk")
    args = {
        "missing": [good[0], str(tmp_path / "nope.jpg")],
        "not_image": [good[0], str(tmp_path / "fake.png")],
        "one_image": [good[0]],
        "scene_graph": good + ["-g", "ring-3"],
        "too_thin": [good[0], str(tmp_path / "thin.png")],
        "not_dust3r": good + ["-c", str(tmp_path / "notes.pth")],
        "pickle": good + ["-c", str(_evil_pth(tmp_path / "evil.pth"))],
        "both_inputs": good + ["--demo-pair"],
    }[case]
    out = tmp_path / "out"
    res = run_cli("infer", *args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr and "pwned" not in res.stdout
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_export_onnx_command_checks_itself(tmp_path, tiny_ckpt):
    out = tmp_path / "m.onnx"
    res = run_cli("export", "onnx", "-c", str(tiny_ckpt), "--height", "64", "--width", "96", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "relative L2" in res.stdout
    bad = run_cli("export", "onnx", "-c", str(tiny_ckpt), "--height", "70", "--out", str(tmp_path / "b.onnx"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "70" in bad.stderr
    assert not (tmp_path / "b.onnx").exists()


@pytest.fixture(scope="module")
def small_workload(tmp_path_factory):
    path = tmp_path_factory.mktemp("wl") / "workload.yaml"
    res = run_cli("workload", "make", "--out", str(path), "--pairs", "3", "--scenes", "1", "--scene-level", "0")
    assert res.returncode == 0, res.stderr
    return path


def test_eval_writes_record_json_and_csv(tmp_path, small_workload, tiny_ckpt):
    out = tmp_path / "eval"
    res = run_cli("eval", "--model", str(tiny_ckpt), "--workload", str(small_workload), "--out", str(out), "--repeats", "5")
    assert res.returncode == 0, res.stderr
    payload = json.loads((out / "teacher_eval.json").read_text())
    record = payload["record"]
    for key in ("absrel", "rmse", "delta1", "t_pair_p50_ms", "t_pair_p95_ms", "pairs_per_sec", "params_M", "flops_G", "size_MB", "gpu_hours"):
        assert record[key] != "" and np.isfinite(record[key]), key
    assert payload["details"]["real_check_motorcycle"]["n_views"] == 2
    rows = (out / "result_table.csv").read_text().splitlines()
    assert rows[0].startswith("exp_id,combo,rho,T,beta,gamma") and len(rows) == 2
    assert "absrel" in res.stdout


def test_eval_refuses_changed_data_and_bad_model(tmp_path, small_workload):
    import yaml

    raw = yaml.safe_load(small_workload.read_text())
    raw["data"]["seeds"] = [7]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    res = run_cli("eval", "--workload", str(changed), "--out", str(tmp_path / "o1"))
    assert res.returncode == 2 and "data hash does not match" in res.stderr
    (tmp_path / "m.pth").write_bytes(b"not a model")
    res = run_cli("eval", "--model", str(tmp_path / "m.pth"), "--workload", str(small_workload), "--out", str(tmp_path / "o2"))
    assert res.returncode == 2 and res.stderr.startswith("error:")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
