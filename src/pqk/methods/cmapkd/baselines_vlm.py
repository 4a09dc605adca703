"""The VLM-distillation baselines named in seed 004 (§3.3, §5.1.3), transferred to the CLIP-style
dual-encoder student of CMAPKD's harness (same student, data and steps as every other run).
None was published for this setting (PromptKD: prompt-tuned image classification; C2KD: two
unimodal classifiers on paired modalities; LLaVA-KD: multimodal LLMs), so each class keeps the
part of its paper that transfers and its docstring says what was adapted, kept and dropped.

Shared conventions: the teacher is frozen, and its normalised image and caption embeddings are
computed once (`prepare`, as the harness's KD baseline; a LiT teacher works unchanged) and
indexed per batch. Logit-KD terms use the run's `T` and `kd_weight`; the task loss is the
student's own CLIP loss weighted by `task_weight`; other terms take constructor weights (1.0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pqk.methods.clip.train import Batch, ClipTrainSpec, Objective
from pqk.methods.cmapkd.baselines import _embed_dim
from pqk.methods.cmapkd.losses import clip_task_loss, feature_mimic, hinton_kd, relation_sample

SELECTION_RULES = ("krc", "top1")
LLAVAKD_STAGES = ("dpt", "sft", "dft")


def row_kl(student: Tensor, teacher: Tensor, T: float, keep: Tensor | None = None) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) per row, averaged over ALL rows; rows where
    `keep` (N,) is False count 0 (C2KD's masked mean). Teacher detached."""
    log_t = F.log_softmax(teacher.detach() / T, dim=1)
    kl = (log_t.exp() * (log_t - F.log_softmax(student / T, dim=1))).sum(1)
    if keep is not None:
        kl = kl * keep.to(kl.dtype)
    return T * T * kl.mean()


def off_diagonal(logits: Tensor) -> Tensor:
    """(N, N) -> (N, N-1): each row without its matching pair (the 'target class' of a batch)."""
    n = logits.shape[0]
    return logits[~torch.eye(n, dtype=torch.bool, device=logits.device)].view(n, n - 1)


def kendall_tau_rows(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's τ (τ-a; τ-b without ties) between the rankings of each row of a and of b, (N, M) -> (N,)."""
    m = a.shape[1]
    da = (a[:, :, None] - a[:, None, :]).sign()
    db = (b[:, :, None] - b[:, None, :]).sign()
    return (da * db).sum((1, 2)) / max(1, m * (m - 1))


def c2kd_selection(student: Tensor, teacher: Tensor, rule: str = "krc", threshold: float = 0.0) -> Tensor:
    """C2KD's on-the-fly selection (OFSD): which rows (samples) are distilled, (N,) bool.
    "krc" (the paper's, official code `kendall > krc`, krc 0): Kendall's τ between the row's teacher
    and student logits above `threshold`. "top1": teacher and student pick the same column."""
    if rule == "krc":
        return kendall_tau_rows(teacher.detach(), student.detach()) > threshold
    if rule == "top1":
        return teacher.argmax(1) == student.argmax(1)
    raise ValueError(f"selection rule {rule!r} is not accepted; accepted: {', '.join(SELECTION_RULES)}")


def _student_logits(student, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Student image and text embeddings (unnormalised) and its (N, N) image->text logits."""
    s_image, s_text = student.encode_image(images), student.encode_text(tokens)
    logits = student.logit_scale.exp() * F.normalize(s_image, dim=-1) @ F.normalize(s_text, dim=-1).t()
    return s_image, s_text, logits


class _TeacherEmbeddings(Objective):
    """Teacher's normalised embeddings of every training image and caption, computed once."""

    def prepare(self, teacher, train, captions: list[str], log: Callable[[str], None]) -> None:
        self.keep_teacher_embeddings(teacher, train, captions, log)

    def teacher_logits(self, batch: Batch) -> Tensor:
        return self.t_scale * self.t_image[batch.index] @ self.t_text[batch.caption].t()


class PromptKDObjective(_TeacherEmbeddings):
    """PromptKD (Li et al., CVPR 2024), transferred.

    Kept: the teacher's text features of the (caption) set are computed once and reused as a fixed
    text classifier; the student's image features, through a trained projector to the teacher's
    width, are scored against them (teacher's logit scale) and match the teacher's own image->text
    logits by T²·KL over the batch's captions, image->text only, with no labels (PromptKD's
    unsupervised logit distillation). Adapted: the paper deploys the student image encoder with
    the teacher's text features as its classifier; our deployed student is a whole dual encoder
    (retrieval with its own text tower), so its text tower is trained by its own task loss (which
    also ties its image tower to it), and the projector is discarded after training.
    Dropped: learnable prompts. PromptKD's are visual prompts of a student whose backbone stays
    frozen; our student trains every weight, which subsumes them. Text-side context vectors
    (CoOp-style) could be prepended in embedding space from outside CLIP's code, but the student is
    saved, validated and measured through `CLIP.encode_text`, which has no prompt input: the
    prompts would be trained and then thrown away, and the student measured on token sequences
    it was not trained on. Keeping them would need a change to CLIP (a parameter and its forward)
    or to the family's saving, so they were left out.
    """

    def __init__(self, spec: ClipTrainSpec, teacher, student):
        super().__init__(spec)
        self.modules["projector"] = nn.Linear(_embed_dim(student), _embed_dim(teacher))

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[Tensor, dict]:
        s_image, _, logits = _student_logits(student, batch.images, batch.tokens)
        t_text = self.t_text[batch.caption]
        s_scores = self.t_scale * F.normalize(self.modules["projector"](s_image), dim=-1) @ t_text.t()
        kd = row_kl(s_scores, self.teacher_logits(batch), self.spec.T)
        task = clip_task_loss(logits)
        loss = self.spec.task_weight * task + self.spec.kd_weight * kd
        return loss, {"loss_kd": kd.item(), "loss_task": task.item()}


class C2KDObjective(_TeacherEmbeddings):
    """C2KD (Huo et al., CVPR 2024), transferred.

    Kept (after the official code): proxies: a student proxy and a teacher proxy, each a small
    trained head per modality (image, text), give proxy logits; each student/proxy pair
    distils both ways (student <-> its proxy), the teacher proxy learns from the teacher, and the
    two proxies distil bidirectionally (student proxy <-> teacher proxy) on the NON-TARGET columns
    (each row without its matching pair) of only the samples picked on the fly (OFSD: Kendall's τ
    between the proxies' rows > 0, the official rule; `selection="top1"` instead keeps rows whose
    top-1 agrees). Masked rows count 0 in the batch mean, as in the official code.
    Adapted: a dual encoder's 'classes' of an image are the batch's captions (and vice versa), so
    every term is taken over image->text rows and text->image rows (each with its own selection),
    averaged. The proxies sit on the towers' embeddings (official: on the last feature map).
    Dropped: training the teacher itself (C2KD fine-tunes it with the student; here the teacher is
    frozen and shared by every run, so the teacher proxy is the only teacher-side part that adapts
    to the student), and the teacher's own cross-entropy.
    """

    def __init__(self, spec: ClipTrainSpec, teacher, student, proxy_weight: float = 1.0, selection: str = "krc",
                 threshold: float = 0.0):
        super().__init__(spec)
        if selection not in SELECTION_RULES:
            raise ValueError(f"selection rule {selection!r} is not accepted; accepted: {', '.join(SELECTION_RULES)}")
        self.proxy_weight, self.selection, self.threshold = proxy_weight, selection, threshold
        for side, dim in (("student", _embed_dim(student)), ("teacher", _embed_dim(teacher))):
            for modality in ("image", "text"):
                self.modules[f"{side}_proxy_{modality}"] = nn.Sequential(
                    nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim))

    def _proxy_logits(self, side: str, image: Tensor, text: Tensor, scale: Tensor | float) -> Tensor:
        v = F.normalize(self.modules[f"{side}_proxy_image"](image), dim=-1)
        return scale * v @ F.normalize(self.modules[f"{side}_proxy_text"](text), dim=-1).t()

    def _cross(self, s_proxy: Tensor, t_proxy: Tensor) -> tuple[Tensor, float]:
        """Bidirectional non-target KD between the proxies on the selected rows, both directions of
        the batch (image->text rows, text->image rows); returns (loss, fraction of rows selected)."""
        total, picked = s_proxy.new_zeros(()), 0.0
        for s, t in ((s_proxy, t_proxy), (s_proxy.t(), t_proxy.t())):
            keep = c2kd_selection(s, t, self.selection, self.threshold)
            s_nt, t_nt = off_diagonal(s), off_diagonal(t)
            total = total + 0.5 * (row_kl(s_nt, t_nt, self.spec.T, keep) + row_kl(t_nt, s_nt, self.spec.T, keep))
            picked += 0.5 * keep.float().mean().item()
        return total, picked

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[Tensor, dict]:
        s_image, s_text, logits = _student_logits(student, batch.images, batch.tokens)
        t_logits = self.teacher_logits(batch)
        s_proxy = self._proxy_logits("student", s_image, s_text, student.logit_scale.exp())
        t_proxy = self._proxy_logits("teacher", self.t_image[batch.index], self.t_text[batch.caption], self.t_scale)
        T = self.spec.T
        proxy = hinton_kd(s_proxy, logits, T) + hinton_kd(logits, s_proxy, T) + hinton_kd(t_proxy, t_logits, T)
        cross, picked = self._cross(s_proxy, t_proxy)
        task = clip_task_loss(logits)
        loss = self.spec.task_weight * task + self.proxy_weight * proxy + self.spec.kd_weight * cross
        return loss, {"loss_proxy": proxy.item(), "loss_cross": cross.item(), "loss_task": task.item(),
                      "selected": round(picked, 4)}


def llavakd_stage(epoch: int, epochs: int) -> str:
    """Stage of a 0-based epoch in a run of E epochs, split 1:1:2: DPT and SFT get n = (E + 1) // 4
    epochs each (E/4 rounded, a tie going to DFT), DFT the rest. E = 8: 2, 2, 4; E = 3: 1, 1, 1;
    E = 7: 2, 2, 3; E <= 2 (a budget-scaled run): DFT only, the stage that distils."""
    n = (epochs + 1) // 4
    if epoch < n:
        return "dpt"
    return "sft" if epoch < 2 * n else "dft"


class LLaVAKDObjective(_TeacherEmbeddings):
    """LLaVA-KD (Wang et al., 2024), transferred: its three stages over the student's epochs.

    1. DPT (distilled pre-training; the paper aligns visual features to the LLM's space by training
       the projector against the teacher MLLM's outputs): the student's image embedding, through a
       trained projector, regresses the teacher's image embedding (MSE of normalised vectors,
       `feature_mimic`). The text tower is frozen: it is not in this stage's loss, so it gets no
       gradient and AdamW (which skips gradient-less parameters) neither updates nor decays it;
       `lr_scale` cannot do it alone, since the harness puts the whole student in one group.
       Unlike the paper's frozen vision encoder, the (freshly initialised) image tower trains here.
    2. SFT: the student's own task loss only.
    3. DFT: task loss + Hinton KD on the similarity logits (the paper's MDist, KL of the output
       distributions) + relation distillation: the B×B cosine-similarity matrix of the student's
       image embeddings matches the teacher's (the paper's RDist on visual tokens, here on the
       batch's images, `relation_sample`).
    The projector trains only in DPT (`lr_scale` 0 afterwards). Split 1:1:2 (`llavakd_stage`).
    Dropped: the LLM, its next-token loss and the paper's data per stage (all stages use the same
    generated image-caption pairs).
    """

    def __init__(self, spec: ClipTrainSpec, teacher, student, feature_weight: float = 1.0,
                 relation_weight: float = 1.0):
        super().__init__(spec)
        self.feature_weight, self.relation_weight = feature_weight, relation_weight
        self.modules["projector"] = nn.Linear(_embed_dim(student), _embed_dim(teacher))

    def stage(self, epoch: int) -> str:
        return llavakd_stage(epoch, self.spec.epochs)

    def lr_scale(self, epoch: int, group: str) -> float:
        return 0.0 if group == "projector" and self.stage(epoch) != "dpt" else 1.0

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[Tensor, dict]:
        stage = self.stage(epoch)
        t_image = self.t_image[batch.index]
        if stage == "dpt":  # the image tower only: the text tower stays out of the graph
            feature = feature_mimic(student.encode_image(batch.images), t_image, self.modules["projector"])
            return self.feature_weight * feature, {"stage": stage, "loss_feature": feature.item()}
        s_image, _, logits = _student_logits(student, batch.images, batch.tokens)
        task = clip_task_loss(logits)
        loss, logs = self.spec.task_weight * task, {"stage": stage, "loss_task": task.item()}
        if stage == "dft":
            kd = hinton_kd(logits, self.teacher_logits(batch), self.spec.T)
            relation = relation_sample(t_image, s_image)
            loss = loss + self.spec.kd_weight * kd + self.relation_weight * relation
            logs.update(loss_kd=kd.item(), loss_relation=relation.item())
        return loss, logs
