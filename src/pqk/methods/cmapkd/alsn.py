"""ALSN, the adaptive layer selection network of CMAPKD (seed 004 §4.3), and the training schedules
(§4.5 Table 1, §4.3 "training strategy", technical plan 3).

**ALSN.** [x_v; x_l] -> Linear(hidden) -> ReLU -> Dropout -> Linear(mid) -> ReLU -> two heads
Linear(mid, 4), each sigmoid then softmax(·/τ): per-sample weights over [P2..P5] and [L1..L4].
Note what the seed's sigmoid-before-softmax implies: the softmax logits lie in (0, 1)/τ, so no
weight can fall below 1/(1 + 3e^{1/τ}) or exceed e^{1/τ}/(e^{1/τ} + 3); at τ = 1 every weight is in
(0.109, 0.475). The policy can never collapse onto one level at τ = 1 (only τ < 1 sharpens it),
and large τ makes it uniform. We keep the seed's architecture; the caller picks τ.

**Diversity term.** The seed adds 0.1·(−H(w_v) − H(w_l)) to ALSN's loss; `entropy_diversity(w)` is
−mean_rows H(w) (one modality; the caller sums both and applies the 0.1). Its sign: it is
minimised by *high* entropy, so adding it pushes weights towards uniform, against the pull of
the weighted distillation loss, which ALSN alone would minimise by moving weight onto the
level whose loss is smallest. Its minimum is −ln 4 (uniform rows).

**Schedule decision.** The seed has two orders that do not agree: Table 1 (coarse 5 → medium 5 →
fine 10 → ALSN-only 5 epochs; LR 5e-5, 3e-5, 1e-5, 1e-4) and §4.3 / plan 3 (uniform warm-up 5 →
ALSN alone with backbone frozen 5 → joint fine-tuning 10). We keep Table 1's stages, epochs and LRs
exactly (it is the paper's headline schedule and ablation "Progressive Training") and map §4.3
onto it: warm-up with uniform weights = coarse + medium ("uniform"; with one or two active
levels a learned policy has nothing to choose); joint fine-tuning = the fine stage ("joint": ALSN
trains with the student; it starts from a fresh init, which the sigmoid bound above keeps near
uniform, so no separate first ALSN pass is needed to avoid a random policy); ALSN alone with the
backbone frozen = stage 4 ("frozen-backbone", Table 1's "policy refinement"). In stage 4
the student and both pyramids are frozen, so the deployed student is bit-identical before and
after it — it only refines the policy (Fig. 3's weight analysis). So it runs *after* the student's
epochs (Table 1's 5 after 20: a quarter more), not out of them: in a harness where every baseline
gets the same student steps, taking it out of them would hand CMAPKD's student a shorter training
(measured: val R mean 0.468 → 0.489 at the embedded plan's budget when it moved after). The ALSN LR in the fine stage is not in
Table 1; plan 3 uses 5× the student's (5e-5 vs 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

LEVELS = 4
ALL_LEVELS = (0, 1, 2, 3)
# seed Table 1: (name, epochs of 25, vision levels, language levels, LR / stage-1 LR, ALSN mode)
_TABLE1 = (
    ("coarse", 5, (3,), (3,), 1.0, "uniform"),  # 5e-5, P5 / L4
    ("medium", 5, (2, 3), (2, 3), 0.6, "uniform"),  # 3e-5, P4-P5 / L3-L4
    ("fine", 10, ALL_LEVELS, ALL_LEVELS, 0.2, "joint"),  # 1e-5, all levels
    ("alsn", 5, ALL_LEVELS, ALL_LEVELS, 2.0, "frozen-backbone"),  # 1e-4, ALSN only
)


class ALSN(nn.Module):
    """Per-sample level weights (w_v, w_l), each (N, 4) with rows summing to 1."""

    def __init__(self, vision_dim: int, text_dim: int, hidden: int = 512, mid: int = 256,
                 dropout: float = 0.1, tau: float = 1.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.encoder = nn.Sequential(
            nn.Linear(vision_dim + text_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, mid), nn.ReLU(),
        )
        self.vision_head = nn.Linear(mid, LEVELS)
        self.text_head = nn.Linear(mid, LEVELS)

    def forward(self, x_v: Tensor, x_l: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(torch.cat([x_v, x_l], dim=-1))
        w_v = (torch.sigmoid(self.vision_head(h)) / self.tau).softmax(dim=-1)
        w_l = (torch.sigmoid(self.text_head(h)) / self.tau).softmax(dim=-1)
        return w_v, w_l


def uniform_weights(n: int, device: torch.device | str | None = None) -> Tensor:
    """(n, 4) of 0.25: the "w/o ALSN (uniform)" ablation and the warm-up stages."""
    return torch.full((n, LEVELS), 1.0 / LEVELS, device=device)


def manual_weights(n: int, values: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
                   device: torch.device | str | None = None) -> Tensor:
    """(n, 4) rows of `values` normalised to sum 1 (a no-op for the seed's [0.1, 0.2, 0.3, 0.4],
    "w/o ALSN (manual)"); normalised so any values are on the same footing as ALSN's rows."""
    w = torch.tensor([float(v) for v in values], device=device)
    if w.numel() != LEVELS or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"manual weights need 4 non-negative values, not all zero; got {list(values)}")
    return (w / w.sum()).expand(n, LEVELS).clone()


def entropy_diversity(w: Tensor) -> Tensor:
    """−mean over rows of the entropy of w (N, K): −ln K for uniform rows, → 0 for one-hot rows.
    Minimising it (the caller adds 0.1× it per modality) keeps the weights from collapsing."""
    entropy = -(w * w.clamp(min=1e-12).log()).sum(dim=-1)  # clamp: 0·log 0 = 0, no NaN gradient
    return -entropy.mean()


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule. `alsn`: "uniform" — weights fixed (0.25 each, `uniform_weights`)
    over the active levels, ALSN not trained; "joint" — ALSN's weights, ALSN trained with the
    student; "frozen-backbone" — only ALSN trains (student and pyramids frozen)."""

    name: str  # "coarse" | "medium" | "fine" | "alsn"
    epochs: int
    vision_levels: tuple[int, ...]  # indices into [P2, P3, P4, P5]
    language_levels: tuple[int, ...]  # indices into [L1, L2, L3, L4]
    lr_scale: float  # relative to stage 1's LR (seed Table 1: 5e-5)
    alsn: str  # "uniform" | "frozen-backbone" | "joint"


def _split_epochs(total: int, shares: Sequence[int]) -> list[int]:
    """Largest-remainder split of `total` in proportion to `shares`, in integers (no float drift);
    ties go to the earlier stage. With total >= len(shares) every part is made >= 1 by taking
    from the largest part."""
    whole = sum(shares)
    parts = [total * s // whole for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(total * shares[i] % whole), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    if total >= len(shares):
        for i in range(len(parts)):
            if parts[i] == 0:  # cannot happen for Table 1's shares; kept for other tables
                parts[max(range(len(parts)), key=lambda j: parts[j])] -= 1
                parts[i] = 1
    return parts


def progressive_schedule(student_epochs: int, refine_alsn: bool = True) -> list[Stage]:
    """Table 1 for a student trained `student_epochs` epochs: the three student stages (5, 5, 10 of
    Table 1's 20) split over them by largest remainder (ties to the earlier stage, each >= 1 epoch
    from 3 epochs up; below, stages given 0 are left out: 2 -> coarse, fine; 1 -> fine), then the
    ALSN-only stage for a quarter as many epochs again (Table 1: 5 after 20, rounded half up; none
    for a 1-epoch student or with `refine_alsn` False). The ALSN-only stage cannot change the
    student, so it comes *after* the student's epochs rather than out of them: the student gets the
    same updates as every baseline of the harness ("same steps"). See the module docstring for how
    §4.3's ALSN stages map onto Table 1."""
    if student_epochs < 1:
        raise ValueError(f"student_epochs must be >= 1, got {student_epochs}")
    epochs = _split_epochs(student_epochs, [row[1] for row in _TABLE1[:3]])
    epochs.append((student_epochs * _TABLE1[3][1] * 2 + sum(r[1] for r in _TABLE1[:3])) // (2 * sum(r[1] for r in _TABLE1[:3]))
                  if refine_alsn else 0)
    return [Stage(name, e, v, t, lr, mode)
            for (name, _, v, t, lr, mode), e in zip(_TABLE1, epochs) if e > 0]


def refinement_epochs(schedule: Sequence[Stage]) -> int:
    """Epochs of the ALSN-only stage (run after the student's own epochs)."""
    return sum(s.epochs for s in schedule if s.alsn == "frozen-backbone")


def one_stage_schedule(total_epochs: int) -> list[Stage]:
    """Ablation "one-stage training": every level and a jointly trained ALSN from the first epoch,
    at stage 1's LR (it starts from the same point as the coarse stage; only the progression is
    removed). Named "fine" because it trains what the fine stage trains."""
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    return [Stage("fine", total_epochs, ALL_LEVELS, ALL_LEVELS, 1.0, "joint")]


def stage_at(schedule: Sequence[Stage], epoch: int) -> Stage:
    """The stage that 0-based `epoch` falls in; past the end, the last stage."""
    if not schedule:
        raise ValueError("empty schedule")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    end = 0
    for stage in schedule:
        end += stage.epochs
        if epoch < end:
            return stage
    return schedule[-1]


def weight_bounds(tau: float) -> tuple[float, float]:
    """The (min, max) a single ALSN weight can take at temperature tau (sigmoid-then-softmax)."""
    e = math.exp(1.0 / tau)
    return 1.0 / (1.0 + (LEVELS - 1) * e), e / (e + LEVELS - 1)
