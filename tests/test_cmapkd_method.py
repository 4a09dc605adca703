"""CMAPKD and its baselines in the shared harness: every objective trains, the registered method
reads its runs, and a killed run resumes to the same final weights."""

from __future__ import annotations

import pytest
import torch

from pqk.errors import ConfigError
from pqk.methods.clip.train import ClipTrainSpec, Objective, train_student
from pqk.models.clip import CLIP

TEACHER = dict(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
               context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=4)
STUDENT = {**TEACHER, "embed_dim": 16, "vision_layers": 2, "transformer_layers": 2}
SPEC = ClipTrainSpec(n_train=64, n_val=16, epochs=3, batch_size=16, warmup_steps=1)


def _models():
    torch.manual_seed(0)
    teacher = CLIP(**TEACHER).eval()
    torch.manual_seed(1)
    return teacher, CLIP(**STUDENT)


def _objective(name: str, teacher, student, spec=SPEC):
    from pqk.methods.cmapkd.baselines import ClipKDObjective, FitNetObjective
    from pqk.methods.cmapkd.objective import CmapkdObjective, CmapkdSpec

    if name == "cmapkd":
        return CmapkdObjective(CmapkdSpec(train=spec, channels=8), teacher, student)
    if name == "one_stage":
        return CmapkdObjective(CmapkdSpec(train=spec, channels=8, schedule="one_stage", alsn="manual"), teacher, student)
    if name == "fitnet":
        return FitNetObjective(spec, teacher, student)
    if name == "clipkd":
        return ClipKDObjective(spec, teacher, student)
    return Objective(spec)


@pytest.mark.parametrize("name", ["cmapkd", "one_stage", "fitnet", "clipkd", "kd"])
def test_every_objective_trains_the_student(tmp_path, name):
    teacher, student = _models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    spec = ClipTrainSpec(n_train=32, n_val=16, epochs=4, batch_size=16, warmup_steps=1)
    student, history, _ = train_student(student, teacher, spec, tmp_path, log=lambda m: None,
                                        objective=_objective(name, teacher, student, spec))
    # CMAPKD's progressive schedule adds its ALSN-only epoch after the student's four
    assert len(history) == (5 if name == "cmapkd" else 4) and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    if name == "cmapkd":  # the progressive stages: coarse, medium, fine, then ALSN alone
        assert [h["stage"] for h in history] == ["coarse", "medium", "fine", "fine", "alsn"]
        assert all(abs(sum(h["w_v"]) - 1) < 1e-3 for h in history)
        assert history[-1]["val_r_mean"] == history[-2]["val_r_mean"]  # ALSN alone leaves the student as it was


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    teacher, student = _models()
    full, _, _ = train_student(student, teacher, SPEC, tmp_path / "a", log=lambda m: None,
                               objective=_objective("cmapkd", teacher, student))
    reference = {k: v.clone() for k, v in full.state_dict().items()}

    class Killed(Exception):
        pass

    def kill_at_second_epoch(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise Killed

    teacher, student = _models()
    with pytest.raises(Killed):
        train_student(student, teacher, SPEC, tmp_path / "b", log=kill_at_second_epoch,
                      objective=_objective("cmapkd", teacher, student))
    teacher, student = _models()
    resumed, _, _ = train_student(student, teacher, SPEC, tmp_path / "b", log=lambda m: None,
                                  objective=_objective("cmapkd", teacher, student))
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_the_method_reads_its_runs(tmp_path):
    from pqk.methods.base import get_method

    method = get_method("cmapkd", "clip")
    config = "configs/clip/cmapkd.yaml"
    from pathlib import Path

    run = method.load_spec(Path(config), {"run": "ALSN-manual", "seed": 7})
    assert run.objective == "cmapkd" and run.spec.alsn == "manual" and run.spec.train.seed == 7
    assert method.load_spec(Path(config), {"run": "Scratch"}).spec.train.kd_weight == 0
    assert method.keyparams({"run": "CLIP-KD", "seed": 43}, None) == "CLIPKD_s43"
    with pytest.raises(ConfigError, match="cmapkd run 'nope' is not in"):
        method.load_spec(Path(config), {"run": "nope"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {embed_dim: 8}\nruns: {X: {objective: cmapkd, alsn: clever}}\n")
    with pytest.raises(ConfigError, match="alsn 'clever' is not accepted"):
        method.load_spec(bad, {})


def test_figure_data_has_what_the_report_plots():
    from pqk.data.captions import generate_caption_set
    from pqk.methods.cmapkd.objective import CmapkdObjective, CmapkdSpec, figure_data

    teacher, student = _models()
    objective = CmapkdObjective(CmapkdSpec(train=SPEC, channels=8), teacher, student)
    data = figure_data(objective, teacher, student.eval(), generate_caption_set(24, 7, "test", 32), tsne_samples=12)
    assert len(data["alsn"]["difficulty"]) == 24 and len(data["alsn"]["w_v"][0]) == 4
    assert set(data["sample_types"]) == {"simple scene", "many objects", "small objects", "abstract caption"}
    assert len(data["tsne"]["points"]) == 2 * 4 * 12 == len(data["tsne"]["model"])
    assert len(data["cross_modal"]) == 4 and len(data["cross_modal"][0]) == 4


def test_teacher_targets_are_kept_per_teacher_and_set():
    from pqk.methods.clip import teacher_cache

    teacher = torch.nn.Linear(2, 2)
    calls = []

    def compute():
        calls.append(1)
        return torch.zeros(4)

    a = teacher_cache.kept(teacher, "kind", "set-1", compute, log=lambda m: None)
    b = teacher_cache.kept(teacher, "kind", "set-1", compute, log=lambda m: None)
    teacher_cache.kept(teacher, "kind", "set-2", compute, log=lambda m: None)
    teacher_cache.kept(torch.nn.Linear(2, 2), "kind", "set-1", compute, log=lambda m: None)  # another teacher
    assert a is b and len(calls) == 3
    big = teacher_cache.kept(teacher, "big", "set-1", lambda: torch.zeros(100), log=lambda m: None, limit_bytes=64)
    assert teacher_cache.kept(teacher, "big", "set-1", lambda: torch.ones(100), log=lambda m: None) is not big  # not kept
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert teacher_cache.set_key(images, ["a b", "c"]) != teacher_cache.set_key(images, ["a", "b c"])


def test_cmapkd_precomputed_teacher_side_equals_the_per_batch_one():
    """The teacher's pyramid outputs precomputed over the set (in fixed chunks) are the ones the
    per-batch path computes: only the GEMM blocking differs, so fp32 rounding (≤ 1e-5 relative)."""
    from pqk.data.captions.generated import generate_caption_set
    from pqk.methods.clip.train import Batch
    from pqk.methods.cmapkd.objective import teacher_side
    from pqk.models.clip.family import text_tokenizer
    from pqk.tasks.clip.measure import model_inputs

    teacher, student = _models()
    objective = _objective("cmapkd", teacher, student)
    data = generate_caption_set(20, 3, "train", 32)
    captions = [c for caps in data.captions for c in caps]
    objective.prepare(teacher, data, captions, lambda m: None)
    assert objective.targets is not None
    index = torch.tensor([3, 7, 19])
    caption = torch.tensor([9, 22, 57])
    batch = Batch(model_inputs(data.images[index]), None, text_tokenizer(teacher)([captions[i] for i in caption]),
                  index, caption)
    kept = objective.teacher_side(teacher, batch)
    fresh = teacher_side(teacher, objective.teacher_pyramid, batch.images, batch.teacher_tokens)
    for a, b in [*zip(kept.visual, fresh.visual), (kept.visual_levels, fresh.visual_levels),
                 (kept.image_features, fresh.image_features), (kept.language_levels, fresh.language_levels)]:
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def _caption_folder(root, n: int):
    """n small PNGs (a colour square on grey) with two captions each, in the caption-folder format."""
    import json

    import numpy as np
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
        x = 4 + (i * 7) % 20
        pixels[8:24, x:x + 16] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "captions": [f"a {name} square.", f"{name} on grey."]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_student_trains_on_a_users_caption_folder(tmp_path):
    from pqk.methods.clip.train import training_sets

    folder = _caption_folder(tmp_path / "coco_like", 30)
    spec = ClipTrainSpec.from_dict({"n_train": 100, "n_val": 6, "epochs": 2, "batch_size": 8, "warmup_steps": 1,
                                    "data": str(folder)}, "test")
    train, val = training_sets(spec, 32)
    assert (len(train), len(val)) == (24, 6)  # the last n_val captioned images are held out
    assert train.images.shape[-1] == 32 and train.captions[0] == ["a red square.", "red on grey."]
    from pqk.methods.cmapkd.objective import figure_data

    teacher, student = _models()
    objective = _objective("cmapkd", teacher, student, spec)
    student, history, _ = train_student(student, teacher, spec, tmp_path / "out", log=lambda m: None, objective=objective)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    figures = figure_data(objective, teacher, student, val, tsne_samples=6)  # a folder has no scene descriptions
    assert list(figures["sample_types"]) == ["abstract caption"] and len(figures["alsn"]["w_v"]) == 6
    with pytest.raises(ConfigError, match="must be a folder in the caption format"):
        ClipTrainSpec.from_dict({"data": str(tmp_path / "missing")}, "test")


def test_budget_costs_every_step_of_a_cmapkd_plan_and_the_teacher_targets_once(tmp_path):
    import yaml

    from pqk.pipeline.budget import estimate_plan

    config = yaml.safe_load(open("configs/clip/cmapkd.yaml"))
    config["student"] = {**STUDENT, "image_resolution": 64}  # the workload's resolution (its evaluation is billed)
    config["train"].update(n_train=64, n_val=16, batch_size=16)
    config["cmapkd"]["channels"] = 8
    (tmp_path / "cmapkd.yaml").write_text(yaml.safe_dump(config))
    steps = lambda run: [{"method": "cmapkd", "config": str(tmp_path / "cmapkd.yaml"), "run": run}]  # noqa: E731
    plan = {"name": "tiny", "task": "clip", "workload": "configs/workload_clip.yaml", "budget": 1.0,
            "experiments": [{"id": "baseline", "steps": []}, {"id": "CMAPKD", "steps": steps("CMAPKD")},
                            {"id": "KD", "steps": steps("KD")}, {"id": "Scratch", "steps": steps("Scratch")},
                            {"id": "Q", "steps": [*steps("CMAPKD"), {"method": "quantize", "config": "configs/clip/quant.yaml"}]}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    torch.manual_seed(0)
    teacher = CLIP(**{**TEACHER, "image_resolution": 64}).eval()
    result = estimate_plan(tmp_path / "plan.yaml", "cpu", 1.0, 1.0, teacher=teacher, probe_steps=1)
    assert not [n for n in result["notes"] if "no cost model" in n]
    items = {e["id"]: [i["what"] for i in e["items"]] for e in result["experiments"]}
    assert any(w.startswith("CMAPKD: 6 epochs + 2 ALSN-only x 4 steps") for w in items["CMAPKD"])
    assert sum("teacher targets" in w and "cached" not in w for e in items.values() for w in e) == 1  # once per plan
    assert not any("teacher targets" in w for w in items["Scratch"])
    assert any("PTQ calibration" in w for w in items["Q"])
