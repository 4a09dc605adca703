"""The seams: a method registered inside a test runs in a plan end to end (runner, gate,
record, manifest, cache, report, budget) without any pqk module knowing its name; the
registry's errors name what is accepted; the task registry; the Python API of README."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import REPO, TINY_KWARGS
from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, get_method, method_names, register, unregister


@dataclass
class ScaleSpec:
    factor: float


class ScaleHeads(Method):
    """Toy method: multiplies the output heads' weights by `factor` (a model that still loads and
    whose quality moves)."""

    name = "toy_scale"
    letter = "S"
    options = frozenset({"factor"})
    default_config = "toy_scale.yaml"

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> ScaleSpec:
        data = yaml.safe_load(config.read_text()) or {}
        factor = float(options.get("factor", data.get("factor", 1.0)))
        if not factor > 0:
            raise ConfigError(f"factor {factor!r} must be > 0")
        return ScaleSpec(factor)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: ScaleSpec) -> StepResult:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("downstream_head"):
                    p.mul_(spec.factor)
        path = ctx.family.save_model(model, Path(ctx.out_dir) / "scaled.safetensors")
        return StepResult(model=model, artifact=path, notes=[f"heads x{spec.factor:g}"], details={"factor": spec.factor})

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        return f"x{float(options.get('factor', 1.0)):g}".replace(".", "")


@pytest.fixture()
def toy_method():
    register(ScaleHeads)
    yield get_method("toy_scale")
    unregister("toy_scale")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from pqk.models.dust3r import build_model, save_model
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(42)
    save_model(build_model(**TINY_KWARGS), root / "teacher.safetensors")
    w = make_workload(n_pairs=2, n_scenes=1, views=4, resolution=64, real_check=False)
    w.ga_niter, w.ga_stride, w.scene_level = 5, 2, []
    save_workload(w, root / "workload.yaml")
    (root / "toy_scale.yaml").write_text("factor: 1.0\n")
    plan = {"name": "toy", "teacher": "teacher.safetensors", "workload": "workload.yaml", "gate_policy": "record",
            "experiments": [{"id": "baseline", "steps": []},
                            {"id": "S", "steps": [{"method": "toy_scale", "config": "toy_scale.yaml", "factor": 0.5}]}]}
    (root / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return root


def test_a_registered_method_runs_in_a_plan_end_to_end(toy_method, project, tmp_path) -> None:
    from pqk.pipeline.plan import load_plan
    from pqk.pipeline.runner import PlanRunner
    from pqk.report import build_report

    assert "toy_scale" in method_names()
    plan = load_plan(project / "plan.yaml")
    assert plan.experiments[1].combo == "S" and plan.experiments[1].stage == "P1"
    logs: list[str] = []
    statuses = PlanRunner(plan, tmp_path, log=logs.append).run()
    run_dir = tmp_path / "toy"
    rows = {r["exp_id"]: r for r in csv.DictReader((run_dir / "result_table.csv").open())}
    assert set(rows) == {"P0_teacher_run1", "S_x05_run1"}
    assert rows["S_x05_run1"]["combo"] == "S" and "heads x0.5" in rows["S_x05_run1"]["notes"]
    assert rows["S_x05_run1"]["delta1"] != rows["P0_teacher_run1"]["delta1"]  # the method did something
    manifest = json.loads((run_dir / "run.json").read_text())
    toy = manifest["experiments"][1]
    assert manifest["task"] == "dust3r" and toy["id"] == "S" and toy["stage"] == "P1"
    assert toy["evaluations"][0]["gate"]["reference"] == "P0_teacher_run1"
    assert toy["verdict"] in ("pass", "stop") and statuses[1].verdict == toy["verdict"]
    payload = json.loads((run_dir / "S_x05_run1_eval.json").read_text())
    assert payload["details"]["step"]["factor"] == 0.5
    # The report reads the manifest's typed verdicts.
    report = build_report(run_dir, compute_estimate=False)
    gate = next(g for g in report.gates if g.exp_id == "S_x05_run1")
    assert gate.source == "run.json" and gate.verdict == toy["verdict"] and gate.experiment == "S"
    # A rerun restores the step from its cache (Method.restore) and keeps the record.
    logs.clear()
    again = PlanRunner(load_plan(project / "plan.yaml"), tmp_path, log=logs.append).run()
    assert again[1].cached and any("cached" in m for m in logs)
    assert again[1].record.delta1 == statuses[1].record.delta1


def test_plan_validation_and_budget_go_through_the_registry(toy_method, project, tmp_path) -> None:
    from pqk.pipeline.budget import estimate_plan
    from pqk.pipeline.plan import load_plan

    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load((project / "plan.yaml").read_text())
    raw["experiments"][1]["steps"][0]["facto"] = 2
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="unknown option 'facto' for toy_scale; accepted: factor"):
        load_plan(bad)
    raw["experiments"][1]["steps"][0] = {"method": "toy_scale", "config": str(project / "toy_scale.yaml"), "factor": -1}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="factor -1.0 must be > 0"):
        load_plan(bad).validate_specs()  # checked whole before any step runs
    result = estimate_plan(project / "plan.yaml", "cpu", 1.0, 1.0, probe_steps=1)
    assert any("no cost model for method 'toy_scale'" in n for n in result["notes"])


def test_registry_errors_name_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'sparsify'; accepted: ") as info:
        get_method("sparsify")
    # registration order follows import order (a test may import a method module first)
    assert {"distill", "prune", "quantize", "joint", "cascade"} <= set(str(info.value).split("accepted: ")[1].split(", "))

    class Nameless(Method):
        letter = "N"
        default_config = "x.yaml"

    with pytest.raises(ConfigError, match="must set 'name'"):
        register(Nameless)
    from pqk.tasks import get_task, task_names

    assert "dust3r" in task_names() and get_task().main_metric == "delta1"
    with pytest.raises(ConfigError, match="unknown task 'clip"):
        get_task("clip-x")


def test_pipeline_knows_no_method_or_family_by_name() -> None:
    """The seams hold: the runner, plan reader, budget, evaluation and report name no built-in
    method and import nothing DUSt3R-specific."""
    src = REPO / "src" / "pqk"
    files = ["pipeline/runner.py", "pipeline/plan.py", "pipeline/budget.py", "pipeline/evaluate.py", "pipeline/gates.py"]
    for rel in files:
        text = (src / rel).read_text()
        code = re.sub(r'""".*?"""', "", text, flags=re.S)
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        assert not re.search(r"""["'](distill|prune|quantize|joint)["']""", code), rel
        assert "models.dust3r" not in code and "tasks.dust3r" not in code, rel


def test_readme_python_api_example_runs(tmp_path, monkeypatch) -> None:
    import pqk

    for name in ("distill", "prune", "quantize", "evaluate", "run_plan"):
        assert callable(getattr(pqk, name))
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs" / "api" / "pruned_int8.onnx").is_file()
