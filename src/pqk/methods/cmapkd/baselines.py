"""The baselines of seed 004 §5.1.3 that share CMAPKD's harness (same student, data, steps):
Scratch and KD are the plain objective (`pqk.methods.clip.train.Objective`, kd_weight 0 or > 0);
FitNet and CLIP-KD are below. Each adds its own loss to the task loss.

- FitNet (Romero et al. 2015): a hint at one matched layer, the middle block of the image
  tower (student block d_s//2 ↔ teacher block d_t//2), through a trained linear regressor.
- CLIP-KD (Yang et al. 2024) feature and affinity mimicry: the student's image and text
  embeddings, projected to the teacher's width, regress the teacher's (both normalised), and
  the student's image–text affinities (softmax over the batch, both ways) match the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pqk.methods.clip.train import Batch, ClipTrainSpec, Objective, clip_loss


def _embed_dim(model) -> int:
    return int(model.visual.proj.shape[1])


def _teacher_hints(teacher, images) -> torch.Tensor:
    """The teacher's hint layer for every (uint8) training image, in the cache's fixed chunks."""
    from pqk.methods.clip.teacher_cache import in_chunks
    from pqk.tasks.clip.measure import model_inputs

    with torch.no_grad():
        return torch.cat(in_chunks(len(images), lambda part: _hint_layer(teacher, model_inputs(images[part]))[1]))


def _hint_layer(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_image's output and the image tower's middle block (FitNet's matched layer)."""
    features, hidden = model.encode_image(images, return_hidden=True)
    return features, hidden[(len(hidden) - 1) // 2]


class FitNetObjective(Objective):

    def __init__(self, spec: ClipTrainSpec, teacher, student, hint_weight: float = 1.0):
        super().__init__(spec)
        self.hint_weight = hint_weight
        self.modules["regressor"] = nn.Linear(student.visual.transformer.width, teacher.visual.transformer.width)

    def prepare(self, teacher, train, captions, log) -> None:
        from pqk.methods.clip.teacher_cache import fits, kept, set_key

        teacher.eval()
        tokens, width = teacher.visual.positional_embedding.shape
        self.t_hint = None  # None: the teacher's hint layer is computed per batch (a set too large to keep)
        if fits(len(train.images) * tokens * width * 4):
            self.t_hint = kept(teacher, "fitnet-hint", set_key(train.images, []),
                               lambda: _teacher_hints(teacher, train.images), log)

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict]:
        from pqk.methods.cmapkd.losses import fitnet_hint

        if self.t_hint is not None:
            t_hint = self.t_hint[batch.index]
        else:
            with torch.no_grad():
                t_hint = _hint_layer(teacher, batch.images)[1]
        s_image, s_hint = _hint_layer(student, batch.images)
        s_text = student.encode_text(batch.tokens)
        logits = student.logit_scale.exp() * F.normalize(s_image, dim=-1) @ F.normalize(s_text, dim=-1).t()
        hint = fitnet_hint(s_hint, t_hint, self.modules["regressor"])
        task = clip_loss(logits)
        return self.spec.task_weight * task + self.hint_weight * hint, {"loss_hint": hint.item(), "loss_task": task.item()}


class ClipKDObjective(Objective):

    def __init__(self, spec: ClipTrainSpec, teacher, student, feature_weight: float = 1.0, affinity_weight: float = 1.0):
        super().__init__(spec)
        self.feature_weight, self.affinity_weight = feature_weight, affinity_weight
        self.modules["image_projector"] = nn.Linear(_embed_dim(student), _embed_dim(teacher))
        self.modules["text_projector"] = nn.Linear(_embed_dim(student), _embed_dim(teacher))

    def prepare(self, teacher, train, captions, log) -> None:
        self.keep_teacher_embeddings(teacher, train, captions, log)

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict]:
        from pqk.methods.cmapkd.losses import affinity_mimic, feature_mimic

        t_image, t_text = self.t_image[batch.index], self.t_text[batch.caption]
        s_image, s_text = student.encode_image(batch.images), student.encode_text(batch.tokens)
        logits = student.logit_scale.exp() * F.normalize(s_image, dim=-1) @ F.normalize(s_text, dim=-1).t()
        feature = feature_mimic(s_image, t_image, self.modules["image_projector"]) + \
            feature_mimic(s_text, t_text, self.modules["text_projector"])
        affinity = affinity_mimic(s_image, s_text, t_image, t_text)
        task = clip_loss(logits)
        loss = self.spec.task_weight * task + self.feature_weight * feature + self.affinity_weight * affinity
        return loss, {"loss_feature": feature.item(), "loss_affinity": affinity.item(), "loss_task": task.item()}
