"""Importance of each head and FFN channel (L1 magnitude or first-order Taylor over its
dependency group), and the least important ones of a unit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pqk.errors import ConfigError
from pqk.methods.prune.graph import dependency_graph, unit_group
from pqk.methods.prune.spec import IMPORTANCES, check_choice
from pqk.methods.prune.units import Unit
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo


def importance_scores(
    model: AsymmetricCroCo3DStereo,
    units: Sequence[Unit],
    importance: str = "l1",
    calib: Sequence[dict] | None = None,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Per unit, one score per head / channel (higher = keep), from its dependency group."""
    import torch_pruning as tp

    check_choice("importance", importance, IMPORTANCES)
    graph = dependency_graph(model)
    if importance == "l1":
        scorer = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    else:
        if not calib:
            raise ConfigError("importance 'taylor' needs calibration pairs (the task loss gives the gradients)")
        scorer = tp.importance.GroupTaylorImportance(normalizer=None)
        _accumulate_task_gradients(model, calib, batch_size)
    try:
        scores = {}
        for unit in units:
            with torch.no_grad():
                channel = scorer(unit_group(graph, model, unit)).detach().float().cpu()
            scores[unit.name] = channel.view(unit.count, unit.head_dim).mean(1) if unit.kind == "heads" else channel
        return scores
    finally:
        model.zero_grad(set_to_none=True)


def _accumulate_task_gradients(model: nn.Module, calib: Sequence[dict], batch_size: int) -> None:
    from pqk.data.pair_batches import collate_pairs
    from pqk.train.losses import conf_regression_loss

    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout or batch statistics in DUSt3R: eval mode is the training forward
    for start in range(0, len(calib), batch_size):
        view1, view2, gt = collate_pairs(calib[start : start + batch_size])
        with torch.enable_grad():
            res1, res2 = model(view1, view2)
            loss, _ = conf_regression_loss(res1, res2, gt)
            loss.backward()


def least_important(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the n lowest scores (ties broken by index, so runs repeat)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:n])
