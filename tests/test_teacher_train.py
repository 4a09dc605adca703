"""The teacher trainer: the loss behaves, a run killed mid-way resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KWARGS
from pqk.train.losses import conf_regression_loss, normalize_pair
from pqk.train.teacher import Stage, TeacherRecipe, train_teacher


def _recipe() -> TeacherRecipe:
    return TeacherRecipe(
        model_kwargs=dict(TINY_KWARGS),
        stages=[Stage(64, 48, 6, 2, 1e-3, 2), Stage(96, 64, 4, 2, 5e-4, 2)],
        warmup_steps=2, val_scenes=1, val_pairs=2, checkpoint_every=2, views_per_scene=4,
    )


def test_normalization_removes_global_scale():
    pts1, pts2 = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    a1, a2 = normalize_pair(pts1, pts2, valid, valid)
    b1, b2 = normalize_pair(3.5 * pts1, 3.5 * pts2, valid, valid)
    torch.testing.assert_close(a1, b1)
    torch.testing.assert_close(a2, b2)


def test_loss_is_minimal_at_ground_truth_up_to_scale():
    gt = {"pts1": torch.rand(1, 4, 4, 3) + 1, "pts2": torch.rand(1, 4, 4, 3) + 1,
          "valid1": torch.ones(1, 4, 4, dtype=torch.bool), "valid2": torch.ones(1, 4, 4, dtype=torch.bool)}
    conf = torch.full((1, 4, 4), 2.0)
    exact, logs = conf_regression_loss({"pts3d": 2 * gt["pts1"], "conf": conf},
                                       {"pts3d_in_other_view": 2 * gt["pts2"], "conf": conf}, gt)
    off, _ = conf_regression_loss({"pts3d": gt["pts1"] + 0.3, "conf": conf},
                                  {"pts3d_in_other_view": gt["pts2"], "conf": conf}, gt)
    assert logs["regr1"] < 1e-6 and exact < off
    assert float(exact) == pytest.approx(-2 * 0.2 * float(torch.log(torch.tensor(2.0))), abs=1e-5)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    full, _ = train_teacher(_recipe(), tmp_path / "full", log=lambda _m: None)

    class Kill(Exception):
        pass

    def die(done, total, logs):
        if done == 7:  # mid stage 2, one step after a checkpoint
            raise Kill

    with pytest.raises(Kill):
        train_teacher(_recipe(), tmp_path / "killed", log=lambda _m: None, on_step=die)
    assert (tmp_path / "killed" / "last.pth").exists()
    resumed, record = train_teacher(_recipe(), tmp_path / "killed", log=lambda _m: None)
    assert record["steps_this_run"] == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
