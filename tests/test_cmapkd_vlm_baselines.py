"""The seed's VLM baselines (PromptKD, C2KD, LLaVA-KD) transferred to a dual-encoder student: each
trains in the shared harness, C2KD's on-the-fly selection picks the right rows, LLaVA-KD's stages
switch on schedule with the text tower frozen in DPT, and the method reads their runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pqk.methods.clip.train import ClipTrainSpec, train_student
from pqk.methods.cmapkd import baselines_vlm as vlm
from pqk.models.clip import CLIP

TEACHER = dict(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
               context_length=32, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=4)
STUDENT = {**TEACHER, "embed_dim": 16, "vision_layers": 2, "transformer_layers": 2}
SPEC = ClipTrainSpec(n_train=16, n_val=16, epochs=4, batch_size=16, warmup_steps=1)  # one step an epoch
CLASSES = {"promptkd": vlm.PromptKDObjective, "c2kd": vlm.C2KDObjective, "llavakd": vlm.LLaVAKDObjective}
LOGS = {"promptkd": {"loss_kd", "loss_task"}, "c2kd": {"loss_proxy", "loss_cross", "loss_task", "selected"},
        "llavakd": {"stage"}}


def _models() -> tuple[CLIP, CLIP]:
    torch.manual_seed(0)
    teacher = CLIP(**TEACHER).eval()
    torch.manual_seed(1)
    return teacher, CLIP(**STUDENT)


def _text_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_vlm_baseline_trains_the_student(tmp_path: Path, name: str) -> None:
    teacher, student = _models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    snapshots: list[dict[str, torch.Tensor]] = []

    def log(message: str) -> None:
        if message.startswith("epoch "):
            snapshots.append({k: v.clone() for k, v in student.state_dict().items()})

    objective = CLASSES[name](SPEC, teacher, student)
    modules_before = {k: v.clone() for k, v in objective.modules.state_dict().items()}
    student, history, _ = train_student(student, teacher, SPEC, tmp_path, log=log, objective=objective)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(LOGS[name] <= set(h) for h in history)
    assert all(torch.isfinite(torch.tensor(v)) for h in history for k, v in h.items() if k.startswith("loss"))
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    assert any(not torch.equal(v, modules_before[k]) for k, v in objective.modules.state_dict().items())
    if name == "llavakd":  # 4 epochs: DPT, SFT, DFT, DFT; DPT leaves the text tower (and logit scale) alone
        assert [h["stage"] for h in history] == ["dpt", "sft", "dft", "dft"]
        assert {"loss_feature"} <= set(history[0]) and {"loss_kd", "loss_relation"} <= set(history[2])
        after_dpt = snapshots[0]
        for key, value in _text_tower(before).items():
            assert torch.equal(after_dpt[key], value), key
        assert not torch.equal(after_dpt["visual.conv1.weight"], before["visual.conv1.weight"])
        assert not torch.equal(snapshots[1]["token_embedding.weight"], before["token_embedding.weight"])


def test_llavakd_stages_split_one_one_two() -> None:
    def stages(epochs: int) -> list[str]:
        return [vlm.llavakd_stage(e, epochs) for e in range(epochs)]

    assert stages(8) == ["dpt"] * 2 + ["sft"] * 2 + ["dft"] * 4
    assert stages(4) == ["dpt", "sft", "dft", "dft"]
    assert stages(3) == ["dpt", "sft", "dft"]
    assert stages(1) == ["dft"] and stages(2) == ["dft", "dft"]
    teacher, student = _models()
    objective = vlm.LLaVAKDObjective(SPEC, teacher, student)
    assert [objective.lr_scale(e, "projector") for e in range(4)] == [1.0, 0.0, 0.0, 0.0]
    assert [objective.lr_scale(e, "student") for e in range(4)] == [1.0] * 4


def test_c2kd_selection_on_a_hand_made_case() -> None:
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    student = torch.tensor([[3.0, 2.0, 1.0, 0.0],   # same ranking: tau 1
                            [0.0, 1.0, 2.0, 3.0],   # reversed: tau -1
                            [3.0, 0.0, 1.0, 2.0],   # same top-1, the rest reversed: tau 0
                            [2.0, 3.0, 1.0, 0.0]])  # top-1 swapped, the rest agrees: tau 4/6
    tau = vlm.kendall_tau_rows(teacher, student)
    assert torch.allclose(tau, torch.tensor([1.0, -1.0, 0.0, 2 / 3]))
    assert vlm.c2kd_selection(student, teacher).tolist() == [True, False, False, True]
    assert vlm.c2kd_selection(student, teacher, "top1").tolist() == [True, False, True, False]
    assert vlm.c2kd_selection(student, teacher, threshold=0.9).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="selection rule 'x'"):
        vlm.c2kd_selection(student, teacher, "x")


def test_c2kd_distils_only_selected_rows_on_non_target_columns() -> None:
    s, t = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    assert vlm.off_diagonal(torch.arange(9.0).view(3, 3)).tolist() == [[1, 2], [3, 5], [6, 7]]
    keep = torch.tensor([True, False, True, False])
    full = vlm.row_kl(s, t, 2.0)
    masked = vlm.row_kl(s, t, 2.0, keep)
    assert 0 < masked < full
    assert vlm.row_kl(s, t, 2.0, torch.zeros(4, dtype=torch.bool)) == 0
    masked.backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[3].abs().sum() == 0 and s.grad[0].abs().sum() > 0


def test_the_method_reads_the_vlm_runs() -> None:
    from pqk.methods.base import get_method
    from pqk.methods.cmapkd.method import _objective

    method = get_method("cmapkd", "clip")
    teacher, student = _models()
    for run, objective in (("PromptKD", "promptkd"), ("C2KD", "c2kd"), ("LLaVA-KD", "llavakd")):
        spec = method.load_spec(Path("configs/clip/cmapkd.yaml"), {"run": run, "seed": 3})
        assert spec.objective == objective and spec.spec.train.seed == 3 and spec.spec.train.kd_weight > 0
        assert isinstance(_objective(spec, spec.spec, teacher, student), CLASSES[objective])
    assert method.keyparams({"run": "LLaVA-KD", "seed": 43}, None) == "LLaVAKD_s43"
