"""Prunable units: every attention module's heads and every FFN's hidden channels of a
DUSt3R, what one head or channel weighs, how many a unit may lose, and the channel indices
that removing given heads or channels means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pqk.methods.prune.spec import PruneSpec
from pqk.models.dust3r.model import (
    AsymmetricCroCo3DStereo,
    Attention,
    CrossAttention,
    Mlp,
)


@dataclass(frozen=True)
class Unit:
    """One prunable structure: an attention module's heads or an FFN's hidden channels."""

    name: str  # module path, e.g. "enc_blocks.3.attn"
    kind: str  # "heads" | "ffn"
    width_key: str  # its `Dust3rConfig.block_widths` key, e.g. "enc_heads"
    index: int  # block index inside its stack
    count: int  # heads or channels it has now
    params_per: int  # parameters that leave with one head / one channel
    head_dim: int = 1  # channels per head (1 for an FFN)

    @property
    def prunable_params(self) -> int:
        return self.count * self.params_per


_STACKS = (("enc_blocks", "enc"), ("dec_blocks", "dec1"), ("dec_blocks2", "dec2"))


def prunable_units(model: AsymmetricCroCo3DStereo, heads: bool = True, ffn: bool = True) -> list[Unit]:
    """Every attention module and FFN of the network, in state_dict order."""
    units: list[Unit] = []
    for stack, prefix in _STACKS:
        for i, blk in enumerate(getattr(model, stack)):
            parts = [("attn", f"{prefix}_heads"), ("cross_attn", f"{prefix}_cross_heads"), ("mlp", f"{prefix}_mlp_hidden")]
            for attr, key in parts:
                module = getattr(blk, attr, None)
                if module is None:
                    continue
                name = f"{stack}.{i}.{attr}"
                if isinstance(module, (Attention, CrossAttention)) and heads:
                    hd, dim = module.head_dim, module.proj.out_features
                    # q, k, v rows (with bias) and proj columns; proj's bias stays.
                    units.append(Unit(name, "heads", key, i, module.num_heads, 3 * hd * (dim + 1) + hd * dim, hd))
                elif isinstance(module, Mlp) and ffn:
                    dim = module.fc1.in_features
                    units.append(Unit(name, "ffn", key, i, module.fc1.out_features, 2 * dim + 1, 1))
    return units


def channel_indices(unit: Unit, removed: Sequence[int]) -> list[int]:
    """Root channels of the removed heads (head h = channels h*hd ... h*hd + hd - 1)."""
    if unit.kind == "ffn":
        return sorted(int(i) for i in removed)
    return [h * unit.head_dim + d for h in sorted(int(i) for i in removed) for d in range(unit.head_dim)]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def max_removable(unit: Unit, spec: PruneSpec) -> int:
    cap = _round_half_up(spec.max_ratio * unit.count)
    floor = spec.min_heads if unit.kind == "heads" else 1
    return max(0, min(cap, unit.count - floor))


def total_prunable(units: Sequence[Unit]) -> int:
    return sum(u.prunable_params for u in units)
