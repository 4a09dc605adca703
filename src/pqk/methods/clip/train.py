"""Training a CLIP-family student against a teacher on the generated caption set: the plain
distillation baseline of K (and the recovery fine-tune after pruning).

Loss = task_weight · CLIP contrastive loss (the student's own image–caption logits)
     + kd_weight · T² · KL(teacher ‖ student) over the batch's image→text and text→image
       similarity distributions at temperature T (Hinton KD on the logits a dual encoder has).
The teacher is frozen, so its normalised embeddings of every training image and caption are
computed once. Each epoch ends with a validation (retrieval R mean on generated validation
images, never the workload) and an atomic checkpoint, from which a killed step resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pqk.errors import ConfigError
from pqk.train.clip_teacher import TRAIN_SEED, VAL_SEED, clip_loss
from pqk.train.schedule import warmup_cosine


@dataclass(frozen=True)
class ClipTrainSpec:
    n_train: int = 3000
    n_val: int = 200
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    T: float = 2.0
    kd_weight: float = 1.0
    task_weight: float = 1.0
    seed: int = 42
    # a folder in the caption format (captions.jsonl + images; COCO/Flickr30k converted) to train on
    # instead of the generated scenes: its first n_train captioned images; validation on `val_data`,
    # else on its last n_val captioned images (held out of training)
    data: str = ""
    val_data: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> ClipTrainSpec:
        known = {f.name: f.type for f in fields(cls)}
        bad = sorted(set(raw) - set(known))
        if bad:
            raise ConfigError(f"{where}: unknown training key {bad[0]!r}; accepted: {', '.join(known)}")
        for key, value in raw.items():
            if known[key] == "str":
                if not isinstance(value, str) or (value and not Path(value).is_dir()):
                    raise ConfigError(f"{where}: {key} = {value!r} must be a folder in the caption format "
                                      "(captions.jsonl + images; see `pqk eval --help`)")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where}: {key} = {value!r} must be a number >= 0")
        spec = cls(**{k: (v if known[k] == "str" else int(v) if known[k] == "int" else float(v)) for k, v in raw.items()})
        if spec.batch_size < 2 or spec.n_train < spec.batch_size:
            raise ConfigError(f"{where}: batch_size must be >= 2 and <= n_train (a contrastive batch needs negatives)")
        return spec

    def scaled(self, budget: float) -> ClipTrainSpec:
        """Budget < 1 shortens training: fewer epochs first, then fewer images."""
        if budget >= 1:
            return self
        epochs = max(1, round(self.epochs * min(1.0, budget * 4)))
        n_train = max(self.batch_size * 4, round(self.n_train * min(1.0, budget * 2)))
        return replace(self, epochs=epochs, n_train=n_train, n_val=max(64, min(self.n_val, n_train // 4)))


def training_sets(spec: ClipTrainSpec, image_size: int):
    """(training set, validation set) at `image_size`: generated scenes (TRAIN_SEED / VAL_SEED), or
    the user's caption folder(s) (`spec.data`, `spec.val_data`). Never the workload."""
    from pqk.data.captions.folder import load_caption_folder
    from pqk.data.captions.generated import generate_caption_set
    from pqk.errors import InputError

    if not spec.data:
        return (generate_caption_set(spec.n_train, TRAIN_SEED, "train", image_size),
                generate_caption_set(spec.n_val, VAL_SEED, "test", image_size))
    data = load_caption_folder(spec.data, image_size)
    captioned = [i for i, caps in enumerate(data.captions) if caps]
    if spec.val_data:
        val = load_caption_folder(spec.val_data, image_size)
        val = val.subset([i for i, caps in enumerate(val.captions) if caps][: spec.n_val])
    else:
        held = min(spec.n_val, len(captioned) // 5)
        val, captioned = data.subset(captioned[len(captioned) - held:]), captioned[: len(captioned) - held]
    train = data.subset(captioned[: spec.n_train])
    if len(train) < spec.batch_size or len(val) < 2:
        raise InputError(f"{spec.data}: {len(train)} captioned training images and {len(val)} validation images; "
                         f"training needs at least batch_size = {spec.batch_size} and validation 2")
    return train, val


@torch.no_grad()
def teacher_text_features(teacher, captions: list[str]) -> torch.Tensor:
    """Normalised teacher text embeddings; the LiT teacher's locked tower is run with padding
    columns trimmed (the same numbers, several times faster on short captions)."""
    from pqk.models.clip.family import text_tokenizer
    from pqk.models.clip.lit import LiTCLIP
    from pqk.train.clip_teacher import pooled_text_states

    if isinstance(teacher, LiTCLIP):
        return F.normalize(pooled_text_states(teacher, captions) @ teacher.text_projection, dim=-1)
    tokenize = text_tokenizer(teacher)
    return F.normalize(torch.cat([teacher.encode_text(tokenize(captions[k:k + 256]))
                                  for k in range(0, len(captions), 256)]), dim=-1)


@torch.no_grad()
def image_features(model, images: torch.Tensor) -> torch.Tensor:
    from pqk.tasks.clip.measure import model_inputs

    return torch.cat([model.encode_image(model_inputs(images[k:k + 128])) for k in range(0, len(images), 128)])


@torch.no_grad()
def val_r_mean(model, val, tokens: torch.Tensor, owner: list[int]) -> float:
    from pqk.tasks.clip.metrics import retrieval_recalls

    model.eval()
    text = torch.cat([model.encode_text(tokens[k:k + 256]) for k in range(0, len(tokens), 256)])
    return retrieval_recalls(image_features(model, val.images), text, owner)["r_mean"]


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T over the image→text rows and the text→image rows
    of the batch's similarity logits, averaged (Hinton KD where a dual encoder has logits)."""
    def kl(s, t):
        return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), log_target=True, reduction="batchmean")

    return 0.5 * T * T * (kl(student_logits, teacher_logits) + kl(student_logits.t(), teacher_logits.t()))


@dataclass
class Batch:
    """One training step's data: images (normalised), the student's and the teacher's token ids of
    one caption per image, and which images and captions of the training set they are."""

    images: torch.Tensor
    tokens: torch.Tensor
    teacher_tokens: torch.Tensor | None
    index: torch.Tensor
    caption: torch.Tensor


class Objective:
    """What a student is trained on. The default is the plain baseline: the contrastive task loss
    plus Hinton KD on the teacher's similarity logits (teacher embeddings computed once). Other
    objectives (CMAPKD, FitNet, CLIP-KD) override `prepare`, `loss` and, when they train modules
    of their own, `modules` and `lr_scale`."""

    needs_teacher_tokens = False
    extra_epochs = 0  # epochs after the student's own in which only the objective's modules train

    def __init__(self, spec: ClipTrainSpec):
        self.spec = spec
        self.modules = torch.nn.ModuleDict()  # trained beside the student, saved in the step's state

    def prepare(self, teacher, train, captions: list[str], log: Callable[[str], None]) -> None:
        if self.spec.kd_weight > 0:
            self.keep_teacher_embeddings(teacher, train, captions, log)

    def keep_teacher_embeddings(self, teacher, train, captions: list[str], log: Callable[[str], None]) -> None:
        """self.t_image, self.t_text: the teacher's normalised embeddings of every training image
        and caption (computed once per teacher and set: `teacher_cache`); self.t_scale its logit scale."""
        from pqk.methods.clip.teacher_cache import kept, set_key

        def compute():
            log(f"teacher targets: {len(train.images)} images, {len(captions)} captions")
            return F.normalize(image_features(teacher, train.images), dim=-1), teacher_text_features(teacher, captions)

        teacher.eval()
        self.t_image, self.t_text = kept(teacher, "embeddings", set_key(train.images, captions), compute, log)
        self.t_scale = teacher.logit_scale.detach().exp().item()

    def lr_scale(self, epoch: int, group: str) -> float:
        return 1.0

    def loss(self, student, teacher, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict]:
        logits, _ = student(batch.images, batch.tokens)
        loss = self.spec.task_weight * clip_loss(logits)
        if self.spec.kd_weight > 0:
            teacher_logits = self.t_scale * self.t_image[batch.index] @ self.t_text[batch.caption].t()
            loss = loss + self.spec.kd_weight * logit_kd(logits, teacher_logits, self.spec.T)
        return loss, {}


def train_student(student, teacher, spec: ClipTrainSpec, out_dir: Path, log: Callable[[str], None] = print,
                  resume: bool = True, objective: Objective | None = None,
                  sets: tuple[Any, Any] | None = None) -> tuple[Any, list[dict], float]:
    """Train `student` (in place) against `teacher` on `objective` (default: task loss + logit KD);
    returns (student, history, wall hours). `sets`: (train, val) when the caller already holds
    `training_sets(spec, ...)` (else they are made here)."""
    from pqk.io.files import atomic_torch_save
    from pqk.models.clip.family import image_resolution, text_tokenizer
    from pqk.tasks.clip.measure import model_inputs

    start = time.perf_counter()
    objective = objective or Objective(spec)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    train, val = sets or training_sets(spec, image_resolution(student))
    captions = [c for caps in train.captions for c in caps]
    counts = torch.tensor([len(c) for c in train.captions])
    starts = torch.cumsum(counts, 0) - counts
    tokenize = text_tokenizer(student)
    tokens = tokenize(captions)
    teacher_tokens = text_tokenizer(teacher)(captions) if objective.needs_teacher_tokens else None
    val_owner = [i for i, caps in enumerate(val.captions) for _ in caps]
    val_tokens = tokenize([c for caps in val.captions for c in caps])
    objective.prepare(teacher, train, captions, log)
    groups = [("student", [p for p in student.parameters() if p.requires_grad])]
    groups += [(name, list(module.parameters())) for name, module in objective.modules.items()]
    params = [p for _, group in groups for p in group]
    opt = torch.optim.AdamW([{"params": g, "name": n} for n, g in groups], lr=spec.lr, weight_decay=spec.weight_decay)
    per_epoch = max(1, len(train.images) // spec.batch_size)
    student_steps = per_epoch * spec.epochs
    total = per_epoch * (spec.epochs + objective.extra_epochs)
    step, history = 0, []
    state_file = Path(out_dir) / "train_state.pth"
    if resume and state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        student.load_state_dict(state["model"])
        objective.modules.load_state_dict(state.get("objective", {}))
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        log(f"resumed at step {step}/{total}")
    while step < total:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(spec.seed + epoch))
        idx = order[k * spec.batch_size:(k + 1) * spec.batch_size]
        pick = starts[idx] + (torch.rand(len(idx)) * counts[idx]).long()
        student.train()
        objective.modules.train()
        # the student's LR schedule spans its own epochs; the objective's extra epochs run at the peak LR
        lr = warmup_cosine(step, student_steps, spec.warmup_steps, spec.lr) if step < student_steps else spec.lr
        for group in opt.param_groups:
            group["lr"] = lr * objective.lr_scale(epoch, group["name"])
        batch = Batch(model_inputs(train.images[idx]), tokens[pick],
                      None if teacher_tokens is None else teacher_tokens[pick], idx, pick)
        loss, logs = objective.loss(student, teacher, batch, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            student.logit_scale.clamp_(0, 4.6052)
        step += 1
        if step % per_epoch == 0:
            history.append({"epoch": step // per_epoch, "loss": loss.item(), "lr": lr, **logs,
                            "val_r_mean": val_r_mean(student, val, val_tokens, val_owner)})
            last = history[-1]
            log(f"epoch {last['epoch']}/{spec.epochs + objective.extra_epochs}: loss {last['loss']:.3f}, val R mean {last['val_r_mean']:.3f}")
            atomic_torch_save({"model": student.state_dict(), "objective": objective.modules.state_dict(),
                               "opt": opt.state_dict(), "step": step, "history": history,
                               "rng": torch.get_rng_state()}, state_file)
    student.eval()
    return student, history, (time.perf_counter() - start) / 3600.0
