"""Every bad input is one line and nothing half-written: a table of broken files and values for
the commands a user types (plans, workloads, configs, checkpoints, tables, sizes), each run
through the command line in-process (the same `app` `pqk` runs; `pqk.cli.main` turns the
PqkError into "error: ..." and exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY_KWARGS
from pqk.errors import PqkError

BINARY = bytes(range(256)) * 4  # not UTF-8, not YAML, not a checkpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from pqk.models.dust3r import build_model, save_model
    from pqk.tasks.dust3r.workload import make_workload, save_workload

    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(42)
    model = build_model(**TINY_KWARGS)
    save_model(model, root / "tiny.safetensors")
    nan = build_model(**TINY_KWARGS)
    with torch.no_grad():
        nan.enc_blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    save_model(nan, root / "nan.safetensors")
    w = make_workload(n_pairs=2, n_scenes=1, views=4, resolution=64, real_check=False, scene_level=0)
    save_workload(w, root / "workload.yaml")
    (root / "binary.bin").write_bytes(BINARY)
    (root / "quant.yaml").write_text("calibration: {size: 4}\n")
    (root / "distill.yaml").write_text("runs:\n  K-1: {T: 3, beta: 0.5}\n")
    (root / "prune.yaml").write_text("allocation: uniform\n")
    return root


def _workload(project: Path, name: str, **changes) -> Path:
    raw = yaml.safe_load((project / "workload.yaml").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            raw[outer][inner] = value
        else:
            raw[key] = value
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _plan(project: Path, name: str, steps: list | None = None, **top) -> Path:
    plan = {"name": "p", "teacher": str(project / "tiny.safetensors"), "workload": str(project / "workload.yaml"),
            "experiments": [{"id": "baseline", "steps": []}, {"id": "X", "steps": steps or []}], **top}
    path = project / f"plan_{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _safetensors_with_metadata(project: Path, name: str, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path = project / f"{name}.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def _step(method: str, config: str, **options) -> dict:
    return {"method": method, "config": config, **options}


# (case id, builder of the argument list given the project folder and an output folder, words in the error)
CASES = [
    # plans
    ("plan-binary", lambda p, o: ["run", str(p / "binary.bin"), "--out", o], ["not a text file"]),
    ("plan-missing", lambda p, o: ["run", str(p / "nope.yaml"), "--out", o], ["does not exist"]),
    ("plan-list", lambda p, o: ["run", str(_write(p, "list.yaml", "- a\n- b\n")), "--out", o], ["must be a mapping"]),
    ("plan-bad-yaml", lambda p, o: ["run", str(_write(p, "bad.yaml", "name: [x\n")), "--out", o], ["not valid YAML"]),
    ("plan-unknown-key", lambda p, o: ["run", str(_plan(p, "uk", extra=1)), "--out", o], ["unknown key 'extra'"]),
    ("plan-unknown-method", lambda p, o: ["run", str(_plan(p, "um", [_step("sparsify", "x.yaml")])), "--out", o],
     ["unknown method 'sparsify'", "accepted"]),
    ("plan-unknown-option", lambda p, o: ["run", str(_plan(p, "uo", [_step("prune", str(p / "prune.yaml"), rhoo=0.3)])),
                                          "--out", o], ["unknown option 'rhoo'"]),
    ("plan-missing-config", lambda p, o: ["run", str(_plan(p, "mc", [_step("quantize", "no/such.yaml")])), "--out", o],
     ["does not exist"]),
    ("plan-budget-string", lambda p, o: ["run", str(_plan(p, "bs", budget="lots")), "--out", o], ["budget"]),
    ("plan-budget-negative", lambda p, o: ["run", str(_plan(p, "bn", budget=-1)), "--out", o], ["budget"]),
    ("plan-gate-policy", lambda p, o: ["run", str(_plan(p, "gp", gate_policy="maybe")), "--out", o], ["gate_policy"]),
    ("plan-task", lambda p, o: ["run", str(_plan(p, "tk", task="clipx")), "--out", o], ["unknown task"]),
    ("plan-quantize-not-last", lambda p, o: ["run", str(_plan(p, "ql", [_step("quantize", str(p / "quant.yaml")),
                                                                         _step("distill", str(p / "distill.yaml"))])),
                                             "--out", o], ["quantize must come last"]),
    ("plan-unknown-run", lambda p, o: ["run", str(_plan(p, "ur", [_step("distill", str(p / "distill.yaml"), run="K-9")])),
                                       "--out", o], ["'K-9'", "K-1"]),
    ("plan-negative-calibration", lambda p, o: ["run", str(_plan(p, "nc", [_step("quantize", str(p / "quant.yaml"),
                                                                                  calibration_size=-4)])), "--out", o],
     ["calibration"]),
    ("plan-rho-7", lambda p, o: ["run", str(_plan(p, "r7", [_step("prune", str(p / "prune.yaml"), rho=7)])), "--out", o],
     ["rho"]),
    ("plan-bad-exp-id", lambda p, o: ["run", str(_write(p, "be.yaml", yaml.safe_dump(
        {"name": "p", "experiments": [{"id": "a", "exp_id": "../x", "steps": []}]}))), "--out", o], ["exp_id"]),
    ("plan-gate-stage", lambda p, o: ["run", str(_plan(p, "gs", gates={"P9": {"max_quality_drop": 0.1}})), "--out", o],
     ["unknown stage 'P9'"]),
    ("plan-gate-value", lambda p, o: ["run", str(_plan(p, "gv", gates={"P1": {"max_quality_drop": "1%"}})), "--out", o],
     ["must be a number"]),
    ("plan-bad-name", lambda p, o: ["run", str(_write(p, "bnm.yaml", yaml.safe_dump(
        {"name": "../up", "experiments": [{"id": "a", "steps": []}]}))), "--out", o], ["name"]),
    ("run-only-unknown", lambda p, o: ["run", str(_plan(p, "ok")), "--only", "ZZ", "--out", o], ["'ZZ' is not in plan"]),
    ("run-gate-policy-option", lambda p, o: ["run", str(_plan(p, "ok")), "--gate-policy", "x", "--out", o],
     ["--gate-policy"]),
    ("run-budget-option", lambda p, o: ["run", str(_plan(p, "ok")), "--budget", "0", "--out", o], ["--budget"]),
    # workloads (pqk eval reads one before anything is written)
    ("workload-binary", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w", str(p / "binary.bin"), "-o", o],
     ["not a text file"]),
    ("workload-missing", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w", str(p / "none.yaml"), "-o", o],
     ["pqk workload make"]),
    ("workload-pairs-string", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                            str(_workload(p, "w1", pairs="all")), "-o", o], ["pairs must be a list"]),
    ("workload-resolution-string", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                                 str(_workload(p, "w2", resolution="512")), "-o", o], ["resolution"]),
    ("workload-seeds-int", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                         str(_workload(p, "w3", **{"data.seeds": 42})), "-o", o], ["data.seeds"]),
    ("workload-view-past-scene", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                               str(_edited_pairs(p, "w4", 9)), "-o", o], ["has 4 views"]),
    ("workload-edited-pairs", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                            str(_edited_pairs(p, "w5", 3)), "-o", o], ["pair list changed"]),
    ("workload-unknown-field", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                             str(_workload(p, "w6", colour="red")), "-o", o], ["unknown field"]),
    ("workload-ga-lr", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                     str(_workload(p, "w7", ga_lr="fast")), "-o", o], ["ga_lr"]),
    ("workload-data-kind", lambda p, o: ["eval", "-m", str(p / "tiny.safetensors"), "-w",
                                         str(_workload(p, "w8", **{"data.kind": "magic"})), "-o", o], ["kind"]),
    # method configs
    ("quant-config-binary", lambda p, o: ["quantize", "-m", str(p / "tiny.safetensors"), "-c", str(p / "binary.bin"),
                                          "-w", str(p / "workload.yaml"), "-o", o], ["not a text file"]),
    ("prune-config-binary", lambda p, o: ["prune", "-m", str(p / "tiny.safetensors"), "-c", str(p / "binary.bin"),
                                          "-w", str(p / "workload.yaml"), "-o", o], ["not a text file"]),
    ("distill-config-binary", lambda p, o: ["distill", "-t", str(p / "tiny.safetensors"), "-c", str(p / "binary.bin"),
                                            "-w", str(p / "workload.yaml"), "-o", o], ["not a text file"]),
    ("quantize-runtime", lambda p, o: ["quantize", "--runtimes", "tensorrt", "-o", o], ["--runtimes value 'tensorrt'"]),
    ("quantize-qat", lambda p, o: ["quantize", "--qat", "sometimes", "-o", o], ["--qat value 'sometimes'"]),
    ("prune-rho", lambda p, o: ["prune", "--rho", "1.5", "-o", o], ["1.5"]),
    ("prune-rho-text", lambda p, o: ["prune", "--rho", "0.1,abc", "-o", o], ["'abc'"]),
    ("prune-allocation", lambda p, o: ["prune", "-c", str(p / "prune.yaml"), "--allocation", "greedy", "-o", o],
     ["--allocation 'greedy'"]),
    ("distill-runs", lambda p, o: ["distill", "-c", str(p / "distill.yaml"), "--runs", "K-9", "-o", o], ["'K-9'"]),
    # checkpoints
    ("checkpoint-nan", lambda p, o: ["eval", "-m", str(p / "nan.safetensors"), "-w", str(p / "workload.yaml"), "-o", o],
     ["NaN or infinite", "enc_blocks.0.mlp.fc1.weight"]),
    ("checkpoint-bad-metadata", lambda p, o: ["eval", "-m", str(_safetensors_with_metadata(p, "bm", {"pqk_config": "{oops"})),
                                              "-w", str(p / "workload.yaml"), "-o", o], ["not valid JSON"]),
    ("checkpoint-absurd-size", lambda p, o: ["eval", "-m", str(_safetensors_with_metadata(
        p, "huge", {"pqk_config": json.dumps({**TINY_KWARGS, "enc_embed_dim": 1_000_000, "enc_num_heads": 1000})})),
        "-w", str(p / "workload.yaml"), "-o", o], ["billion parameters"]),
    ("checkpoint-binary", lambda p, o: ["eval", "-m", str(_write_bytes(p, "junk.pth")), "-w", str(p / "workload.yaml"),
                                        "-o", o], ["junk.pth"]),
    ("checkpoint-missing", lambda p, o: ["eval", "-m", str(p / "none.pth"), "-w", str(p / "workload.yaml"), "-o", o],
     ["does not exist"]),
    ("infer-checkpoint-nan", lambda p, o: ["infer", "--demo-pair", "-c", str(p / "nan.safetensors"), "-o", o],
     ["NaN or infinite"]),
    # tables, exports, other options
    ("report-binary-table", lambda p, o: ["report", str(_folder_with(p, "rb", "result_table.csv", BINARY)), "--no-estimate"],
     ["not a text file"]),
    ("report-missing", lambda p, o: ["report", str(p / "no_run")], ["does not exist"]),
    ("export-huge", lambda p, o: ["export", "onnx", "-c", str(p / "tiny.safetensors"), "--height", "1048576",
                                  "--width", "512", "-o", f"{o}/m.onnx"], ["above the 4096 px"]),
    ("export-not-multiple", lambda p, o: ["export", "onnx", "-c", str(p / "tiny.safetensors"), "--height", "100",
                                          "-o", f"{o}/m.onnx"], ["multiple of the patch size"]),
    ("export-onto-folder", lambda p, o: ["export", "onnx", "-c", str(p / "tiny.safetensors"), "-o", str(p / "dir.onnx")],
     ["is a folder"]),
    ("workload-make-onto-folder", lambda p, o: ["workload", "make", "--out", str(p)], ["is a folder"]),
    ("eval-exp-id", lambda p, o: ["eval", "--exp-id", "../../escape", "-o", o], ["exp_id"]),
    ("budget-gpu", lambda p, o: ["budget", str(_plan(p, "ok")), "--gpu", "tpu"], ["tpu"]),
    ("budget-rate", lambda p, o: ["budget", str(_plan(p, "ok")), "--rate", "-3"], ["--rate"]),
    ("budget-speedup", lambda p, o: ["budget", str(_plan(p, "ok")), "--h100-speedup", "fast"], ["--h100-speedup"]),
]

# Neighbours: every typed field of a workload, a plan's top-level values and each method
# config's values, with the wrong type or out of range.
for _field in ("resolution", "batch_size", "n_pairs", "ga_niter", "ga_stride"):
    for _k, _bad in enumerate(("many", -3, True, 0)):
        CASES.append((f"workload-{_field}-{_k}", lambda p, o, f=_field, b=_bad, k=_k: [
            "eval", "-m", str(p / "tiny.safetensors"), "-w", str(_workload(p, f"w_{f}_{k}", **{f: b})), "-o", o], [_field]))
for _k, _bad in enumerate(([1], {"a": 1}, 4)):
    CASES.append((f"workload-scene-graph-{_k}", lambda p, o, b=_bad, k=_k: [
        "eval", "-m", str(p / "tiny.safetensors"), "-w", str(_workload(p, f"w_sg_{k}", scene_graph=b)), "-o", o],
        ["scene_graph"]))
for _k, _bad in enumerate(("big", [1], True, 0, None)):
    CASES.append((f"plan-budget-{_k}", lambda p, o, b=_bad, k=_k: ["run", str(_plan(p, f"b{k}", budget=b)), "--out", o],
                  ["budget"]))
_CONFIG_CASES = {
    "quantize": ("quant", [({"bits_w": 4}, "bits"), ({"weights": "fancy"}, "weights"), ({"activations": "x"}, "activations"),
                           ({"keep_list": ["Foo"]}, "Foo"), ({"calibration": {"size": "a"}}, "size"),
                           ({"calibration": {"size": 0}}, "size"), ({"calibration": {"method": "magic"}}, "magic"),
                           ({"colour": 1}, "colour")]),
    "prune": ("prune", [({"rho": 7}, "rho"), ({"rho": -0.1}, "rho"), ({"allocation": "x"}, "allocation"),
                        ({"importance": "x"}, "importance"), ({"min_heads": -1}, "min_heads"),
                        ({"sensitivity_ratios": "a"}, "sensitivity_ratios"), ({"colour": 1}, "colour")]),
    "distill": ("distill", [({"runs": {"K-1": {"T": 0}}}, "T"), ({"runs": {"K-1": {"beta": -1}}}, "beta"),
                            ({"runs": {"K-1": {"ratio": 1.5}}}, "ratio"), ({"runs": "K-1"}, "runs"),
                            ({"runs": {"K-1": {"colour": 1}}}, "colour"), ({"train": {"epochs": -1}, "runs": {"K-1": {}}}, "epochs")]),
}
for _method, (_stem, _bad_configs) in _CONFIG_CASES.items():
    for _k, (_cfg, _word) in enumerate(_bad_configs):
        CASES.append((f"plan-{_stem}-config-{_k}", lambda p, o, m=_method, st=_stem, c=_cfg, k=_k: [
            "run", str(_plan(p, f"{st}{k}", [_step(m, str(_write(p, f"{st}_bad{k}.yaml", yaml.safe_dump(c))))])),
            "--out", o], [_word]))

_EXPERIMENTS = [
    ("empty", {"experiments": []}, "non-empty 'experiments'"),
    ("not-list", {"experiments": "K"}, "non-empty 'experiments'"),
    ("no-id", {"experiments": [{"steps": []}]}, "needs an 'id'"),
    ("duplicate-id", {"experiments": [{"id": "a", "steps": []}, {"id": "a", "steps": []}]}, "used twice"),
    ("steps-string", {"experiments": [{"id": "a", "steps": "distill"}]}, "'steps' must be a list"),
    ("step-string", {"experiments": [{"id": "a", "steps": ["distill"]}]}, "a step is a mapping"),
    ("ablation", {"experiments": [{"id": "a", "steps": [], "ablation": "speed"}]}, "ablation 'speed'"),
    ("teacher-number", {"teacher": 5, "experiments": [{"id": "a", "steps": []}]}, "teacher must be a file path"),
    ("workload-number", {"workload": 5, "experiments": [{"id": "a", "steps": []}]}, "workload must be a file path"),
    ("experiment-key", {"experiments": [{"id": "a", "steps": [], "colour": 1}]}, "unknown key 'colour'"),
    ("config-number", {"experiments": [{"id": "a", "steps": [{"method": "prune", "config": 3}]}]}, "config must be a file path"),
    ("gates-list", {"gates": [1], "experiments": [{"id": "a", "steps": []}]}, "gates must map stages"),
]
for _name, _raw, _word in _EXPERIMENTS:
    CASES.append((f"plan-{_name}", lambda p, o, n=_name, r=_raw: [
        "run", str(_write(p, f"pe_{n}.yaml", yaml.safe_dump({"name": "p", **r}))), "--out", o], [_word]))
_OPTIONS = [
    ("prune", "prune", {"rho": "a"}, "rho"), ("prune", "prune", {"allocation": "greedy"}, "allocation"),
    ("quantize", "quant", {"runtimes": "tensorrt"}, "tensorrt"), ("quantize", "quant", {"qat": "maybe"}, "maybe"),
    ("quantize", "quant", {"keep_list": ["Foo"]}, "Foo"), ("distill", "distill", {"gamma": "x"}, "gamma"),
    ("distill", "distill", {"gamma": -1}, "gamma"),
]
for _k, (_method, _stem, _opts, _word) in enumerate(_OPTIONS):
    CASES.append((f"plan-option-{_method}-{_k}", lambda p, o, m=_method, st=_stem, op=_opts, k=_k: [
        "run", str(_plan(p, f"opt{k}", [_step(m, str(p / f"{st}.yaml"), **op)])), "--out", o], [_word]))


def _write(project: Path, name: str, text: str) -> Path:
    (project / name).write_text(text)
    return project / name


def _write_bytes(project: Path, name: str) -> Path:
    (project / name).write_bytes(BINARY)
    return project / name


def _folder_with(project: Path, folder: str, name: str, data: bytes) -> Path:
    (project / folder).mkdir(exist_ok=True)
    (project / folder / name).write_bytes(data)
    return project / folder


def _edited_pairs(project: Path, name: str, view: int) -> Path:
    raw = yaml.safe_load((project / "workload.yaml").read_text())
    raw["pairs"][0][2] = view  # the pair list edited after the workload was frozen
    if view >= 4:
        raw.pop("pairs_hash")  # an older workload (no pairs hash): the view index itself is checked
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, project, tmp_path) -> None:
    from pqk.cli import app

    (project / "dir.onnx").mkdir(exist_ok=True)
    name, build, words = case
    out = tmp_path / "out"
    result = CliRunner().invoke(app, build(project, str(out)))
    exc = result.exception
    assert isinstance(exc, PqkError), f"{name}: exit {result.exit_code}, {type(exc).__name__}: {exc}\n{result.output[-2000:]}"
    message = str(exc)
    assert "\n" not in message.strip(), message
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert not out.exists() or not any(out.rglob("*")), f"{name}: wrote {sorted(out.rglob('*'))}"
