"""K-only (protocol stage P1): distil a DUSt3R teacher into a smaller student.

**Student.** `derive_student(teacher, ratio)` cuts encoder and decoder depth, attention heads
and FFN width each by about `ratio` and copies the teacher's weights into what is left
(weight inheritance, as TinyCLIP and Minitron): evenly spaced layers, and in each kept layer
the heads and FFN channels of largest weight magnitude. Embedding widths are kept, so head_dim
stays (RoPE needs it divisible by 4, and the teacher's already is), the patch embedding, norms,
decoder embedding and heads are copied whole, and the reduced widths go into
`Dust3rConfig.block_widths`: `build_model`, `load_checkpoint` and the ONNX export read them.

Rounding (r = ratio, x -> round half up):
- depth: L' = max(1, round(L·(1−r))), layers round(k·(L−1)/(L'−1)), k = 0..L'−1 (the first and
  last layers are always kept: the first reads the patch embedding, the last feeds the head);
  both decoders keep the same layers (they exchange tokens layer by layer). A DPT head keeps
  L' ≥ 10 decoder layers: its hooks [0, L'/2, 3L'/4, L'] are recomputed from L' and the
  official head asserts dec_depth > 9. The teacher (6+4 layers) becomes 4+3: layers [0,2,3,5]
  and [0,2,3].
- heads per block: h' = max(1, round(h·(1−r))): 4 -> 3. Importance of a head: L1 norm of its
  rows of qkv (q, k and v; projq/projk/projv for cross-attention) plus its columns of proj.
- FFN hidden per block: a multiple of 8, f' = max(8, 8·round(f·(1−r)/8)): 768 -> 536, 512 -> 360.
  Importance of a channel: L1 norm of its row of fc1 plus its column of fc2.
- ratio 0 copies the model as it is (a P→K plan distils an already-pruned model that way).

**Loss.** L = α·L_task + β(t)·KL_T + γ·F, t = training progress in [0, 1].
- L_task: DUSt3R's confidence-weighted regression loss (`conf_regression_loss`, α_conf = 0.2)
  against ground truth; a pair without any valid GT pixel is scored against the teacher's
  pointmaps instead (pseudo-labels, all pixels valid).
- KL_T, channel-wise distillation (Shu et al., ICCV 2021): each of the 8 output maps (x, y, z
  and confidence of both views) becomes a distribution over the H·W pixels by a softmax at
  temperature T; KL(teacher ‖ student) per map, times T², averaged over maps and pairs. The
  maps are made comparable first: pointmaps are divided by their own mean distance to the
  origin (the normalisation of L_task, so scale, which DUSt3R cannot know, is not
  penalised), confidence enters as log(conf), and each map is standardised by the *teacher's*
  spatial mean and std (applied to both), so T means the same for x, y, z and confidence in
  any scene. Without standardisation normalised coordinates span ~±1 and any T ≥ 3 would make
  every softmax uniform; standardised maps span ~±3, so T = 3 (K-1) is sharper than T = 5 (K-2),
  as the grid intends, and for large T the term tends to ½·Var of the standardised difference.
- F, feature distillation (FitNet): the tokens after every student block against those of the
  teacher layer it was copied from (encoder, both decoders), mean squared error divided by the
  teacher tokens' mean square (so γ does not depend on the residual stream's growth with
  depth); a learned Linear projection (trained and checkpointed with the student) where
  widths differ. Only computed when γ > 0.
- β(t) follows `beta_schedule`: [[start, β], ...] piecewise constant; K-3 is
  [[0.7, 0.7]]: 0.5 for the first 70% of steps, then 0.7.

Training is `pqk.train.trainer.fit` (AdamW, warm-up + cosine, clipping, validation every
epoch, early stopping, best/last checkpoints, exact resume, DDP). A pair's teacher outputs
are recomputed each step (no cache): the teacher is frozen and small next to the student's
backward pass, and a cache would not survive random pair sampling.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqk.errors import ConfigError
from pqk.models.dust3r import build_model
from pqk.methods.base import StepContext, StepResult
from pqk.train.losses import conf_regression_loss, normalize_pair
from pqk.train.trainer import FitResult, TrainSpec, fit, unwrap

DPT_MIN_DEC_DEPTH = 10  # the official DPT head asserts dec_depth > 9
CONF_ALPHA = 0.2  # DUSt3R's ConfLoss alpha


# --- the student ----------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def kept_depth(depth: int, ratio: float, minimum: int = 1) -> int:
    return min(depth, max(minimum, _round_half_up(depth * (1.0 - ratio))))


def evenly_spaced(depth: int, keep: int) -> list[int]:
    """`keep` layer indices out of `depth`, first and last included, evenly spread."""
    if keep >= depth:
        return list(range(depth))
    if keep == 1:
        return [depth - 1]
    return [_round_half_up(k * (depth - 1) / (keep - 1)) for k in range(keep)]


def kept_heads(heads: int, ratio: float) -> int:
    return max(1, _round_half_up(heads * (1.0 - ratio)))


def kept_hidden(hidden: int, ratio: float) -> int:
    return min(hidden, max(8, 8 * _round_half_up(hidden * (1.0 - ratio) / 8)))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Largest k, returned in their original order so the copied layout stays the teacher's.
    return sorted(torch.topk(scores, k).indices.tolist())


def _head_rows(head: int, head_dim: int) -> list[int]:
    return list(range(head * head_dim, (head + 1) * head_dim))


def _self_attn_scores(attn: nn.Module) -> torch.Tensor:
    nh, hd = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.detach().abs()
    rows = w.reshape(3, nh, hd, -1).sum(dim=(0, 2, 3))  # (nh,)
    cols = attn.proj.weight.detach().abs().reshape(-1, nh, hd).sum(dim=(0, 2))
    return rows + cols


def _cross_attn_scores(attn: nn.Module) -> torch.Tensor:
    nh, hd = attn.num_heads, attn.head_dim
    rows = sum(lin.weight.detach().abs().reshape(nh, hd, -1).sum(dim=(1, 2)) for lin in (attn.projq, attn.projk, attn.projv))
    cols = attn.proj.weight.detach().abs().reshape(-1, nh, hd).sum(dim=(0, 2))
    return rows + cols


def _mlp_scores(mlp: nn.Module) -> torch.Tensor:
    return mlp.fc1.weight.detach().abs().sum(1) + mlp.fc2.weight.detach().abs().sum(0)


@torch.no_grad()
def _copy_self_attn(dst: nn.Module, src: nn.Module, heads: list[int]) -> None:
    nh, hd = src.num_heads, src.head_dim
    inner = [r for h in heads for r in _head_rows(h, hd)]
    qkv_rows = [part * nh * hd + r for part in range(3) for r in inner]  # qkv is (3, nh, hd) x dim
    dst.qkv.weight.copy_(src.qkv.weight[qkv_rows])
    dst.qkv.bias.copy_(src.qkv.bias[qkv_rows])
    dst.proj.weight.copy_(src.proj.weight[:, inner])
    dst.proj.bias.copy_(src.proj.bias)


@torch.no_grad()
def _copy_cross_attn(dst: nn.Module, src: nn.Module, heads: list[int]) -> None:
    inner = [r for h in heads for r in _head_rows(h, src.head_dim)]
    for name in ("projq", "projk", "projv"):
        getattr(dst, name).weight.copy_(getattr(src, name).weight[inner])
        getattr(dst, name).bias.copy_(getattr(src, name).bias[inner])
    dst.proj.weight.copy_(src.proj.weight[:, inner])
    dst.proj.bias.copy_(src.proj.bias)


@torch.no_grad()
def _copy_mlp(dst: nn.Module, src: nn.Module, channels: list[int]) -> None:
    dst.fc1.weight.copy_(src.fc1.weight[channels])
    dst.fc1.bias.copy_(src.fc1.bias[channels])
    dst.fc2.weight.copy_(src.fc2.weight[:, channels])
    dst.fc2.bias.copy_(src.fc2.bias)


def _copy_whole(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def derive_student(teacher: nn.Module, ratio: float = 0.3) -> nn.Module:
    """A DUSt3R with depth, heads and FFN width each cut by about `ratio`, initialised from
    `teacher` (see the module docstring for the rounding rule). The student carries
    `pqk_derivation` (what was kept) and `pqk_layer_map` (student layer -> teacher layer)."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio = {ratio!r} is not accepted; expected a number in [0, 1)")
    teacher = unwrap(teacher)
    cfg = teacher.config
    enc_keep = evenly_spaced(cfg.enc_depth, kept_depth(cfg.enc_depth, ratio))
    min_dec = min(cfg.dec_depth, DPT_MIN_DEC_DEPTH) if cfg.head_type == "dpt" else 1
    dec_keep = evenly_spaced(cfg.dec_depth, kept_depth(cfg.dec_depth, ratio, min_dec))

    plan: dict[str, list] = {k: [] for k in ("enc_heads", "enc_mlp", "dec1_heads", "dec1_cross", "dec1_mlp",
                                              "dec2_heads", "dec2_cross", "dec2_mlp")}
    for i in enc_keep:
        blk = teacher.enc_blocks[i]
        plan["enc_heads"].append(_top(_self_attn_scores(blk.attn), kept_heads(blk.attn.num_heads, ratio)))
        plan["enc_mlp"].append(_top(_mlp_scores(blk.mlp), kept_hidden(blk.mlp.fc1.out_features, ratio)))
    for tag, blocks in (("dec1", teacher.dec_blocks), ("dec2", teacher.dec_blocks2)):
        for i in dec_keep:
            blk = blocks[i]
            plan[f"{tag}_heads"].append(_top(_self_attn_scores(blk.attn), kept_heads(blk.attn.num_heads, ratio)))
            plan[f"{tag}_cross"].append(_top(_cross_attn_scores(blk.cross_attn), kept_heads(blk.cross_attn.num_heads, ratio)))
            plan[f"{tag}_mlp"].append(_top(_mlp_scores(blk.mlp), kept_hidden(blk.mlp.fc1.out_features, ratio)))

    widths = {
        "enc_heads": [len(h) for h in plan["enc_heads"]], "enc_mlp_hidden": [len(c) for c in plan["enc_mlp"]],
        **{f"{t}_{k}": [len(x) for x in plan[f"{t}_{p}"]] for t in ("dec1", "dec2")
           for k, p in (("heads", "heads"), ("cross_heads", "cross"), ("mlp_hidden", "mlp"))},
    }
    kwargs = cfg.to_kwargs()
    kwargs.update(enc_depth=len(enc_keep), dec_depth=len(dec_keep), block_widths=widths)
    student = build_model(**kwargs)

    # Copy: everything outside the blocks whole, then each kept block's selected slices.
    for name in ("patch_embed", "enc_norm", "decoder_embed", "dec_norm", "downstream_head1", "downstream_head2"):
        _copy_whole(getattr(student, name), getattr(teacher, name))
    with torch.no_grad():
        student.mask_token.copy_(teacher.mask_token)
    for j, i in enumerate(enc_keep):
        dst, src = student.enc_blocks[j], teacher.enc_blocks[i]
        _copy_whole(dst.norm1, src.norm1)
        _copy_whole(dst.norm2, src.norm2)
        _copy_self_attn(dst.attn, src.attn, plan["enc_heads"][j])
        _copy_mlp(dst.mlp, src.mlp, plan["enc_mlp"][j])
    for tag, s_blocks, t_blocks in (("dec1", student.dec_blocks, teacher.dec_blocks), ("dec2", student.dec_blocks2, teacher.dec_blocks2)):
        for j, i in enumerate(dec_keep):
            dst, src = s_blocks[j], t_blocks[i]
            for norm in ("norm1", "norm2", "norm3", "norm_y"):
                _copy_whole(getattr(dst, norm), getattr(src, norm))
            _copy_self_attn(dst.attn, src.attn, plan[f"{tag}_heads"][j])
            _copy_cross_attn(dst.cross_attn, src.cross_attn, plan[f"{tag}_cross"][j])
            _copy_mlp(dst.mlp, src.mlp, plan[f"{tag}_mlp"][j])

    student.pqk_history = list(getattr(teacher, "pqk_history", []))
    student.pqk_layer_map = {"enc": enc_keep, "dec": dec_keep}
    student.pqk_derivation = {
        "ratio": ratio, "enc_layers": enc_keep, "dec_layers": dec_keep, "block_widths": widths,
        "importance": "L1 weight magnitude (heads: qkv rows + proj columns; FFN: fc1 row + fc2 column)",
    }
    return student.to(next(teacher.parameters()).device)


# --- the loss -------------------------------------------------------------------------------


def output_maps(res1: dict, res2: dict) -> torch.Tensor:
    """(B, 8, H·W): x, y, z, log(conf) of view 1, then of view 2 (in view 1's frame); the
    pointmaps divided by the pair's mean distance to the origin."""
    p1, p2 = res1["pts3d"], res2["pts3d_in_other_view"]
    ones1 = torch.ones(p1.shape[:-1], dtype=torch.bool, device=p1.device)
    ones2 = torch.ones(p2.shape[:-1], dtype=torch.bool, device=p2.device)
    n1, n2 = normalize_pair(p1, p2, ones1, ones2)
    maps = []
    for pts, conf in ((n1, res1["conf"]), (n2, res2["conf"])):
        maps.append(pts.flatten(1, 2).transpose(1, 2))  # (B, 3, HW)
        maps.append(torch.log(conf.clamp_min(1e-6)).flatten(1)[:, None])  # (B, 1, HW)
    return torch.cat(maps, dim=1)


def channel_kl(student_maps: torch.Tensor, teacher_maps: torch.Tensor, T: float) -> torch.Tensor:
    """Channel-wise distillation: KL(softmax(t/T) ‖ softmax(s/T)) over the last (spatial) axis,
    times T², averaged over maps and batch. Both are standardised by the teacher's spatial
    mean/std first (see the module docstring)."""
    mean = teacher_maps.mean(-1, keepdim=True)
    std = teacher_maps.std(-1, keepdim=True).clamp_min(1e-6)
    t = (teacher_maps - mean) / std
    s = (student_maps - mean) / std
    log_pt = F.log_softmax(t / T, dim=-1)
    log_ps = F.log_softmax(s / T, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, C)
    return kl.mean() * T * T


def feature_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                 projections: nn.ModuleDict, names: list[str]) -> torch.Tensor:
    """Mean over matched layers of ‖P(F_S) − F_T‖² / mean(F_T²) (FitNet, P = identity when widths agree)."""
    total = 0.0
    for name, fs, ft in zip(names, student_feats, teacher_feats):
        if name in projections:
            fs = projections[name](fs)
        total = total + (fs - ft).pow(2).mean() / ft.pow(2).mean().clamp_min(1e-8)
    return total / max(1, len(names))


class _Taps:
    """Forward hooks keeping the outputs of named blocks (they fire inside DDP's forward too)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.out: dict[str, torch.Tensor] = {}
        self.names = [n for n, _ in blocks]
        self.handles = [m.register_forward_hook(self._keep(n)) for n, m in blocks]

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.out[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        feats = [self.out[n] for n in self.names]
        self.out = {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _matched_blocks(student: nn.Module, teacher: nn.Module) -> tuple[list, list, dict[str, tuple[int, int]]]:
    """(student blocks, teacher blocks, name -> (student width, teacher width)) at matched depths:
    the layer each student block was copied from, or evenly spaced when it was not derived."""
    layer_map = getattr(student, "pqk_layer_map", None) or {
        "enc": evenly_spaced(len(teacher.enc_blocks), len(student.enc_blocks)),
        "dec": evenly_spaced(len(teacher.dec_blocks), len(student.dec_blocks)),
    }
    s_blocks, t_blocks, widths = [], [], {}
    for tag, s_list, t_list, key in (("enc", student.enc_blocks, teacher.enc_blocks, "enc"),
                                     ("dec1_", student.dec_blocks, teacher.dec_blocks, "dec"),
                                     ("dec2_", student.dec_blocks2, teacher.dec_blocks2, "dec")):
        for j, i in enumerate(layer_map[key]):
            name = f"{tag}{j}"
            s_blocks.append((name, s_list[j]))
            t_blocks.append((name, t_list[i]))
            widths[name] = (s_list[j].norm1.normalized_shape[0], t_list[i].norm1.normalized_shape[0])
    return s_blocks, t_blocks, widths


# --- the spec -------------------------------------------------------------------------------


@dataclass
class DistillSpec:
    """One distillation run. `beta_schedule`: [[start fraction, β], ...], piecewise constant
    over training progress (β before the first start). `task_only` is the control: L_task
    alone, no teacher forward at all (β, γ ignored)."""

    T: float = 3.0
    alpha: float = 1.0
    beta: float = 0.5
    beta_schedule: list = field(default_factory=list)
    gamma: float = 0.0
    ratio: float = 0.3
    task_only: bool = False
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainSpec.from_dict(self.train)
        for name in ("T",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} = {v!r} is not accepted; expected a temperature > 0")
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"{name} = {v!r} is not accepted; expected a number >= 0")
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio = {self.ratio!r} is not accepted; expected a number in [0, 1)")
        sched = []
        for item in self.beta_schedule or []:
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, (int, float)) for x in item)
            if not ok or not 0.0 <= item[0] <= 1.0 or item[1] < 0:
                raise ConfigError(f"beta_schedule entry {item!r} is not accepted; expected [start fraction 0..1, beta >= 0]")
            sched.append([float(item[0]), float(item[1])])
        self.beta_schedule = sorted(sched)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillSpec":
        from pqk.yaml_io import dataclass_from_mapping

        return dataclass_from_mapping(cls, data, "distillation")

    def beta_at(self, progress: float) -> float:
        beta = self.beta
        for start, value in self.beta_schedule:
            if progress >= start:
                beta = value
        return beta

    def scaled(self, budget: float) -> "DistillSpec":
        return replace(self, train=self.train.scaled(budget))

    def keyparams(self) -> str:
        """The exp_id part: T3B05, T3B05_sched, T3B05G01; 'taskonly' for the control."""
        if self.task_only:
            return "taskonly"
        key = f"T{self.T:g}B{_digits(self.beta)}"
        if self.gamma > 0:
            key += f"G{_digits(self.gamma)}"
        if self.beta_schedule:
            key += "_sched"
        return key

    def record_fields(self) -> dict[str, float | None]:
        if self.task_only:
            return {"T": None, "beta": 0.0, "gamma": 0.0}
        return {"T": float(self.T), "beta": float(self.beta), "gamma": float(self.gamma)}

    def to_json(self) -> dict:
        return asdict(self)


def _digits(x: float) -> str:
    # 0.5 -> "05", 0.1 -> "01", 1.0 -> "1", 0.25 -> "025"
    s = f"{x:g}"
    return s.replace(".", "") if s.startswith("0.") else s.replace(".", "p")


class DistillLoss:
    """L = α·L_task + β(t)·KL_T + γ·F as a `LossFn` for `fit`. Holds the teacher, the
    feature taps and the FitNet projections (`self.projections`, trained by `fit`)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, spec: DistillSpec):
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.projections = nn.ModuleDict()
        self.s_taps = self.t_taps = None
        self.names: list[str] = []
        if spec.gamma > 0 and not spec.task_only:
            s_blocks, t_blocks, widths = _matched_blocks(unwrap(student), teacher)
            self.names = [n for n, _ in s_blocks]
            for name, (ws, wt) in widths.items():
                if ws != wt:
                    self.projections[name] = nn.Linear(ws, wt, bias=False)
            self.s_taps, self.t_taps = _Taps(s_blocks), _Taps(t_blocks)

    def __call__(self, model: nn.Module, view1: dict, view2: dict, gt: dict, progress: float):
        spec = self.spec
        valid1, valid2 = gt["valid1"], gt["valid2"]
        has_gt = valid1.flatten(1).any(1) | valid2.flatten(1).any(1)
        need_teacher = not spec.task_only or not bool(has_gt.all())
        t1 = t2 = None
        if need_teacher:
            self.teacher.to(view1["img"].device)
            with torch.no_grad():
                t1, t2 = self.teacher(view1, view2)
        s1, s2 = model(view1, view2)
        if not bool(has_gt.all()):
            # Pseudo-labels: pairs without ground truth are scored against the teacher.
            m = (~has_gt)[:, None, None]
            gt = {"pts1": torch.where(m[..., None], t1["pts3d"], gt["pts1"]),
                  "pts2": torch.where(m[..., None], t2["pts3d_in_other_view"], gt["pts2"]),
                  "valid1": valid1 | m, "valid2": valid2 | m}
        task, task_logs = conf_regression_loss(s1, s2, gt, alpha=CONF_ALPHA)
        loss = spec.alpha * task
        logs = {"task": task_logs["loss"]}
        if not spec.task_only:
            beta = spec.beta_at(progress)
            if beta > 0:
                kl = channel_kl(output_maps(s1, s2), output_maps(t1, t2), spec.T)
                loss = loss + beta * kl
                logs["kl"] = float(kl.detach())
                logs["beta"] = beta
            if spec.gamma > 0:
                feat = feature_loss(self.s_taps.take(), self.t_taps.take(), self.projections, self.names)
                loss = loss + spec.gamma * feat
                logs["feat"] = float(feat.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def close(self) -> None:
        for taps in (self.s_taps, self.t_taps):
            if taps is not None:
                taps.remove()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    spec: DistillSpec,
    out_dir: Path,
    *,
    resume: bool = True,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    device: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train `student` against `teacher` with `spec`'s loss; `out_dir` gets best.pth, last.pth
    and distill_log.json (see `pqk.train.trainer.fit`)."""
    loss = DistillLoss(student, teacher, spec)
    try:
        return fit(student, loss, spec.train, out_dir, resume=resume, extra_modules=dict(loss.projections),
                   log=log, show_progress=show_progress, name="distill", device=device, on_step=on_step)
    finally:
        loss.close()


STUDENT_FILE = "student.safetensors"


def distill_step(model: nn.Module, ctx: StepContext, spec: DistillSpec) -> StepResult:
    """The plan runner's K step: derive a student from `model` (ratio 0: train `model` itself),
    distil it from `ctx.teacher` at `ctx.budget`, save it into `ctx.out_dir`."""
    from pqk.models.dust3r import save_model

    spec = spec.scaled(ctx.budget) if ctx.budget != 1.0 else spec
    student = derive_student(model, spec.ratio) if spec.ratio > 0 else copy.deepcopy(unwrap(model))
    if spec.ratio == 0:
        student.pqk_history = list(getattr(unwrap(model), "pqk_history", []))
    torch.manual_seed(ctx.seed)
    result = distill(student, ctx.teacher, spec, ctx.out_dir, resume=ctx.resume, log=ctx.log, device=ctx.device)
    entry = {
        "step": "distill", "loss": "task_only" if spec.task_only else "alpha*task + beta*KL_T + gamma*feat",
        "T": spec.T, "alpha": spec.alpha, "beta": spec.beta, "beta_schedule": spec.beta_schedule, "gamma": spec.gamma,
        "ratio": spec.ratio, "derivation": getattr(student, "pqk_derivation", None), "epochs": spec.train.epochs,
        "steps_per_epoch": spec.train.steps_per_epoch, "steps_done": result.steps_done, "best_epoch": result.best_epoch,
        "best_val": result.best_val, "seed": ctx.seed, "budget": ctx.budget,
    }
    history = list(getattr(student, "pqk_history", [])) + [entry]
    path = save_model(result.model, Path(ctx.out_dir) / STUDENT_FILE, history=history) if _is_main() else Path(ctx.out_dir) / STUDENT_FILE
    result.model.pqk_history = history
    notes = ["control: L_task only"] if spec.task_only else []
    if spec.beta_schedule:
        notes.append("beta schedule " + ", ".join(f"{b:g} from {s:.0%}" for s, b in spec.beta_schedule))
    if result.stopped_early:
        notes.append(f"early stop at epoch {len(result.history)} (best {result.best_epoch})")
    return StepResult(
        model=result.model, artifact=path, fields=spec.record_fields(),
        device_hours=result.wall_time_s * result.world_size / 3600.0, notes=notes,
        details={"distill": {**entry, "wall_time_s": result.wall_time_s, "world_size": result.world_size,
                             "stopped_early": result.stopped_early, "log": str(result.log_path),
                             "history": result.history}},
    )


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --- the P1 grid (configs/distill.yaml) -----------------------------------------------------

BEST_STUDENT_FILE = "student_fp32_best.safetensors"


@dataclass
class DistillGrid:
    """configs/distill.yaml: the runs (name -> spec, file order), the selections (K-4: the best
    of named runs by the main metric, δ1), and the budget used with the embedded teacher."""

    runs: dict[str, DistillSpec]
    select: dict[str, list[str]]
    embedded_budget: float = 0.1

    def exp_id(self, run: str, number: int = 1) -> str:
        from pqk.pipeline.record import exp_id

        return exp_id("K", "", self.runs[run].keyparams(), number)


_GRID_KEYS = ("ratio", "alpha", "embedded_budget", "train", "runs", "select")


def load_distill_config(path: Path) -> DistillGrid:
    """Read and validate a distillation grid; one-line ConfigError/InputError on bad input."""
    from pqk.yaml_io import read_yaml

    data = read_yaml(Path(path), "distillation config", "see configs/distill.yaml", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"distillation config {path} must be a mapping with 'train' and 'runs'")
    unknown = sorted(set(data) - set(_GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; accepted: {', '.join(_GRID_KEYS)}")
    shared_train = data.get("train") or {}
    if not isinstance(shared_train, dict):
        raise ConfigError(f"{path}: 'train' must be a mapping of TrainSpec fields")
    runs_raw = data.get("runs")
    if not isinstance(runs_raw, dict) or not runs_raw:
        raise ConfigError(f"{path}: 'runs' must map run names (e.g. K-1) to their settings")
    runs = {}
    for name, run in runs_raw.items():
        run = dict(run or {})
        if not isinstance(run.get("train", {}), dict):
            raise ConfigError(f"{path}: runs.{name}.train must be a mapping of TrainSpec fields")
        train = {**shared_train, **run.pop("train", {})}
        defaults = {k: data[k] for k in ("ratio", "alpha") if k in data}
        try:
            runs[str(name)] = DistillSpec.from_dict({**defaults, **run, "train": train})
        except ConfigError as exc:
            raise ConfigError(f"{path}: runs.{name}: {exc}") from None
    select = {}
    for name, members in (data.get("select") or {}).items():
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{path}: select.{name} must list run names, e.g. [K-1, K-2, K-3]")
        for m in members:
            if m not in runs:
                raise ConfigError(f"{path}: select.{name} names run {m!r}; runs are {', '.join(runs)}")
        if name in runs:
            raise ConfigError(f"{path}: select.{name} has the name of a run")
        select[str(name)] = [str(m) for m in members]
    budget = data.get("embedded_budget", 0.1)
    if not isinstance(budget, (int, float)) or not budget > 0:
        raise ConfigError(f"{path}: embedded_budget {budget!r} is not accepted; expected a number > 0")
    ids = [DistillGrid(runs, select).exp_id(n) for n in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: two runs share the exp_id {dup[0]}; change T, beta, gamma or the schedule")
    return DistillGrid(runs=runs, select=select, embedded_budget=float(budget))
