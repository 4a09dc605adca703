"""CMAPKD's losses and the baselines' losses against values worked out by hand (math, not the same torch code),
plus the identities the trainer relies on (zero at identity, ln N, invariances, gradient reaching the student only)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pqk.methods.cmapkd.losses import (
    LossWeights,
    affinity_mimic,
    align_loss,
    clip_task_loss,
    feature_mimic,
    fitnet_hint,
    hinton_kd,
    info_nce,
    intra_loss,
    layer_compatibility,
    layer_correlation,
    level_mse,
    pyramid_kl,
    relation_layer,
    relation_loss,
    relation_sample,
    similarity_matrix,
    total_loss,
)

E = math.e
P, Q = E / (1 + E), 1 / (1 + E)  # softmax of (1, 0): the recurring two-sample distribution at tau = 1


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def close(a: torch.Tensor, b: float, tol: float = 1e-5) -> bool:
    return abs(float(a.detach()) - b) < tol  # detach: some results carry a graph


def test_level_mse_vectors_tokens_and_mask():
    # (1,0) vs (0,1): unit distance² 2; (3,4) vs (3,4): 0 -- and scale must not matter.
    assert torch.allclose(level_mse(t([[1, 0], [3, 4]]), t([[0, 1], [6, 8]])), t([2, 0]))
    s, te = t([[[1, 0], [1, 0]]]), t([[[1, 0], [0, 1]]])
    assert close(level_mse(s, te)[0], 1.0)  # mean of 0 and 2
    assert close(level_mse(s, te, torch.tensor([[True, False]]))[0], 0.0)  # the mismatching token is padding
    assert close(level_mse(s, te, t([[0, 1]]))[0], 2.0)
    with pytest.raises(ValueError):
        level_mse(t([[1, 0]]), t([[1, 0]]), mask=t([[1]]))


def test_level_mse_resizes_student_map():
    student = t([1.0, 0.0]).view(1, 2, 1, 1)  # one pixel pointing along channel 0 -> constant after resizing
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, 0, 0, :] = 1  # top row along channel 0 (distance 0), bottom row along channel 1 (distance 2)
    teacher[0, 1, 1, :] = 1
    assert close(level_mse(student, teacher)[0], 1.0)
    assert close(level_mse(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 4, 4))[0], 0.0)


def test_intra_loss_weights_active_levels_and_identity():
    s = [t([[1, 0], [1, 0]]), t([[1, 0], [1, 0]]), t([[1, 0], [0, 1]]), t([[[1, 0], [1, 0]], [[1, 0], [1, 0]]])]
    te = [t([[0, 1], [1, 0]]), t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]]), t([[[1, 0], [0, 1]], [[1, 0], [1, 0]]])]
    # per-sample distances: level0 [2, 0], level1 [0, 2], level2 [0, 0], level3 tokens [1, 0] (or [0, 0] masked)
    w = t([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    full = ((0.1 * 2 + 0.4 * 1) / 4 + (0.25 * 2) / 4) / 2
    assert close(intra_loss(s, te, w), full)
    assert close(intra_loss(s, te, w, active=(0, 1)), ((0.1 * 2) / 2 + (0.25 * 2) / 2) / 2)  # 1/len(active)
    assert close(intra_loss(s, te, w, active=(3,)), (0.4 * 1 + 0) / 2)
    assert close(intra_loss(s, te, w, active=(3,), mask=t([[1, 0], [1, 1]])), 0.0)
    assert close(intra_loss(te, te, w), 0.0)


def test_info_nce_hand_values_limits():
    eye = t([[1, 0], [0, 1]])
    assert close(info_nce(eye, eye, tau=1.0), math.log(1 + 1 / E))
    # asymmetric case: image->text rows (1,0),(1,0); text->image rows (1,1),(0,0) -> ln 2 each
    i2t = 0.5 * (math.log(1 + 1 / E) + math.log(1 + E))
    assert close(info_nce(t([[1, 0], [1, 0]]), eye, tau=1.0), 0.5 * (i2t + math.log(2)))
    assert float(info_nce(torch.eye(3), torch.eye(3), tau=0.01)) < 1e-6  # separated pairs, tau -> 0
    same = torch.ones(5, 4)
    assert close(info_nce(same, 2 * same), math.log(5))  # all similarities equal -> ln N


def test_layer_compatibility():
    a2 = layer_compatibility(2)
    z = 2 + 2 / E
    assert torch.allclose(a2, t([[1 / z, 1 / E / z], [1 / E / z, 1 / z]]))
    a = layer_compatibility(4, sharpness=2.0)
    assert close(a.sum(), 1.0) and torch.allclose(a, a.t())
    for i in range(4):
        assert all(a[i, i] > a[i, j] for j in range(4) if j != i)


def _pyramid_pair(levels: int = 4):
    """Teacher images/texts orthonormal; student images both (1,0): KL 0 for image 0, (P-Q)·ln(P/Q) = (e-1)/(e+1)
    for image 1 whose student distribution is flipped."""
    rep = lambda x: t(x)[:, None, :].repeat(1, levels, 1)  # the same vectors at every level
    return rep([[1, 0], [0, 1]]), rep([[1, 0], [0, 1]]), rep([[1, 0], [1, 0]]), rep([[1, 0], [0, 1]])


def test_pyramid_kl_hand_value_and_identity():
    tv, tl, sv, sl = _pyramid_pair()
    alpha = layer_compatibility(4)
    kl = (E - 1) / (E + 1) / 2  # batch mean over the two images
    assert close(pyramid_kl(tv, tl, sv, sl, alpha, tau=1.0), kl / 16)
    assert close(pyramid_kl(tv, tl, tv, tl, alpha), 0.0)
    one_hot = torch.zeros(4, 4)
    one_hot[1, 2] = 1.0
    assert close(pyramid_kl(tv, tl, sv, sl, one_hot, tau=1.0), kl / 16)


def test_pyramid_kl_gradient_reaches_student_only():
    torch.manual_seed(0)
    tv, tl, sv, sl = (torch.randn(3, 4, 5, requires_grad=True) for _ in range(4))
    pyramid_kl(tv, tl, sv, sl, layer_compatibility()).backward()
    assert tv.grad is None and tl.grad is None
    assert sv.grad.abs().sum() > 0 and sl.grad.abs().sum() > 0


def test_other_terms_detach_teacher_but_train_student_and_alsn():
    torch.manual_seed(0)
    s_map, t_map = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 6, 6, requires_grad=True)
    s_lv, t_lv = torch.randn(2, 4, 4, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)
    w = torch.full((2, 4), 0.25, requires_grad=True)
    loss = intra_loss([s_map] * 4, [t_map] * 4, w) + relation_loss(t_lv[:, 0], s_lv[:, 0], t_lv, s_lv)
    loss.backward()
    assert t_map.grad is None and t_lv.grad is None
    assert s_map.grad.abs().sum() > 0 and s_lv.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_align_loss_sums_terms():
    tv, tl, sv, sl = _pyramid_pair()
    eye = t([[1, 0], [0, 1]])
    expected = math.log(1 + 1 / E) + 2.0 * (E - 1) / (E + 1) / 2 / 16
    got = align_loss(eye, eye, tv, tl, sv, sl, layer_compatibility(), beta=2.0, tau=1.0)
    assert close(got, expected)


def test_relation_sample_hand_value_dims_and_scaling():
    teacher, student = t([[1, 0], [0, 1]]), t([[1, 0, 0], [1, 0, 0]])  # G_T = I, G_S = all ones
    assert close(relation_sample(teacher, student), 2 / 4)
    assert close(relation_sample(teacher * t([[2], [5]]), student * t([[3], [0.5]])), 2 / 4)
    assert close(relation_sample(teacher, teacher), 0.0)
    assert torch.allclose(similarity_matrix(t([[3, 4], [4, -3]])), torch.eye(2))


def test_layer_correlation_and_relation_layer():
    r = layer_correlation(t([[[1, 0], [0, 1], [1, 1], [1, -1]]]))
    h = 1 / math.sqrt(2)
    assert torch.allclose(r, t([[1, 0, h, h], [0, 1, h, -h], [h, h, 1, 0], [h, -h, 0, 1]]), atol=1e-6)
    same = t([[[1, 0]] * 4])  # R_T all ones
    odd = t([[[1, 0], [0, 1], [1, 0], [1, 0]]])  # level 1 orthogonal to the rest: six zeros in R_S
    assert close(relation_layer(same, odd), 6.0)
    assert close(relation_loss(t([[1, 0], [0, 1]]), t([[1, 0], [1, 0]]), same, odd, gamma=0.3), 0.5 + 0.3 * 6)
    assert close(relation_loss(t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]]), odd, odd), 0.0)


def test_clip_task_loss():
    assert close(clip_task_loss(t([[1, 0], [0, 1]])), math.log(1 + 1 / E))
    # rows (2,0)->0, (1,0)->1; columns (2,1)->0, (0,0)->1; each direction batch-mean, the two averaged
    rows = (math.log(1 + math.exp(-2)) + math.log(1 + E)) / 2
    cols = (math.log(1 + 1 / E) + math.log(2)) / 2
    assert close(clip_task_loss(t([[2, 0], [1, 0]])), 0.5 * (rows + cols))


def test_total_loss_weights_missing_and_unknown():
    w = LossWeights()
    parts = {"intra": t(1.0), "align": t(2.0), "relation": t(3.0), "task": t(4.0)}
    assert close(total_loss(parts, w), 1.0 + 0.5 * 2 + 0.3 * 3 + 0.1 * 4)
    assert close(total_loss({"align": t(2.0), "diversity": t(-1.0)}, w), 1.0 - 0.1)
    assert close(total_loss({}, w), 0.0)
    with pytest.raises(KeyError):
        total_loss({"relations": t(1.0)}, w)


def test_hinton_kd_hand_value_temperature_and_identity():
    student = torch.zeros(2, 2)  # uniform
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # (3/4, 1/4) against (1/2, 1/2)
    assert close(hinton_kd(student, t([[math.log(3), 0], [0, math.log(3)]]), T=1.0), kl)
    assert close(hinton_kd(student, t([[2 * math.log(3), 0], [0, 2 * math.log(3)]]), T=2.0), 4 * kl)
    logits = torch.randn(3, 3)
    assert close(hinton_kd(logits, logits), 0.0)


def test_fitnet_hint_resamples_tokens_and_trains_regressor():
    student, teacher = t([[[0], [2]]]), t([[[0], [1], [3]]])  # resampled student tokens 0, 1, 2
    assert close(fitnet_hint(student, teacher, nn.Identity()), 1 / 3)
    reg = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        reg.weight.copy_(t([[1], [2]]))
    teacher2 = t([[[0, 0], [1, 2], [2, 5]]])  # regressed+resampled: (0,0), (1,2), (2,4)
    loss = fitnet_hint(student, teacher2, reg)
    assert close(loss, 1 / 6)
    loss.backward()
    assert reg.weight.grad is not None


def test_feature_mimic():
    assert close(feature_mimic(t([[3, 4]]), t([[2, 0]]), nn.Identity()), (0.4 ** 2 + 0.8 ** 2) / 2)
    assert close(feature_mimic(t([[1, 1]]), t([[5, 5]]), nn.Identity()), 0.0)


def test_affinity_mimic_hand_value_and_identity():
    eye = t([[1, 0], [0, 1]])
    i2t = (E - 1) / (E + 1) / 2  # as in the pyramid case
    t2i = math.log(2) + P * math.log(P) + Q * math.log(Q)  # student's text->image rows are uniform
    assert close(affinity_mimic(t([[1, 0], [1, 0]]), eye, eye, eye, tau=1.0), 0.5 * (i2t + t2i))
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    assert close(affinity_mimic(x, y, x, y), 0.0)
