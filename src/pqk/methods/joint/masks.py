"""The P part of joint PQK: channel masks on the input of every unit's output layer
(`install_masks`) and their cubic growth by weight magnitude (`cubic_share`, `grow_masks`)."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from pqk.methods.distill.student import _cross_attn_scores, _mlp_scores, _self_attn_scores
from pqk.methods.prune import Unit

MASK = "pqk_in_mask"  # buffer on a unit's output layer: 1 = input channel kept, 0 = masked


def _apply_mask(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (no closure), so deep copies of the model keep working masks.
    return (args[0] * getattr(module, MASK),) + tuple(args[1:])


def output_layer(model: nn.Module, unit: Unit) -> nn.Module:
    module = model.get_submodule(unit.name)
    return module.proj if unit.kind == "heads" else module.fc2


def install_masks(model: nn.Module, units: list[Unit]) -> None:
    """A channel mask (all ones) on the input of every unit's output layer."""
    for unit in units:
        layer = output_layer(model, unit)
        if not hasattr(layer, MASK):
            layer.register_buffer(MASK, torch.ones(layer.in_features))
            layer.register_forward_pre_hook(_apply_mask)


def masked_indices(model: nn.Module, unit: Unit) -> list[int]:
    """Masked heads (for a heads unit) or channels (FFN) of `unit`."""
    mask = getattr(output_layer(model, unit), MASK)
    if unit.kind == "ffn":
        return [int(i) for i in torch.nonzero(mask == 0).flatten()]
    per_head = mask.reshape(unit.count, unit.head_dim)
    return [h for h in range(unit.count) if bool((per_head[h] == 0).all())]


def _set_masked(model: nn.Module, unit: Unit, indices: list[int]) -> None:
    mask = getattr(output_layer(model, unit), MASK)
    from pqk.methods.prune import channel_indices

    mask.fill_(1.0)
    if indices:
        mask[torch.tensor(channel_indices(unit, indices), dtype=torch.long)] = 0.0


def magnitude_scores(model: nn.Module, unit: Unit) -> torch.Tensor:
    """Weight magnitude per head / channel: what `derive_student` keeps the largest of."""
    module = model.get_submodule(unit.name)
    if unit.kind == "ffn":
        return _mlp_scores(module)
    return _self_attn_scores(module) if hasattr(module, "qkv") else _cross_attn_scores(module)


def cubic_share(progress: float, until: float, updates: int) -> float:
    """Share of the final mask in force at `progress`: 1 - (1 - t)^3 at t = the last update
    point reached (t = k / updates of the ramp), 1 from `until` on."""
    t = math.floor(min(1.0, progress / until) * updates + 1e-9) / updates
    return 1.0 - (1.0 - t) ** 3


def grow_masks(model: nn.Module, units: list[Unit], final: Mapping[str, int], share: float) -> int:
    """Mask more heads/channels until each unit has round(share x its final count); the newly
    masked are the smallest by magnitude among the unmasked (ties by index). Returns how many
    were added."""
    added = 0
    with torch.no_grad():
        for unit in units:
            want = int(math.floor(final.get(unit.name, 0) * share + 0.5))
            current = masked_indices(model, unit)
            if want <= len(current):
                continue
            scores = magnitude_scores(model, unit).clone()
            scores[current] = math.inf
            order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
            new = sorted(current + order[: want - len(current)])
            _set_masked(model, unit, new)
            added += want - len(current)
    return added
