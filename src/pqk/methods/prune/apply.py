"""Pruning a model: remove the allocated heads/channels through their dependency groups and
rebuild a clean DUSt3R from the resulting block widths; `prune_model` / `prune` run the whole
cut (score, allocate, remove) and report it."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from pqk.errors import ConfigError
from pqk.methods.prune.allocation import allocate
from pqk.methods.prune.graph import dependency_graph, unit_group
from pqk.methods.prune.importance import importance_scores, least_important
from pqk.methods.prune.sensitivity import sensitivity_analysis
from pqk.methods.prune.spec import PruneSpec
from pqk.methods.prune.units import _STACKS, Unit, prunable_units, total_prunable
from pqk.models.dust3r.checkpoint import load_state_dict_strict
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo, count_parameters


def block_widths_of(model: AsymmetricCroCo3DStereo) -> dict[str, list[int]]:
    """Per-block head counts and FFN widths as they are in the modules (after in-place pruning
    `num_heads` may be stale: widths are read from the weight shapes)."""
    widths: dict[str, list[int]] = {}
    for stack, prefix in _STACKS:
        blocks = list(getattr(model, stack))
        widths[f"{prefix}_heads"] = [b.attn.proj.in_features // b.attn.head_dim for b in blocks]
        if prefix != "enc":
            widths[f"{prefix}_cross_heads"] = [b.cross_attn.proj.in_features // b.cross_attn.head_dim for b in blocks]
        widths[f"{prefix}_mlp_hidden"] = [b.mlp.fc1.out_features for b in blocks]
    return widths


def rebuild_clean(model: AsymmetricCroCo3DStereo) -> AsymmetricCroCo3DStereo:
    """An ordinary DUSt3R built from a config with the model's block widths, holding its weights
    (strict key and shape match); `num_heads` attributes are right by construction."""
    config = dataclasses.replace(model.config, block_widths=block_widths_of(model))
    clean = AsymmetricCroCo3DStereo(config)
    load_state_dict_strict(clean, model.state_dict(), "pruned model")
    clean.pqk_history = list(getattr(model, "pqk_history", []))
    device = next(model.parameters()).device
    return clean.to(device).train(model.training)


def apply_pruning(
    model: AsymmetricCroCo3DStereo,
    units: Sequence[Unit],
    scores: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
) -> AsymmetricCroCo3DStereo:
    """Remove `counts[name]` least important heads/channels of each unit through Torch-Pruning's
    dependency groups (on a copy) and return the clean rebuild; `model` is left untouched."""
    work = copy.deepcopy(model)
    graph = dependency_graph(work)
    for unit in units:
        n = int(counts.get(unit.name, 0))
        if n <= 0:
            continue
        if n >= unit.count:
            raise ConfigError(f"{unit.name}: cannot remove {n} of {unit.count} {unit.kind}")
        group = unit_group(graph, work, unit, least_important(scores[unit.name], n))
        if not graph.check_pruning_group(group):
            raise ConfigError(f"{unit.name}: Torch-Pruning refused the group (it would empty a layer)")
        group.prune()
    return rebuild_clean(work)


@dataclass
class PruneOutcome:
    model: AsymmetricCroCo3DStereo
    counts: dict[str, int]  # heads / channels removed per unit
    units: list[Unit]
    sensitivity: dict | None
    stats: dict


def prune_model(
    model: AsymmetricCroCo3DStereo,
    spec: PruneSpec,
    calib: Sequence[dict] | None = None,
    *,
    sensitivity: dict | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> PruneOutcome:
    """Score, allocate and prune; `sensitivity` reuses a table computed for the same model."""
    torch.manual_seed(spec.seed)
    model.eval()
    units = prunable_units(model, spec.heads, spec.ffn)
    t0 = time.perf_counter()
    scores = importance_scores(model, units, spec.importance, calib, spec.calibration.batch_size)
    t_score = time.perf_counter() - t0
    if spec.allocation == "sensitivity" and sensitivity is None:
        if not calib:
            raise ConfigError("allocation 'sensitivity' needs calibration pairs")
        sensitivity = sensitivity_analysis(model, units, scores, calib, spec, log)
    counts = allocate(units, spec.rho, spec, sensitivity)
    t1 = time.perf_counter()
    pruned = apply_pruning(model, units, scores, counts)
    removed = sum(counts[u.name] * u.params_per for u in units)
    stats = {
        "rho": spec.rho,
        "rho_achieved": removed / max(1, total_prunable(units)),
        "allocation": spec.allocation,
        "importance": spec.importance,
        "params_before": count_parameters(model),
        "params_after": count_parameters(pruned),
        "prunable_params": total_prunable(units),
        "params_removed": removed,
        "heads_removed": sum(counts[u.name] for u in units if u.kind == "heads"),
        "heads_total": sum(u.count for u in units if u.kind == "heads"),
        "ffn_channels_removed": sum(counts[u.name] for u in units if u.kind == "ffn"),
        "ffn_channels_total": sum(u.count for u in units if u.kind == "ffn"),
        "block_widths": pruned.config.block_widths,
        "removed_per_unit": {u.name: counts[u.name] for u in units},
        "importance_time_s": round(t_score, 2),
        "prune_time_s": round(time.perf_counter() - t1, 2),
    }
    pruned.pqk_history = list(getattr(model, "pqk_history", [])) + [{
        "step": "prune", "rho": spec.rho, "allocation": spec.allocation, "importance": spec.importance,
        "rho_achieved": round(stats["rho_achieved"], 5),
    }]
    log(f"pruned rho {spec.rho} ({spec.allocation}, {spec.importance}): {stats['params_before'] / 1e6:.3f}M -> "
        f"{stats['params_after'] / 1e6:.3f}M parameters, {stats['heads_removed']}/{stats['heads_total']} heads, "
        f"{stats['ffn_channels_removed']}/{stats['ffn_channels_total']} FFN channels")
    return PruneOutcome(pruned.eval(), counts, units, sensitivity, stats)


def prune(model: AsymmetricCroCo3DStereo, spec: PruneSpec, calib: Sequence[dict] | None = None) -> AsymmetricCroCo3DStereo:
    """The pruned DUSt3R (a new, ordinary model; `model` is not modified). `calib`: calibration
    pairs (`calibration_examples`), needed by sensitivity allocation and Taylor importance."""
    return prune_model(model, spec, calib).model
