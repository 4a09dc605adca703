"""Torch-Pruning's dependency graph of a DUSt3R: traced with forwards DepGraph reads correctly
(`_traceable`), and the dependency group that removes given heads or channels of a unit."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from pqk.methods.prune.units import Unit, channel_indices
from pqk.models.dust3r.model import (
    AsymmetricCroCo3DStereo,
    Attention,
    Rope2D,
    attention_core,
    merge_heads,
)


def _unit_root(model: nn.Module, unit: Unit):
    """(root module, Torch-Pruning pruning function) of a unit's dependency group."""
    import torch_pruning as tp

    module = model.get_submodule(unit.name)
    if unit.kind == "heads":
        # The downstream proj is the root, as Torch-Pruning's own head pruning does: its input
        # channels are exactly the heads' channels, q/k/v slices follow through the graph.
        return module.proj, tp.prune_linear_in_channels
    return module.fc1, tp.prune_linear_out_channels


class _OpaqueRope(torch.autograd.Function):
    """RoPE as one autograd node: DepGraph treats an unknown node as element-wise, which a
    rotation inside each head is for head-level pruning. Used for tracing only."""

    @staticmethod
    def forward(ctx, x, pos, rope):  # noqa: D401 - autograd signature
        return Rope2D.forward(rope, x, pos)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the traceable RoPE is for building the dependency graph only")


def _rope_traceable(self: Rope2D, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return _OpaqueRope.apply(x, pos, self)


def _attention_traceable(self: Attention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # Attention.forward with q, k, v taken by unbind (DepGraph maps unbind's three outputs to
    # the three row slices of qkv; plain indexing it would map to the q slice only).
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, hd)
    q, k = self.rope(q, pos), self.rope(k, pos)
    return self.proj(merge_heads(attention_core(q, k, v, self.core_dtype, self.smooth_k)))


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Swap in the forwards DepGraph reads correctly (same outputs) while the graph is traced."""
    patched = []
    for module in model.modules():
        replacement = {Rope2D: _rope_traceable, Attention: _attention_traceable}.get(type(module))
        if replacement is not None:
            module.forward = types.MethodType(replacement, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _example_views(model: AsymmetricCroCo3DStereo) -> tuple[dict, dict]:
    # A small landscape pair: the graph does not depend on the resolution.
    p = model.config.patch_size
    device = next(model.parameters()).device
    h, w = 4 * p, 6 * p
    views = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        img = torch.rand(1, 3, h, w, generator=g).to(device) * 2 - 1
        views.append({"img": img, "true_shape": torch.tensor([[h, w]], device=device)})
    return views[0], views[1]


def dependency_graph(model: AsymmetricCroCo3DStereo):
    """Torch-Pruning's DependencyGraph of a DUSt3R (traced with `_traceable`)."""
    import torch_pruning as tp

    view1, view2 = _example_views(model)
    was_training = model.training
    model.eval()
    try:
        with _traceable(model), torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=(view1, view2),
                forward_fn=lambda m, x: m(*x),
                output_transform=lambda out: sum(v.sum() for res in out for v in res.values()),
                # mask_token is a training-only parameter outside the forward: not pruned.
                unwrapped_parameters=[(model.mask_token, 2)],
            )
    finally:
        model.train(was_training)
    return graph


def unit_group(graph, model: nn.Module, unit: Unit, removed: Sequence[int] | None = None):
    """The dependency group removing `removed` heads/channels of `unit` (all of them if None)."""
    root, fn = _unit_root(model, unit)
    idxs = channel_indices(unit, range(unit.count) if removed is None else removed)
    return graph.get_pruning_group(root, fn, idxs)
