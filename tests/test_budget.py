"""`pqk budget`: a plan's device-hours and money from a probe of the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY_KWARGS

# grad_accum is not a TrainSpec field: noted, not fatal (the method's own loader validates).
TRAIN = "{epochs: 2, steps_per_epoch: 3, batch_size: 2, width: 96, height: 64, val_pairs: 2, n_scenes: 4, grad_accum: 2}"


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """A plan over tiny configs at 96x64: baseline, K, Q, K→Q (shares K's distillation), P, and
    one experiment whose config file does not exist (costed with the trainer's defaults)."""
    root = tmp_path_factory.mktemp("plan")
    # "cfg/", not "configs/": relative paths are tried from the working folder first, and the
    # plan's folder upwards second; these must be found the second way.
    (root / "cfg" / "plans").mkdir(parents=True)
    files = {
        "distill.yaml": f"ratio: 0.3\ntrain: {TRAIN}\nruns:\n  K-1: {{T: 3, beta: 0.5}}\n  K-2: {{T: 5, beta: 0.5}}\nselect:\n  K-4: [K-1, K-2]\n",
        "quant.yaml": "calibration: {size: 4}\nqat:\n  teacher_weight: 0.5\n  train: {epochs: 1, steps_per_epoch: 2, batch_size: 1, width: 96, height: 64, val_pairs: 2}\n",
        "prune.yaml": textwrap.dedent("""\
            rho: 0.25
            allocation: sensitivity
            sensitivity_ratios: [0.5]
            calibration: {n_pairs: 2, width: 96, height: 64}
            finetune: {epochs: 1, steps_per_epoch: 2, batch_size: 1, width: 96, height: 64, val_pairs: 2}
            """),
        "workload.yaml": textwrap.dedent("""\
            scene_graph: swin-1
            symmetrize: true
            data: {kind: generated, views: 3, width: 96, height: 64}
            pairs: [[s, 0, 1], [s, 1, 2]]
            real_pairs: []
            scene_level: [s]
            """),
    }
    for name, text in files.items():
        (root / "cfg" / name).write_text(text)
    plan = root / "cfg" / "plans" / "tiny.yaml"
    plan.write_text(textwrap.dedent("""\
        name: tiny
        workload: cfg/workload.yaml
        estimate_h100_hours: {total: 45, K: 20, Q: [8, 12]}
        experiments:
          - {id: baseline, steps: []}
          - id: K
            steps: [{method: distill, config: cfg/distill.yaml, run: K-1}]
          - id: Q
            steps: [{method: quantize, config: cfg/quant.yaml}]
          - id: KQ
            steps: [{method: distill, config: cfg/distill.yaml, run: K-1}, {method: quantize, config: cfg/quant.yaml}]
          - id: P
            steps: [{method: prune, config: cfg/prune.yaml}]
          - id: K4
            steps: [{method: distill, config: cfg/distill.yaml, run: K-4}]
        """))
    return plan


@pytest.fixture(scope="module")
def estimate(tiny_plan, tiny_model):
    from pqk.pipeline.budget import estimate_plan

    return estimate_plan(tiny_plan, "a100", 2.0, 1.0, teacher=tiny_model, probe_steps=1)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-3, abs_tol=1e-15)


def test_every_figure_is_positive_and_totals_add_up(estimate):
    exps = {e["id"]: e for e in estimate["experiments"]}
    assert list(exps) == ["baseline", "K", "Q", "KQ", "P", "K4"]
    for exp in exps.values():
        assert exp["hours"][0] > 0 and exp["usd"][0] > 0
        own = [i for i in exp["items"] if not i["reused_from"]]
        assert all(i["flops"] > 0 and i["cpu_seconds"] > 0 for i in exp["items"])
        assert _close(exp["hours"][0], sum(i["hours"][0] for i in own))
        assert _close(exp["usd"][0], exp["hours"][0] * 2.0)
        assert exp["hours_with_shared"][0] >= exp["hours"][0]
    total = estimate["total"]
    assert _close(total["hours"][0], sum(e["hours"][0] for e in exps.values()))
    assert _close(total["usd"][1], total["hours"][1] * 2.0)
    # The plan document's figures ride along: total, per experiment (number or range).
    assert total["plan_estimate_h100_hours"] == [45.0, 45.0]
    assert exps["K"]["plan_estimate_h100_hours"] == [20.0, 20.0] and exps["Q"]["plan_estimate_h100_hours"] == [8.0, 12.0]


def test_counts_follow_the_configs(estimate, tiny_plan):
    exps = {e["id"]: e for e in estimate["experiments"]}
    k_items = exps["K"]["items"]
    train = next(i for i in k_items if i["what"].startswith("distill K-1:"))
    assert "2 epochs x 3 steps, batch 2 at 96x64 (+ teacher forward)" in train["what"]
    # A100: counted FLOPs / (312 TFLOP/s x 0.35)
    assert _close(train["hours"][0], train["flops"] / (312e12 * 0.35) / 3600)
    # Evaluation: 2 pairs + 33 latency passes + one scene of 3 views, swin-1 symmetrized (6 pairs)
    assert any("41 passes at 96x64" in i["what"] for i in k_items)
    # K→Q reuses K's distillation (the runner's cache): listed, not paid twice.
    reused = [i for i in exps["KQ"]["items"] if i["reused_from"]]
    assert reused and all(i["reused_from"] == "K" for i in reused)
    assert exps["KQ"]["hours"][0] < exps["KQ"]["hours_with_shared"][0]
    # QAT is an upper bound (qat: auto) and says so; the K-4 selection trains both runs.
    assert any(i["conditional"] for i in exps["Q"]["items"])
    assert sum(i["what"].startswith(("distill K-1:", "distill K-2:")) for i in exps["K4"]["items"]) == 2
    assert any(i["what"].startswith("sensitivity") for i in exps["P"]["items"])
    # The pruned model was really built (fewer FLOPs per step than the teacher's fine-tune would have).
    assert not any("pruned copy" in n for n in estimate["notes"])
    assert any("training keys not costed: grad_accum" in n for n in estimate["notes"])
    assert any(m["name"].startswith("pruned rho=0.25") for m in estimate["probe"]["measured"])


def test_h100_is_a100_over_the_speedup_range_and_cpu_is_measured(estimate):
    from pqk.pipeline.budget import reprice

    h100 = reprice(estimate, "h100")
    cpu = reprice(estimate, "cpu", rate=1.0)
    a = estimate["total"]["hours"][0]
    assert _close(h100["total"]["hours"][0], a / 2.2) and _close(h100["total"]["hours"][1], a / 1.7)
    seconds = sum(i["cpu_seconds"] for e in estimate["experiments"] for i in e["items"] if not i["reused_from"])
    assert _close(cpu["total"]["hours"][0], seconds / 3600) and _close(cpu["total"]["usd"][0], seconds / 3600)


def test_missing_config_and_unknown_keys_are_notes_not_crashes(tiny_plan, tiny_model, tmp_path):
    from pqk.pipeline.budget import estimate_plan

    plan = tiny_plan.parent / "missing.yaml"
    plan.write_text("name: missing\nbudget: 0.5\nworkload: cfg/workload.yaml\nexperiments:\n"
                    "  - id: K\n    steps: [{method: distill, config: configs/nothere.yaml}]\n"
                    "  - id: J\n    steps: [{method: sparsify}]\n")
    result = estimate_plan(plan, "h100", 6.88, 0.1, teacher=tiny_model, probe_steps=1)
    notes = " ".join(result["notes"])
    assert "configs/nothere.yaml not found" in notes and "no cost model for method 'sparsify'" in notes
    assert "the plan sets budget 0.5 (what pqk run uses); this estimate is at budget 0.1" in notes
    assert result["experiments"][0]["hours"][0] > 0
    assert result["total"]["plan_estimate_h100_hours"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu": "v100"}, "--gpu 'v100' is not known; accepted: a100, h100, cpu"),
    ({"budget": 0.0}, "--budget 0.0 is not accepted"),
])
def test_bad_values_are_one_line_errors(tiny_plan, kwargs, message):
    from pqk.errors import PqkError
    from pqk.pipeline.budget import estimate_plan

    args = {"gpu": "h100", "rate": 6.88, "budget": 1.0, **kwargs}
    with pytest.raises(PqkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        estimate_plan(tiny_plan, args["gpu"], args["rate"], args["budget"])


def test_cli_bad_gpu_exits_2_with_one_line(tiny_plan):
    proc = subprocess.run([sys.executable, "-m", "pqk", "budget", str(tiny_plan), "--gpu", "v100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "v100" in lines[0] and "a100, h100, cpu" in lines[0]


def test_cli_prints_the_table_and_writes_json(tiny_plan, tmp_path):
    import torch

    from pqk.models.dust3r import build_model, save_model

    torch.manual_seed(0)
    ckpt = save_model(build_model(**TINY_KWARGS), tmp_path / "tiny.pth")
    plan = tiny_plan.parent / "small.yaml"
    plan.write_text("name: small\nworkload: cfg/workload.yaml\nestimate_h100_hours: {total: 3}\nexperiments:\n"
                    "  - {id: baseline, steps: []}\n  - id: Q\n    steps: [{method: quantize, config: cfg/quant.yaml, qat: never}]\n")
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, "-m", "pqk", "budget", str(plan), "--gpu", "h100", "--rate", "6.88",
                           "--teacher", str(ckpt), "--json", str(out), "--probe-steps", "1"],
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "plan small" in proc.stdout and "total" in proc.stdout and "3 h" in proc.stdout
    data = json.loads(out.read_text())
    assert data["gpu"] == "h100" and [e["id"] for e in data["experiments"]] == ["baseline", "Q"]
    assert not any("QAT" in i["what"] for i in data["experiments"][1]["items"])  # qat: never


def test_joint_pqk_is_costed_as_one_distillation_plus_calibration(tiny_plan, tiny_model):
    from pqk.pipeline.budget import estimate_plan

    cfg = tiny_plan.parent.parent
    (cfg / "joint.yaml").write_text("distill: {config: distill.yaml, run: K-1}\nprune: {config: prune.yaml, rho: 0.1}\n"
                                    "quantize: {config: quant.yaml}\n")
    plan = tiny_plan.parent / "joint.yaml"
    plan.write_text("name: j\nworkload: cfg/workload.yaml\nexperiments:\n"
                    "  - id: K\n    steps: [{method: distill, config: cfg/distill.yaml, run: K-1}]\n"
                    "  - id: PQK\n    steps: [{method: joint, config: cfg/joint.yaml}]\n")
    result = estimate_plan(plan, "h100", 6.88, 1.0, teacher=tiny_model, probe_steps=1)
    k, joint = result["experiments"]
    assert not any("no cost model" in n for n in result["notes"])
    steps = {i["step"] for i in joint["items"]}
    assert steps == {"joint", "evaluation"} and len(joint["items"]) > len(k["items"])
    assert joint["hours"][0] > k["hours"][0]  # the same training, plus calibration and one more evaluation
