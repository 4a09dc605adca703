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
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    if name == "cmapkd":  # the progressive stages: coarse, medium, fine, then ALSN alone
        assert [h["stage"] for h in history] == ["coarse", "medium", "fine", "alsn"]
        assert all(abs(sum(h["w_v"]) - 1) < 1e-3 for h in history)


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
