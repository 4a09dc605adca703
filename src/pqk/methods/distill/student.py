"""The K student: `derive_student` cuts a DUSt3R down and inherits the teacher's weights.

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
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pqk.errors import ConfigError
from pqk.models.dust3r import build_model
from pqk.train.trainer import unwrap

DPT_MIN_DEC_DEPTH = 10  # the official DPT head asserts dec_depth > 9


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
