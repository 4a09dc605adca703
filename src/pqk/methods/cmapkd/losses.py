"""CMAPKD's losses (seed §4.4, §4.5) and the baselines' losses that share its harness, as pure functions on tensors.

Conventions (decisions where the seed is silent):
- The teacher never receives gradient: every distillation term detaches its teacher inputs, so a trainable
  projection on the teacher's pyramid is not pulled towards the student. ALSN weights and α are NOT detached.
- "MSE" between L2-normalised features is the squared Euclidean distance summed over channels (= 2 − 2·cos per
  position), averaged over positions/tokens: a per-element mean would shrink it by 1/C and make λ1 depend on C.
- Similarities are cosines; P(V_i, L_j) is image a's softmax over the batch's texts b.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _unit_sq_dist(student: Tensor, teacher: Tensor, dim: int) -> Tensor:
    """Squared distance between L2-normalised vectors along `dim` (that dim is summed away)."""
    return (F.normalize(student, dim=dim) - F.normalize(teacher, dim=dim)).pow(2).sum(dim)


def level_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample (N,) squared distance between L2-normalised features, averaged over positions.

    Maps (N, C, H, W) are normalised over dim 1; the student map is bilinearly resized (align_corners=False) to the
    teacher's size first, then normalised (resizing unit vectors would not keep them unit). Tokens (N, L, C) and
    vectors (N, C) are normalised over the last dim; `mask` (N, L), bool or 0/1, picks real tokens (a sample without
    any scores 0). Teacher detached."""
    teacher = teacher.detach()
    if mask is not None and student.dim() != 3:
        raise ValueError(f"mask only applies to token tensors (N, L, C), got a {student.dim()}-d student")
    if student.dim() == 4 and teacher.dim() == 4:
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        return _unit_sq_dist(student, teacher, dim=1).flatten(1).mean(1)
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must match")
    if student.dim() == 2:
        return _unit_sq_dist(student, teacher, dim=-1)
    if student.dim() != 3:
        raise ValueError(f"expected (N, C, H, W), (N, L, C) or (N, C) features, got {tuple(student.shape)}")
    d = _unit_sq_dist(student, teacher, dim=-1)  # (N, L)
    if mask is None:
        return d.mean(1)
    m = mask.to(d.dtype)
    return (d * m).sum(1) / m.sum(1).clamp_min(1.0)


def intra_loss(student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor], weights: Tensor,
               active: Sequence[int] = (0, 1, 2, 3), mask: Tensor | None = None) -> Tensor:
    """One modality's L_intra (seed 4.4.1): mean over samples of (1/|active|) Σ_{i∈active} w_i · MSE(S^i, T^i).

    The seed's 1/4 is the count of summed levels, so with progressive stages (Table 1: P5 only, then P4-P5) we divide
    by len(active): it equals the seed's 1/4 at the full pyramid and keeps the loss scale across stages. The ALSN
    weights are used as given (not renormalised over the active levels): that is the trainer's choice.
    `mask` is applied to token-tensor (3-d) levels only."""
    if not active:
        raise ValueError("intra_loss needs at least one active level")
    if weights.dim() != 2 or weights.shape[1] < max(active) + 1:
        raise ValueError(f"weights must be (N, levels), got {tuple(weights.shape)}")
    total = weights.new_zeros(weights.shape[0])
    for i in active:
        s, t = student_levels[i], teacher_levels[i]
        total = total + weights[:, i] * level_mse(s, t, mask if s.dim() == 3 else None)
    return (total / len(active)).mean()


def _cos_logits(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """(N, N) cosine similarities of rows of `a` with rows of `b`, divided by tau."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau


def _symmetric_ce(logits: Tensor) -> Tensor:
    """Cross-entropy of the diagonal (matching pairs) over rows and over columns, averaged."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def info_nce(v: Tensor, l: Tensor, tau: float = 0.07) -> Tensor:
    """L_align^single (seed 4.4.2): InfoNCE on cos(v_a, l_b)/tau. The seed writes only image->text; we average
    image->text and text->image (CLIP's symmetric form), so neither tower is left without a contrastive signal."""
    return _symmetric_ce(_cos_logits(v, l, tau))


def layer_compatibility(n: int = 4, sharpness: float = 1.0) -> Tensor:
    """α (n, n) = softmax over all n·n entries of −sharpness·|i − j|: the seed's "LayerCompatibility(i, j)" is
    unspecified; this favours same-depth pairs (P_i with L_i) and sums to 1."""
    idx = torch.arange(n, dtype=torch.float32)
    score = -sharpness * (idx[:, None] - idx[None, :]).abs()
    return score.flatten().softmax(0).view(n, n)


def pyramid_kl(teacher_v: Tensor, teacher_l: Tensor, student_v: Tensor, student_l: Tensor, alpha: Tensor,
               tau: float = 0.07) -> Tensor:
    """L_align^pyramid = (1/n²) Σ_ij α_ij · KL(P(V_i^T, L_j^T) ‖ P(V_i^S, L_j^S)), inputs (N, n, C) pooled level vectors.

    P(V_i, L_j) is the row-wise softmax over the batch of cos(V_i[a], L_j[b])/tau; KL is summed over b, averaged over
    images a. The 1/n² (1/16) is the seed's, kept literally even though α already sums to 1. Teacher detached."""
    n = alpha.shape[0]
    if teacher_v.shape[1] != n or student_v.shape[1] != n or alpha.shape != (n, n):
        raise ValueError(f"alpha {tuple(alpha.shape)} does not match {teacher_v.shape[1]} levels")
    tv, tl = F.normalize(teacher_v.detach(), dim=-1), F.normalize(teacher_l.detach(), dim=-1)
    sv, sl = F.normalize(student_v, dim=-1), F.normalize(student_l, dim=-1)
    log_pt = (torch.einsum("aic,bjc->ijab", tv, tl) / tau).log_softmax(-1)  # (n, n, N images, N texts)
    log_ps = (torch.einsum("aic,bjc->ijab", sv, sl) / tau).log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean(-1)  # (n, n)
    return (alpha.to(kl) * kl).sum() / (n * n)


def align_loss(student_v_global: Tensor, student_l_global: Tensor, teacher_v: Tensor, teacher_l: Tensor,
               student_v: Tensor, student_l: Tensor, alpha: Tensor, beta: float = 1.0, tau: float = 0.07) -> Tensor:
    """L_align = info_nce(student globals) + β · pyramid_kl. The seed gives no β: 1.0 (both terms are O(1) nats)."""
    single = info_nce(student_v_global, student_l_global, tau)
    return single + beta * pyramid_kl(teacher_v, teacher_l, student_v, student_l, alpha, tau)


def similarity_matrix(x: Tensor) -> Tensor:
    """(N, ...) -> (N, N) cosine similarities; trailing dims are flattened so maps work too."""
    x = F.normalize(x.flatten(1), dim=-1)
    return x @ x.t()


def relation_sample(teacher_feat: Tensor, student_feat: Tensor) -> Tensor:
    """‖G_T − G_S‖_F² / B² with G the (B, B) cosine-similarity matrices (feature dims may differ). Teacher detached."""
    b = teacher_feat.shape[0]
    diff = similarity_matrix(teacher_feat.detach()) - similarity_matrix(student_feat)
    return diff.pow(2).sum() / (b * b)


def layer_correlation(levels: Tensor) -> Tensor:
    """(N, n, C) -> (n, n): R[i, j] = mean over samples of cos(level_i, level_j). The seed's "Correlation" is
    unspecified; per-sample cosine averaged over the batch is symmetric with a unit diagonal and, unlike a Pearson
    correlation over the batch, is defined for a batch of one."""
    u = F.normalize(levels, dim=-1)
    return torch.einsum("nic,njc->ij", u, u) / levels.shape[0]


def relation_layer(teacher_levels: Tensor, student_levels: Tensor) -> Tensor:
    """‖R_T − R_S‖_F² between the layer-correlation matrices. Teacher detached."""
    return (layer_correlation(teacher_levels.detach()) - layer_correlation(student_levels)).pow(2).sum()


def relation_loss(teacher_feat: Tensor, student_feat: Tensor, teacher_levels: Tensor, student_levels: Tensor,
                  gamma: float = 0.3) -> Tensor:
    """L_relation = relation_sample + γ · relation_layer (seed: γ = 0.3)."""
    return relation_sample(teacher_feat, student_feat) + gamma * relation_layer(teacher_levels, student_levels)


def clip_task_loss(logits_per_image: Tensor) -> Tensor:
    """L_task: CLIP's symmetric cross-entropy on the (N, N) image->text logits (already scaled by logit_scale)."""
    return _symmetric_ce(logits_per_image)


@dataclass(frozen=True)
class LossWeights:
    """λ1..λ4 from seed 4.5; β, τ not in the seed (our choices); γ = 0.3 from 4.4.3; diversity weighs ALSN's entropy."""

    intra: float = 1.0
    align: float = 0.5
    relation: float = 0.3
    task: float = 0.1
    beta: float = 1.0
    gamma: float = 0.3
    tau: float = 0.07
    diversity: float = 0.1


_PARTS = ("intra", "align", "relation", "task", "diversity")


def total_loss(parts: Mapping[str, Tensor], weights: LossWeights) -> Tensor:
    """λ1·intra + λ2·align + λ3·relation + λ4·task (+ diversity·parts['diversity']); a missing part (ablation) counts
    0. An unknown key raises, so a misspelt part cannot silently drop out of training."""
    unknown = set(parts) - set(_PARTS)
    if unknown:
        raise KeyError(f"unknown loss parts {sorted(unknown)}; expected some of {_PARTS}")
    if not parts:
        return torch.zeros(())
    return sum(getattr(weights, k) * v for k, v in parts.items())  # type: ignore[return-value]


# ---- baselines sharing the harness (dual-encoder adaptations noted) ----

def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0) -> Tensor:
    """Hinton KD, adapted to dual encoders: the "classes" of an image are the batch's texts (and vice versa), so
    T²·KL(softmax(t/T) ‖ softmax(s/T)) is taken over the rows of logits_per_image (image->text) and of its transpose
    (text->image), batch-mean, the two averaged. Inputs are each model's (N, N) logits_per_image. Teacher detached."""
    from pqk.methods.clip.train import logit_kd  # the one implementation (the K baseline's)

    return logit_kd(student_logits, teacher_logits.detach(), T)


def fitnet_hint(student_tokens: Tensor, teacher_tokens: Tensor, regressor: nn.Module) -> Tensor:
    """FitNet hint: MSE (mean over elements) between regressor(student hidden states (N, Ls, Cs)) and the teacher's
    (N, Lt, Ct) at one matched layer. Adapted for towers with different token counts (e.g. patch grids): the regressed
    tokens are resampled along the token axis to Lt by linear interpolation (align_corners=True keeps the first and
    last tokens in place). Teacher detached."""
    s = regressor(student_tokens)
    if s.shape[1] != teacher_tokens.shape[1]:
        s = F.interpolate(s.transpose(1, 2), size=teacher_tokens.shape[1], mode="linear", align_corners=True)
        s = s.transpose(1, 2)
    return F.mse_loss(s, teacher_tokens.detach())


def feature_mimic(student_emb: Tensor, teacher_emb: Tensor, projector: nn.Module) -> Tensor:
    """CLIP-KD feature distillation (Yang et al., CVPR 2024): MSE (mean over elements, as in CLIP-KD, which then uses a
    large λ) between L2-normalised projector(student embedding) and the L2-normalised teacher embedding; call once
    per tower. Teacher detached."""
    s = F.normalize(projector(student_emb), dim=-1)
    return F.mse_loss(s, F.normalize(teacher_emb.detach(), dim=-1))


def affinity_mimic(student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
                   tau: float = 0.07) -> Tensor:
    """CLIP-KD affinity mimicking: KL(teacher ‖ student) between image->text affinity distributions (softmax over
    the batch of cos/tau) and likewise text->image, batch-mean, the two averaged. A fixed tau replaces the models'
    own logit scales so both sides share one temperature. Teacher detached."""
    s = _cos_logits(student_image, student_text, tau)
    t = _cos_logits(teacher_image.detach(), teacher_text.detach(), tau)
    return hinton_kd(s, t, T=1.0)
