"""Training the embedded CLIP-family teacher: a LiT dual encoder (`pqk.models.clip.lit`) whose
image tower learns, with CLIP's contrastive loss, to meet the locked real MiniLM text tower
on the generated caption set (`pqk.data.captions`).

The text tower is locked, so every caption's pooled MiniLM state is computed once and cached
(the trained text side is only the projection); each step draws one caption per image.
Seeded (42) and checkpointed atomically every `checkpoint_every` steps: a killed run resumes
where it stopped (`last.pth`), and the same recipe reproduces the bundled file's recipe.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pqk.train.schedule import warmup_cosine

TRAIN_SEED = 1_000  # generated-set seeds: training and validation streams differ from the workload's (42)
VAL_SEED = 2_000


@dataclass(frozen=True)
class ClipTeacherRecipe:
    embed_dim: int = 256
    image_resolution: int = 64
    vision_layers: int = 6
    vision_width: int = 192
    vision_patch_size: int = 8
    context_length: int = 32
    n_train: int = 6000  # generated training images (each with several captions)
    n_val: int = 200
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 42

    def scaled(self, factor: float) -> ClipTeacherRecipe:
        """The recipe with its data and epochs scaled by `factor` (the budget knob)."""
        return replace(self, n_train=max(256, round(self.n_train * factor)), n_val=max(64, round(self.n_val * min(1.0, factor * 4))),
                       epochs=max(1, round(self.epochs * min(1.0, factor * 4))))

    def lit_config(self):
        from pqk.models.clip.lit import LiTConfig

        return LiTConfig(self.embed_dim, self.image_resolution, self.vision_layers, self.vision_width,
                         self.vision_patch_size, self.context_length)


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i's caption is text i, and the other way round."""
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target))


@torch.no_grad()
def pooled_text_states(model, captions: list[str], batch: int = 256) -> torch.Tensor:
    """The locked MiniLM's mean-pooled last states of every caption (N, 384): padding columns
    beyond a batch's longest caption are dropped first (masked attention makes them inert)."""
    out = []
    for k in range(0, len(captions), batch):
        ids = model.tokenize(captions[k:k + batch]).long()
        ids = ids[:, : int((ids != 0).sum(dim=1).max())]
        states = model.text(ids)
        mask = (ids != 0).unsqueeze(-1).to(states.dtype)
        out.append((states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9))
    return torch.cat(out)


def _flat_captions(data) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All captions, each image's first caption index and its caption count."""
    captions = [c for caps in data.captions for c in caps]
    counts = torch.tensor([len(c) for c in data.captions])
    starts = torch.cumsum(counts, 0) - counts
    return captions, starts, counts


@torch.no_grad()
def validate(model, images: torch.Tensor, pooled: torch.Tensor, owner: list[int]) -> dict[str, float]:
    from pqk.tasks.clip.measure import model_inputs
    from pqk.tasks.clip.metrics import retrieval_recalls

    model.eval()
    emb = torch.cat([model.encode_image(model_inputs(images[k:k + 128])) for k in range(0, len(images), 128)])
    return retrieval_recalls(emb, pooled @ model.text_projection, owner)


def _state(model, opt, step: int, history: list) -> dict:
    return {"model": {k: v for k, v in model.state_dict().items() if not k.startswith("text.")},
            "opt": opt.state_dict(), "step": step, "history": history, "rng": torch.get_rng_state()}


def train_clip_teacher(recipe: ClipTeacherRecipe, out_dir: Path, log: Callable[[str], None] = print,
                       on_step: Callable[[int, int, dict], None] | None = None):
    """Train (or resume) the LiT teacher in `out_dir`; returns (model, recipe record)."""
    from pqk.data.captions import generate_caption_set
    from pqk.io.files import atomic_torch_save
    from pqk.models.clip.family import save_family_model
    from pqk.models.clip.lit import from_minilm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    model = from_minilm(recipe.lit_config())
    log(f"generating {recipe.n_train} training and {recipe.n_val} validation images")
    train = generate_caption_set(recipe.n_train, TRAIN_SEED, "train", recipe.image_resolution)
    val = generate_caption_set(recipe.n_val, VAL_SEED, "test", recipe.image_resolution)
    captions, starts, counts = _flat_captions(train)
    log(f"caching the locked MiniLM's states of {len(captions)} training captions")
    pooled = pooled_text_states(model, captions)
    val_captions, _, _ = _flat_captions(val)
    val_pooled = pooled_text_states(model, val_captions)
    val_owner = [i for i, caps in enumerate(val.captions) for _ in caps]

    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, len(train.images) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    step, history = 0, []
    state_file = out_dir / "last.pth"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        log(f"resumed at step {step}/{total}")
    from pqk.tasks.clip.measure import model_inputs

    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(recipe.seed + epoch))
        k = step % steps_per_epoch
        idx = order[k * recipe.batch_size:(k + 1) * recipe.batch_size]
        pick = starts[idx] + (torch.rand(len(idx)) * counts[idx]).long()
        model.train()
        lr = warmup_cosine(step, total, recipe.warmup_steps, recipe.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        image = F.normalize(model.encode_image(model_inputs(train.images[idx])), dim=-1)
        text = F.normalize(pooled[pick] @ model.text_projection, dim=-1)
        loss = clip_loss(model.logit_scale.exp() * image @ text.t())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, recipe.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ln 100, as CLIP's training
        step += 1
        logs = {"loss": loss.item(), "lr": lr, "epoch": epoch}
        if step % steps_per_epoch == 0 or step == total:
            logs.update({f"val_{k}": v for k, v in validate(model, val.images, val_pooled, val_owner).items()})
            history.append({"step": step, **logs})
            log(f"epoch {epoch + 1}: loss {logs['loss']:.3f}, val R mean {logs['val_r_mean']:.3f}")
        if on_step:
            on_step(step, total, logs)
        if step % recipe.checkpoint_every == 0 or step == total:
            atomic_torch_save(_state(model, opt, step, history), state_file)
    model.eval()
    record = {
        "recipe": asdict(recipe), "steps": total, "wall_s_this_run": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "history": history, "final_val": history[-1] if history else None,
        "text_tower": "all-MiniLM-L6-v2 (locked)",
        "params": {"image_tower_and_projections": sum(p.numel() for p in trained),
                   "text_tower_locked": sum(p.numel() for p in model.text.parameters())},
    }
    save_family_model(model, out_dir / "teacher.safetensors", history=[{"step": "teacher", "recipe": asdict(recipe)}])
    (out_dir / "teacher_recipe.json").write_text(json.dumps(record, indent=1))
    return model, record
