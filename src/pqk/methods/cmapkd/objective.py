"""CMAPKD's training objective (seed 004 §4): both models read through their pyramids (UCMP), the
student's levels pulled toward the teacher's with ALSN's per-sample weights (L_intra), the
cross-modal alignment (single level P5↔L4 and the 4×4 pyramid KL), the relational terms and
the task loss, on the progressive schedule of Table 1.

Decisions where the seed is silent (also in the README):
- The teacher's pyramid is not trained: it is built from a fixed seed (TEACHER_PYRAMID_SEED, the
  same whatever the run's seed: it is part of the target, not of the run) and frozen (a random
  projection keeps the geometry of the teacher's features; a trained one could meet the
  student's at a trivial solution). The student's pyramid, bridges and ALSN train. Being frozen,
  its outputs on the training set are computed once (`teacher_cache`) when they fit in memory.
- ALSN reads the teacher's global features (GAP(P5), L4), so a sample's weights depend on the
  sample, not on how far the student has come.
- Teacher and student tokenise text differently (the LiT teacher: WordPiece; a CLIP student:
  BPE), so their token positions do not correspond: the language levels are compared after
  masked mean pooling. The visual maps are compared as maps (resized when grids differ).
- Relation: the sample term compares the final image embeddings' B×B similarities, the layer
  term the 4×4 correlations of the visual levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pqk.methods.clip.train import Batch, ClipTrainSpec, Objective
from pqk.methods.cmapkd.baselines import _embed_dim
from pqk.methods.cmapkd.pyramid import VisualPyramid

ALSN_MODES = ("adaptive", "uniform", "manual")
TEACHER_PYRAMID_SEED = 43  # pqk's seed + 1: the teacher's frozen pyramid, whatever the run's seed
SCHEDULES = ("progressive", "one_stage")


@dataclass(frozen=True)
class CmapkdSpec:
    train: ClipTrainSpec
    channels: int = 64  # the paper's 256; 64 keeps the 3x3 convs of the 4g x 4g level affordable on a CPU
    visual_pyramid: bool = True  # False: P5 only (ablation "w/o visual pyramid")
    language_hierarchy: bool = True  # False: L4 only
    alsn: str = "adaptive"  # uniform | manual [0.1, 0.2, 0.3, 0.4] (ablations)
    align: bool = True
    relation: bool = True
    schedule: str = "progressive"  # one_stage (ablation)
    stage_lr: bool = True  # Table 1's per-stage LR ratios (1, 0.6, 0.2; ALSN 2); False: every stage at the run's LR
    weights: object = field(default=None)  # losses.LossWeights; None: the seed's


class CmapkdObjective(Objective):
    needs_teacher_tokens = True

    def __init__(self, spec: CmapkdSpec, teacher, student):
        from pqk.methods.cmapkd.alsn import ALSN, one_stage_schedule, progressive_schedule, refinement_epochs
        from pqk.methods.cmapkd.losses import LossWeights, layer_compatibility
        from pqk.methods.cmapkd.pyramid import UCMP
        from pqk.methods.cmapkd.taps import tap_widths

        super().__init__(spec.train)
        self.cmapkd = spec
        self.w = spec.weights or LossWeights()
        vision_t, text_t = tap_widths(teacher)
        vision_s, text_s = tap_widths(student)
        generator_state = torch.get_rng_state()
        torch.manual_seed(TEACHER_PYRAMID_SEED)  # the teacher's frozen pyramid: the same for every run and seed
        self.teacher_pyramid = UCMP(vision_t, text_t, spec.channels).eval()
        for p in self.teacher_pyramid.parameters():
            p.requires_grad_(False)
        torch.set_rng_state(generator_state)
        self.modules["pyramid"] = UCMP(vision_s, text_s, spec.channels)
        self.modules["alsn"] = ALSN(spec.channels, spec.channels)
        epochs = spec.train.epochs
        self.schedule = progressive_schedule(epochs, refine_alsn=spec.alsn == "adaptive") \
            if spec.schedule == "progressive" else one_stage_schedule(epochs)
        self.extra_epochs = refinement_epochs(self.schedule)  # ALSN alone, after the student's epochs
        self.alpha = layer_compatibility()

    def prepare(self, teacher, train, captions, log) -> None:
        from pqk.methods.clip.teacher_cache import fits, kept, set_key

        teacher.eval()
        log(f"CMAPKD: {self.cmapkd.channels}-channel pyramids, schedule "
            + ", ".join(f"{s.name} {s.epochs}" for s in self.schedule))
        c, grid = self.cmapkd.channels, int(round((teacher.visual.positional_embedding.shape[0] - 1) ** 0.5))
        per_image = (sum(s * s for s in VisualPyramid.sizes(grid)) * c + 8 * c + _embed_dim(teacher)) * 4
        self.targets = None  # None: the teacher's side is computed per batch (a set too large to keep)
        if fits(per_image * len(train.images) + 16 * c * len(captions)):
            self.targets = kept(teacher, f"cmapkd-pyramid-{c}-{TEACHER_PYRAMID_SEED}", set_key(train.images, captions),
                                lambda: teacher_side_of_set(teacher, self.teacher_pyramid, train.images, captions, log), log)

    def teacher_side(self, teacher, batch: Batch) -> TeacherSide:
        if self.targets is not None:
            t = self.targets
            return TeacherSide([v[batch.index] for v in t.visual], t.visual_levels[batch.index],
                               t.visual_aligned[batch.index], t.image_features[batch.index],
                               t.language_levels[batch.caption])
        return teacher_side(teacher, self.teacher_pyramid, batch.images, batch.teacher_tokens)

    def stage(self, epoch: int):
        from pqk.methods.cmapkd.alsn import stage_at

        return stage_at(self.schedule, epoch)

    def lr_scale(self, epoch: int, group: str) -> float:
        stage = self.stage(epoch)
        scale = stage.lr_scale if self.cmapkd.stage_lr else 1.0
        if stage.alsn == "frozen-backbone":  # only ALSN learns
            return scale if group == "alsn" else 0.0
        if group == "alsn" and (stage.alsn == "uniform" or self.cmapkd.alsn != "adaptive"):
            return 0.0
        return scale

    def _weights(self, stage, t_out: TeacherSide, n: int):
        from pqk.methods.cmapkd.alsn import manual_weights, uniform_weights

        if self.cmapkd.alsn == "manual":
            w = manual_weights(n)
            return w, w, None
        if self.cmapkd.alsn == "uniform" or stage.alsn == "uniform":
            w = uniform_weights(n)
            return w, w, None
        w_v, w_l = self.modules["alsn"](t_out.visual_levels[:, 3].detach(), t_out.language_levels[:, 3].detach())
        return w_v, w_l, w_v

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict]:
        from pqk.methods.cmapkd import losses
        from pqk.methods.cmapkd.alsn import entropy_diversity
        from pqk.methods.cmapkd.taps import tap

        stage = self.stage(epoch)
        with torch.no_grad():
            t_out = self.teacher_side(teacher, batch)
        with torch.set_grad_enabled(stage.alsn != "frozen-backbone"):  # ALSN alone: nothing else needs gradients
            s = tap(student, batch.images, batch.tokens)
            s_out = self.modules["pyramid"](s.vision, s.grid, s.text, s.mask, s.pooled)
        w_v, w_l, adaptive = self._weights(stage, t_out, len(batch.images))
        vision_levels = stage.vision_levels if self.cmapkd.visual_pyramid else (3,)
        language_levels = stage.language_levels if self.cmapkd.language_hierarchy else (3,)
        parts = {
            "intra": losses.intra_loss(s_out.visual, t_out.visual, w_v, active=vision_levels)
            + losses.intra_loss(list(s_out.language_levels.unbind(1)), list(t_out.language_levels.unbind(1)), w_l,
                                active=language_levels),
            "task": losses.clip_task_loss(student.logit_scale.exp() * F.normalize(s.image_features, dim=-1)
                                          @ F.normalize(s.text_features, dim=-1).t()),
        }
        if self.cmapkd.align:
            parts["align"] = losses.align_loss(s_out.visual_aligned[:, 3], s_out.language_levels[:, 3],
                                               t_out.visual_aligned, t_out.language_levels, s_out.visual_aligned,
                                               s_out.language_levels, self.alpha, beta=self.w.beta, tau=self.w.tau)
        if self.cmapkd.relation:
            parts["relation"] = losses.relation_loss(t_out.image_features, s.image_features, t_out.visual_levels,
                                                     s_out.visual_levels, gamma=self.w.gamma)
        if adaptive is not None:
            parts["diversity"] = entropy_diversity(w_v) + entropy_diversity(w_l)
        logs = {f"loss_{k}": v.item() for k, v in parts.items()}
        logs["stage"] = stage.name
        logs["w_v"] = [round(x, 4) for x in w_v.detach().mean(0).tolist()]
        logs["w_l"] = [round(x, 4) for x in w_l.detach().mean(0).tolist()]
        return losses.total_loss(parts, self.w), logs


@dataclass
class TeacherSide:
    """The frozen teacher's pyramid outputs that CMAPKD's losses read, for a batch or a whole set."""

    visual: list[torch.Tensor]  # [P2..P5] maps (N, C, s, s)
    visual_levels: torch.Tensor  # (N, 4, C)
    visual_aligned: torch.Tensor  # (N, 4, C)
    image_features: torch.Tensor  # (N, E) encode_image
    language_levels: torch.Tensor  # (M, 4, C), one row per caption


@torch.no_grad()
def teacher_side(teacher, pyramid, images: torch.Tensor, tokens: torch.Tensor) -> TeacherSide:
    """The teacher's side for normalised `images` and their captions' teacher token ids."""
    from pqk.methods.cmapkd.taps import tap_image, tap_text, trim_padding

    vision, grid, image_features = tap_image(teacher, images)
    visual, visual_levels, visual_aligned = pyramid.visual_side(vision, grid)
    text, mask, pooled, _ = tap_text(teacher, trim_padding(teacher, tokens))
    _, language_levels, _ = pyramid.language_side(text, mask, pooled)
    return TeacherSide(visual, visual_levels, visual_aligned, image_features, language_levels)


@torch.no_grad()
def teacher_side_of_set(teacher, pyramid, images, captions: list[str], log) -> TeacherSide:
    """teacher_side over a whole training set (uint8 images, every caption), in the fixed chunks
    of `teacher_cache.in_chunks`, so every run gets the same targets."""
    from pqk.methods.cmapkd.taps import tap_image, tap_text, trim_padding
    from pqk.methods.clip.teacher_cache import in_chunks
    from pqk.models.clip.family import text_tokenizer
    from pqk.tasks.clip.measure import model_inputs

    log(f"CMAPKD teacher targets: {len(images)} images, {len(captions)} captions")
    tokenize = text_tokenizer(teacher)

    def image_chunk(part: slice):
        vision, grid, features = tap_image(teacher, model_inputs(images[part]))
        return (*pyramid.visual_side(vision, grid), features)

    def text_chunk(part: slice):
        text, mask, pooled, _ = tap_text(teacher, trim_padding(teacher, tokenize(captions[part])))
        return pyramid.language_side(text, mask, pooled)[1]

    chunks = in_chunks(len(images), image_chunk)
    return TeacherSide([torch.cat([c[0][k] for c in chunks]) for k in range(4)], torch.cat([c[1] for c in chunks]),
                       torch.cat([c[2] for c in chunks]), torch.cat([c[3] for c in chunks]),
                       torch.cat(in_chunks(len(captions), text_chunk)))


SAMPLE_TYPES = ("simple scene", "many objects", "small objects", "abstract caption")


@torch.no_grad()
def figure_data(objective: CmapkdObjective, teacher, student, val, max_samples: int = 200, tsne_samples: int = 100) -> dict:
    """What the report's Figures 3-6 plot, measured on generated validation images (never the
    workload): ALSN's weights per sample against the sample's difficulty, per sample type, a
    t-SNE of both models' pooled visual levels, and the student's 4x4 cross-modal similarities."""
    from pqk.data.captions import caption_attributes
    from pqk.methods.cmapkd.taps import tap
    from pqk.models.clip.family import text_tokenizer
    from pqk.tasks.clip.measure import model_inputs

    n = min(max_samples, len(val.images))
    images = model_inputs(val.images[:n])
    first = [caps[0] for caps in val.captions[:n]]
    abstract = [min(caps, key=lambda c: len(caption_attributes(c))) for caps in val.captions[:n]]
    pyramid, alsn = objective.modules["pyramid"].eval(), objective.modules["alsn"].eval()

    def levels(texts: list[str]):
        t = tap(teacher, images, text_tokenizer(teacher)(texts))
        s = tap(student, images, text_tokenizer(student)(texts))
        return t, objective.teacher_pyramid(t.vision, t.grid, t.text, t.mask, t.pooled), \
            pyramid(s.vision, s.grid, s.text, s.mask, s.pooled)

    t, t_out, s_out = levels(first)
    w_v, w_l = alsn(t_out.visual_levels[:, 3], t_out.language_levels[:, 3])
    sims = F.normalize(t.image_features, dim=-1) @ F.normalize(t.text_features, dim=-1).t()
    difficulty = (sims > sims.diag()[:, None]).sum(dim=1).float()  # the teacher's rank of the own caption
    per_type = {}
    if all("objects" in m for m in val.meta[:n]):  # generated scenes know their objects; a user's folder does not
        objects = [m["objects"] for m in val.meta[:n]]
        types = {"simple scene": [len(o) == 1 for o in objects], "many objects": [len(o) >= 3 for o in objects],
                 # a scene's main object is always large, so "small objects" = two or more small ones
                 "small objects": [sum(x["size"] == "small" for x in o) >= 2 for o in objects]}
        per_type = {name: _mean_weights(w_v, w_l, torch.tensor(mask)) for name, mask in types.items()}
    _, t_abs, _ = levels(abstract)
    a_v, a_l = alsn(t_abs.visual_levels[:, 3], t_abs.language_levels[:, 3])
    per_type["abstract caption"] = _mean_weights(a_v, a_l, torch.ones(n, dtype=torch.bool))
    return {
        "alsn": {"difficulty": difficulty.tolist(), "w_v": w_v.tolist(), "w_l": w_l.tolist(),
                 "difficulty_definition": "the teacher's image→text rank of the image's first caption among "
                                          f"{n} generated validation captions (0 = retrieved first)"},
        "sample_types": per_type,
        "tsne": _tsne(t_out.visual_levels[:tsne_samples], s_out.visual_levels[:tsne_samples]),
        # cross_modal[i][j]: mean over samples of cos(student V_aligned level i, student language level j)
        "cross_modal": (torch.einsum("nic,njc->ij", F.normalize(s_out.visual_aligned, dim=-1),
                                     F.normalize(s_out.language_levels, dim=-1)) / n).tolist(),
    }


def _mean_weights(w_v: torch.Tensor, w_l: torch.Tensor, mask: torch.Tensor) -> dict:
    if not bool(mask.any()):
        return {"n": 0, "w_v": None, "w_l": None}
    return {"n": int(mask.sum()), "w_v": w_v[mask].mean(0).tolist(), "w_l": w_l[mask].mean(0).tolist()}


def _tsne(teacher_levels: torch.Tensor, student_levels: torch.Tensor) -> dict:
    """2-D t-SNE (scikit-learn, seed 42) of every sample's four pooled visual levels, both models."""
    from sklearn.manifold import TSNE

    feats = torch.cat([F.normalize(teacher_levels.flatten(0, 1), dim=-1), F.normalize(student_levels.flatten(0, 1), dim=-1)])
    n = len(teacher_levels)
    points = TSNE(n_components=2, perplexity=min(30.0, (len(feats) - 1) / 3), random_state=42, init="pca").fit_transform(
        feats.numpy())
    return {"points": points.tolist(), "model": ["teacher"] * (4 * n) + ["student"] * (4 * n),
            "level": list(range(4)) * (2 * n)}
