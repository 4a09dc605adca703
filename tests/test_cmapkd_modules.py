"""CMAPKD network modules: UCMP (pyramid.py) and ALSN + schedules (alsn.py). Tiny shapes, CPU, fast."""

from __future__ import annotations

import math

import pytest
import torch

from pqk.methods.cmapkd.alsn import (
    ALSN, Stage, entropy_diversity, manual_weights, one_stage_schedule, progressive_schedule, refinement_epochs,
    stage_at, uniform_weights, weight_bounds,
)
from pqk.methods.cmapkd.pyramid import UCMP, LanguageHierarchy, PyramidOutput, VisualPyramid

N, G, W, L, C = 2, 4, 64, 8, 16
LENGTHS = (5, 8)  # sample 0 has 3 padding positions


def _mask() -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vis = [torch.randn(N, 1 + G * G, W, generator=g) for _ in range(4)]
    txt = [torch.randn(N, L, W, generator=g) for _ in range(4)]
    pooled = torch.randn(N, W, generator=g)
    return vis, txt, _mask(), pooled


def _ucmp(seed: int = 0) -> UCMP:
    torch.manual_seed(seed)
    return UCMP([W] * 4, [W] * 4, channels=C)


def _flat(out: PyramidOutput) -> list[torch.Tensor]:
    return [*out.visual, *out.language, out.visual_levels, out.language_levels,
            out.visual_aligned, out.language_aligned]


def test_ucmp_shapes():
    vis, txt, mask, pooled = _inputs()
    out = _ucmp()(vis, G, txt, mask, pooled)
    assert [tuple(p.shape) for p in out.visual] == [(N, C, s, s) for s in (16, 8, 4, 2)]
    assert [tuple(x.shape) for x in out.language] == [(N, L, C), (N, L, C), (N, C), (N, C)]
    for t in (out.visual_levels, out.language_levels, out.visual_aligned, out.language_aligned):
        assert t.shape == (N, 4, C)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask)
    assert torch.allclose(out.visual_levels[:, 0], out.visual[0].mean(dim=(2, 3)))


@pytest.mark.parametrize("grid,sizes", [(7, (28, 14, 7, 3)), (1, (4, 2, 1, 1)), (14, (56, 28, 14, 7))])
def test_visual_sizes_odd_and_tiny_grids(grid, sizes):
    pyr = VisualPyramid([8, 8, 8, 8], channels=4)
    taps = [torch.randn(1, 1 + grid * grid, 8) for _ in range(4)]
    assert [p.shape[-1] for p in pyr(taps, grid)] == list(sizes)


def test_visual_rejects_wrong_token_count():
    with pytest.raises(ValueError):
        VisualPyramid([8] * 4, 4)([torch.randn(1, 17, 8)] * 4, grid=5)


def test_padding_is_zero_and_inert():
    vis, txt, mask, pooled = _inputs()
    model = _ucmp().eval()
    out = model(vis, G, txt, mask, pooled)
    pad = ~mask
    for level in out.language[:2]:
        assert torch.equal(level[pad], torch.zeros_like(level[pad]))
    # scribble over every padded position of every text tap: nothing may change, bit for bit
    txt2 = [t.clone() for t in txt]
    for t in txt2:
        t[pad] = torch.randn_like(t[pad]) * 100
    out2 = model(vis, G, txt2, mask, pooled)
    for a, b in zip(_flat(out), _flat(out2)):
        assert torch.equal(a, b)


def test_sentence_level_ignores_padding():
    # sample 0 with padding must give the same L3 as that sample truncated to its real tokens
    torch.manual_seed(1)
    hier = LanguageHierarchy([W] * 4, channels=C)
    with torch.no_grad():
        hier.sentence_query.normal_()  # non-trivial attention, not the zero-init mean
    _, txt, mask, pooled = _inputs()
    full = hier(txt, mask, pooled)[2][0]
    n = LENGTHS[0]
    short = hier([t[:1, :n] for t in txt], mask[:1, :n], pooled[:1])[2][0]
    assert torch.allclose(full, short, atol=1e-6)


def test_window_attention_is_local():
    # with window 3, token 0's phrase feature depends on tokens 0 and 1 only
    torch.manual_seed(2)
    hier = LanguageHierarchy([W] * 4, channels=C, window=3)
    _, txt, mask, pooled = _inputs()
    base = hier(txt, mask, pooled)[1]
    txt2 = [t.clone() for t in txt]
    txt2[1][:, 3] += 5.0
    moved = hier(txt2, mask, pooled)[1]
    assert torch.equal(base[:, 0], moved[:, 0]) and torch.equal(base[:, 1], moved[:, 1])
    assert not torch.equal(base[:, 2], moved[:, 2])


def test_all_padding_row_is_finite():
    _, txt, _, pooled = _inputs()
    mask = torch.zeros(N, L, dtype=torch.bool)
    model = _ucmp()
    out = model(_inputs()[0], G, txt, mask, pooled)
    loss = sum(t.square().sum() for t in _flat(out))
    loss.backward()
    assert all(torch.isfinite(t).all() for t in _flat(out))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_reach_every_parameter():
    vis, txt, mask, pooled = _inputs()
    model = _ucmp()
    out = model(vis, G, txt, mask, pooled)
    loss = sum(t.square().mean() for t in _flat(out))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.parameter_count() == sum(p.numel() for p in model.parameters())


def test_same_seed_same_pyramid():
    a, b, c = _ucmp(7), _ucmp(7), _ucmp(8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    vis, txt, mask, pooled = _inputs()
    for x, y in zip(_flat(a(vis, G, txt, mask, pooled)), _flat(b(vis, G, txt, mask, pooled))):
        assert torch.equal(x, y)


def test_alsn_rows_are_distributions():
    torch.manual_seed(0)
    alsn = ALSN(24, 40, hidden=32, mid=16)
    w_v, w_l = alsn(torch.randn(5, 24), torch.randn(5, 40))
    lo, hi = weight_bounds(1.0)
    for w in (w_v, w_l):
        assert w.shape == (5, 4)
        assert torch.allclose(w.sum(dim=-1), torch.ones(5))
        assert ((w > 0) & (w < 1)).all()
        assert (w > lo - 1e-6).all() and (w < hi + 1e-6).all()
    (w_v[:, 0].sum() + w_l[:, 3].sum()).backward()
    assert all(p.grad is not None for p in alsn.parameters())


def test_alsn_large_tau_is_uniform():
    torch.manual_seed(0)
    alsn = ALSN(8, 8, hidden=16, mid=8, tau=1e4).eval()
    for w in alsn(torch.randn(3, 8) * 10, torch.randn(3, 8) * 10):
        assert torch.allclose(w, torch.full_like(w, 0.25), atol=1e-4)
    with pytest.raises(ValueError):
        ALSN(8, 8, tau=0.0)


def test_fixed_weights_and_entropy():
    u = uniform_weights(3)
    assert u.shape == (3, 4) and torch.all(u == 0.25)
    m = manual_weights(2)
    assert torch.allclose(m, torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2))
    assert torch.allclose(manual_weights(1, (1, 1, 1, 1)), uniform_weights(1))
    assert math.isclose(entropy_diversity(u).item(), -math.log(4), rel_tol=1e-6)
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01], [1.0, 0.0, 0.0, 0.0]])
    assert entropy_diversity(peaked).item() > -math.log(4)
    assert entropy_diversity(peaked[1:]).item() == pytest.approx(0.0, abs=1e-6)
    p = peaked.clone().requires_grad_()
    entropy_diversity(p).backward()
    assert torch.isfinite(p.grad).all()


def test_progressive_schedule_is_table1():
    s = progressive_schedule(20)  # Table 1: 20 student epochs, then 5 of ALSN alone
    assert s == [
        Stage("coarse", 5, (3,), (3,), 1.0, "uniform"),
        Stage("medium", 5, (2, 3), (2, 3), 0.6, "uniform"),
        Stage("fine", 10, (0, 1, 2, 3), (0, 1, 2, 3), 0.2, "joint"),
        Stage("alsn", 5, (0, 1, 2, 3), (0, 1, 2, 3), 2.0, "frozen-backbone"),
    ]
    assert refinement_epochs(s) == 5 and refinement_epochs(progressive_schedule(20, refine_alsn=False)) == 0


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 6, 7, 9, 10, 13, 50, 101])
def test_scaled_schedule_gives_the_student_its_epochs_then_alsn_a_quarter_more(total):
    s = progressive_schedule(total)
    student = [st for st in s if st.alsn != "frozen-backbone"]
    assert sum(st.epochs for st in student) == total
    assert all(st.epochs >= 1 for st in s)
    assert refinement_epochs(s) == (total * 5 * 2 + 20) // 40  # total / 4, rounded half up
    if total >= 3:
        assert [st.name for st in s] == ["coarse", "medium", "fine", "alsn"]
    assert progressive_schedule(40)[2].epochs == 20


def test_short_schedules_drop_stages():
    assert [st.name for st in progressive_schedule(2)] == ["coarse", "fine", "alsn"]
    assert [st.name for st in progressive_schedule(1)] == ["fine"]
    with pytest.raises(ValueError):
        progressive_schedule(0)


def test_stage_at_boundaries():
    s = progressive_schedule(20)
    names = [stage_at(s, e).name for e in (0, 4, 5, 9, 10, 19, 20, 24, 25, 100)]
    assert names == ["coarse", "coarse", "medium", "medium", "fine", "fine", "alsn", "alsn", "alsn", "alsn"]
    one = one_stage_schedule(12)
    assert one == [Stage("fine", 12, (0, 1, 2, 3), (0, 1, 2, 3), 1.0, "joint")]
    assert stage_at(one, 11) is one[0]
    with pytest.raises(ValueError):
        stage_at(s, -1)
