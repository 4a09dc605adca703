"""Plans: parsing and derived dependencies; the runner end to end on a tiny model (baseline,
K, Q, K→Q, P), shared and cached steps, gates, and kill-then-rerun giving the same quality."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_KWARGS
from pqk.errors import ConfigError
from pqk.pipeline.plan import load_plan

TRAIN = dict(epochs=2, steps_per_epoch=3, batch_size=2, lr=1e-3, warmup_steps=1, width=64, height=48, n_scenes=2,
             views_per_scene=4, window=2, val_scenes=1, val_pairs=2, patience=None, checkpoint_every=1)
QUALITY = ("absrel", "rmse", "delta1", "chamfer", "params_M", "flops_G", "rho", "T", "beta", "gamma", "bits_w", "keep_list")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    import torch

    from pqk.models.dust3r import build_model, save_model
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    root = tmp_path_factory.mktemp("plan")
    torch.manual_seed(42)
    save_model(build_model(**TINY_KWARGS), root / "teacher.safetensors")
    w = make_workload(n_pairs=3, n_scenes=1, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride, w.scene_level = 5, 2, []
    save_workload(w, root / "workload.yaml")
    (root / "distill.yaml").write_text(yaml.safe_dump({"train": TRAIN, "runs": {"K-1": {"T": 3, "beta": 0.5}}}))
    (root / "quant.yaml").write_text(yaml.safe_dump({"calibration": {"size": 4}, "qat": {"train": TRAIN}}))
    (root / "prune.yaml").write_text(yaml.safe_dump({
        "allocation": "uniform", "calibration": {"n_pairs": 2, "n_scenes": 1, "width": 64, "height": 48, "views": 4,
                                                 "window": 2, "batch_size": 2},
        "finetune": {**TRAIN, "epochs": 1}}))
    plan = {
        "name": "tiny", "teacher": "teacher.safetensors", "workload": "workload.yaml", "budget": 1.0,
        "gate_policy": "record",
        "experiments": [
            {"id": "baseline", "steps": []},
            {"id": "K", "steps": [{"method": "distill", "config": "distill.yaml", "run": "K-1"}]},
            {"id": "Q", "steps": [{"method": "quantize", "config": "quant.yaml", "qat": "never"}]},
            {"id": "KQ", "steps": [{"method": "distill", "config": "distill.yaml", "run": "K-1"},
                                   {"method": "quantize", "config": "quant.yaml", "qat": "never"}]},
            {"id": "P", "steps": [{"method": "prune", "config": "prune.yaml", "rho": 0.3}]},
            # The same K at half the budget: a point of the budget-vs-quality curve.
            {"id": "K_half", "budget": 0.5, "steps": [{"method": "distill", "config": "distill.yaml", "run": "K-1"}]},
        ],
    }
    (root / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return root


def _run(project: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pqk", "run", str(project / "plan.yaml"), "--out", str(out), "--repeats", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _table(path: Path) -> dict[str, dict]:
    return {r["exp_id"]: {k: r[k] for k in QUALITY} for r in csv.DictReader(path.open())}


def test_plans_parse_and_dependencies_are_derived(project) -> None:
    plan = load_plan(project / "plan.yaml")
    by_id = {e.id: e for e in plan.experiments}
    assert [e.id for e in plan.prefixes(by_id["KQ"])] == ["baseline", "K"]
    assert by_id["K_half"].budget == 0.5 and by_id["K"].budget is None
    bad_budget = project / "bad_budget.yaml"
    bad_budget.write_text(yaml.safe_dump({"name": "x", "experiments": [{"id": "a", "budget": 0, "steps": []}]}))
    with pytest.raises(ConfigError, match="experiment 'a': budget 0 must be a number > 0"):
        load_plan(bad_budget)
    assert (by_id["K"].stage, by_id["Q"].stage, by_id["KQ"].stage, by_id["P"].stage) == ("P1", "P2", "P3", "P4")
    assert by_id["KQ"].combo == "KQ"
    for name in ("minimal", "medium", "best"):
        shipped = load_plan(Path("configs/plans") / f"{name}.yaml")
        assert shipped.experiments[0].steps == []
        # The embedded-default plan measures everything (its K student is minutes old); real plans stop.
        assert shipped.gate_policy == ("record" if name == "minimal" else "stop")
    best = load_plan(Path("configs/plans/best.yaml"))
    assert [e.id for e in best.select(["PKQ", "PQK"]).experiments] == ["baseline", "P", "PK", "PKQ", "PQK"]
    with pytest.raises(ConfigError, match="'PKX' is not in plan best"):
        best.select(["PKX"])
    assert best.with_budget(0.1).name == "best_budget0.1" and best.with_budget(best.budget) is best
    assert best.experiments[[e.id for e in best.experiments].index("PQK")].stage == "P3"
    bad = project / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "experiments": [{"id": "a", "steps": [{"method": "quantize"}, {"method": "distill"}]}]}))
    with pytest.raises(ConfigError, match="quantize must come last"):
        load_plan(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "experiments": [{"id": "a", "steps": [{"method": "sparsify"}]}]}))
    with pytest.raises(ConfigError, match="unknown method 'sparsify'"):
        load_plan(bad)


def test_plan_runs_caches_and_resumes_after_a_kill(project, tmp_path) -> None:
    clean = _run(project, tmp_path / "clean")
    out, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-3000:]
    run_dir = tmp_path / "clean" / "tiny"
    table = _table(run_dir / "result_table.csv")
    assert set(table) == {"P0_teacher_run1", "K_K1_run1", "Q_PTQ_run1", "KQ_PTQ_run1", "P_r030_run1", "K_K1_bud0p5_run1"}
    assert table["P_r030_run1"]["rho"] == "0.3"
    assert float(table["P_r030_run1"]["params_M"]) < float(table["P0_teacher_run1"]["params_M"])
    rows = {r["exp_id"]: r for r in csv.DictReader((run_dir / "result_table.csv").open())}
    assert rows["KQ_PTQ_run1"]["bits_w"] == "8" and rows["KQ_PTQ_run1"]["T"] == "3.0"
    assert float(rows["K_K1_run1"]["params_M"]) < float(rows["P0_teacher_run1"]["params_M"])
    kq = json.loads((run_dir / "KQ_PTQ_run1_eval.json").read_text())["details"]
    assert kq["gate"]["stage"] == "P3" and kq["gate"]["reference"] == "K_K1_run1"  # the FP32 student
    # K→Q reused K's distillation: one distill step folder for both, another for K at budget 0.5
    # (2 epochs -> 1).
    assert len(list((run_dir / "steps").glob("distill-*"))) == 2
    half = json.loads((run_dir / "K_K1_bud0p5_run1_eval.json").read_text())
    assert len(half["details"]["step"]["distill"]["history"]) == 1 and "at budget 0.5" in half["record"]["notes"]
    assert half["details"]["gate"]["reference"] == "P0_teacher_run1"
    log = [json.loads(line) for line in (run_dir / "execution_log.jsonl").read_text().splitlines()]
    assert {"date", "task_id", "input", "output", "verdict", "gpu_hours", "notes"} <= set(log[0])
    status = json.loads((run_dir / "run.json").read_text())
    assert [e["state"] for e in status["experiments"]] == ["done"] * 6
    results_md = (run_dir / "report" / "results.md").read_text()
    assert "K_K1_run1" in results_md  # pqk run writes the report
    assert "Quality against training budget" in results_md and (run_dir / "report" / "budget_curve.png").is_file()
    assert (run_dir / "report" / "report.html").is_file()

    # Rerun: everything cached, nothing trained or measured again.
    again = _run(project, tmp_path / "clean")
    _, err2 = again.communicate(timeout=300)
    assert again.returncode == 0 and "measured before" in err2 and "step 1/1" not in err2

    # Kill during the first training step, rerun, same quality columns as the clean run.
    killed = _run(project, tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "killed").glob("tiny/steps/distill-*/K_*/last.pth")) \
            and not list((tmp_path / "killed").glob("tiny/steps/distill-*/last.pth")):
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    resumed = _run(project, tmp_path / "killed")
    _, err3 = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err3[-3000:]
    assert _table(tmp_path / "killed" / "tiny" / "result_table.csv") == table


def test_stop_policy_marks_dependents_stopped(project, tmp_path) -> None:
    plan = yaml.safe_load((project / "plan.yaml").read_text())
    # An unreachable P1 threshold (δ1 would have to grow 100-fold) makes K fail whatever the weights.
    plan.update(name="tinystop", gate_policy="stop", gates={"P1": {"max_quality_drop": -100.0}})
    plan["experiments"] = [e for e in plan["experiments"] if e["id"] in ("baseline", "K", "KQ")]
    (project / "stop.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "pqk", "run", str(project / "stop.yaml"), "--out", str(tmp_path), "--repeats", "5"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {e["id"]: e for e in json.loads((tmp_path / "tinystop" / "run.json").read_text())["experiments"]}
    assert status["K"]["verdict"] == "stop"
    assert status["KQ"]["state"] == "stopped" and "K: gate stop" in status["KQ"]["reasons"][0]


def test_exp_ids_name_what_differs_and_ablations_parse(project) -> None:
    from pqk.pipeline.plan import PlanStep
    from pqk.pipeline.runner import _keyparams

    q = project / "quant.yaml"
    d = project / "distill.yaml"
    assert _keyparams([PlanStep("quantize", q, {})], {}, {}) == "PTQ"
    assert _keyparams([PlanStep("quantize", q, {})], {}, {"qat": {"steps": 3}}) == "QAT"
    assert _keyparams([PlanStep("quantize", q, {"keep_list": ["Softmax", "attention_scale"]})], {}, {}) == "PTQ_keepSMAS"
    assert _keyparams([PlanStep("quantize", q, {"calibration_size": 128})], {}, {}) == "PTQ_cal128"
    assert _keyparams([PlanStep("distill", d, {"run": "K-1", "gamma": 0.1})], {}) == "K1G01"
    assert _keyparams([PlanStep("prune", d, {"rho": 0.1})], {"rho": 0.1}) == "r010"
    best = load_plan(Path("configs/plans/best.yaml"))
    groups = {e.ablation for e in best.experiments if e.ablation}
    assert groups == {"keep", "calib", "loss"}


def test_step_fingerprint_follows_content_not_comments(tmp_path) -> None:
    from pqk.pipeline.plan import PlanStep

    (tmp_path / "distill.yaml").write_text("train: {epochs: 2}\nruns: {K-1: {T: 3}}\n")
    (tmp_path / "prune.yaml").write_text("rho: 0.3\n")
    (tmp_path / "quant.yaml").write_text("calibration: {size: 4}\n")
    (tmp_path / "joint.yaml").write_text("distill: {config: distill.yaml}\n")
    distill, joint = PlanStep("distill", tmp_path / "distill.yaml"), PlanStep("joint", tmp_path / "joint.yaml")
    before = distill.fingerprint(), joint.fingerprint()
    (tmp_path / "distill.yaml").write_text("# a comment\ntrain: {epochs: 2}   # another\nruns: {K-1: {T: 3}}\n")
    assert (distill.fingerprint(), joint.fingerprint()) == before
    (tmp_path / "distill.yaml").write_text("train: {epochs: 3}\nruns: {K-1: {T: 3}}\n")
    assert distill.fingerprint() != before[0] and joint.fingerprint() != before[1]  # joint follows what it names
    changed = joint.fingerprint()
    (tmp_path / "quant.yaml").write_text("calibration: {size: 8}\n")
    assert joint.fingerprint() != changed


def test_run_folder_plan_copy_says_what_ran(tmp_path) -> None:
    from pqk.pipeline.runner import PlanRunner

    best = load_plan(Path("configs/plans/best.yaml"))
    runner = PlanRunner(best, tmp_path)
    runner.run_dir.mkdir(parents=True)
    runner._copy_plan()  # no overrides: the file itself, comments and all
    assert (runner.run_dir / "plan.yaml").read_text() == Path("configs/plans/best.yaml").read_text()
    runner = PlanRunner(best.select(["PQK"]).with_budget(0.05), tmp_path)
    runner.run_dir.mkdir(parents=True)
    runner._copy_plan()
    copied = load_plan(runner.run_dir / "plan.yaml")
    assert copied.name == "best_budget0.05" and copied.budget == 0.05
    assert [e.id for e in copied.experiments] == ["baseline", "PQK"]
