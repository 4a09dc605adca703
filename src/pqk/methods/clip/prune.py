"""Structured pruning of a CLIP-family model's MLPs: every block of the trained towers loses the
same share ρ of its MLP hidden channels (the c_fc rows and the matching c_proj columns), the
channels whose weights carry the least magnitude (‖c_fc row‖₂ · ‖c_proj column‖₂, the channel's
largest possible contribution to the block's output scale). The model gets really smaller:
the Linear layers are rebuilt narrower, saved as such and loaded back by their shapes.

A locked text tower (the LiT teacher's MiniLM) is not touched: it is not trained here and its
weights are not ours to store.
"""

from __future__ import annotations

import torch
from torch import nn


def _mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in model.named_modules():
        fc, proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
        if isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear) and fc.weight.requires_grad:
            out.append((name, module))
    return out


def channel_scores(mlp: nn.Module) -> torch.Tensor:
    return mlp.c_fc.weight.norm(dim=1) * mlp.c_proj.weight.norm(dim=0)


@torch.no_grad()
def prune_mlps(model: nn.Module, rho: float) -> dict:
    """Remove the share `rho` of every trainable MLP's hidden channels in place; returns what
    was removed (parameters before/after, widths per block)."""
    before = sum(p.numel() for p in model.parameters())
    widths = {}
    for name, mlp in _mlps(model):
        hidden = mlp.c_fc.out_features
        keep_n = max(1, hidden - int(round(rho * hidden)))
        keep = torch.sort(torch.topk(channel_scores(mlp), keep_n).indices).values
        fc, proj = mlp.c_fc, mlp.c_proj
        new_fc = nn.Linear(fc.in_features, keep_n, bias=fc.bias is not None)
        new_fc.weight.copy_(fc.weight[keep])
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias[keep])
        new_proj = nn.Linear(keep_n, proj.out_features, bias=proj.bias is not None)
        new_proj.weight.copy_(proj.weight[:, keep])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
        mlp.c_fc, mlp.c_proj = new_fc, new_proj
        widths[name] = [hidden, keep_n]
    after = sum(p.numel() for p in model.parameters())
    return {"params_before": before, "params_after": after, "mlp_widths": widths, "blocks": len(widths)}
