"""The joint training run: the loss that applies the mask schedule and the fake-quantization
switch (`JointLoss`), the student it trains (`prepare_joint`), the run itself (`train_joint`)
and the settled, pruned model it ends with (`settle`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pqk.methods.distill.loss import DistillLoss
from pqk.methods.joint.fake_quant import calibrate_fake_quant, calibration_views, fake_quant_on, install_fake_quant
from pqk.methods.joint.masks import MASK, cubic_share, grow_masks, install_masks, masked_indices, output_layer
from pqk.methods.joint.spec import JointSpec
from pqk.methods.prune import Unit, allocate_uniform, apply_pruning, prunable_units, total_prunable
from pqk.methods.qat import activation_ranges
from pqk.train.trainer import unwrap


class JointLoss:
    """The distillation loss, with the mask schedule and the fake-quantization switch applied
    before each forward (the trainer calls the loss once per step with the run's progress)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, spec: JointSpec, units: list[Unit],
                 final: Mapping[str, int], calib: Callable[[], list[tuple[dict, dict]]],
                 log: Callable[[str], None] = print):
        self.distill = DistillLoss(student, teacher, spec.distill)
        self.projections = self.distill.projections
        self.spec, self.units, self.final, self.calib, self.log = spec, units, final, calib, log
        self.events: list[dict] = []

    def __call__(self, model: nn.Module, view1: dict, view2: dict, gt: dict, progress: float):
        net = unwrap(model)
        share = cubic_share(progress, self.spec.prune_until, self.spec.mask_updates)
        added = grow_masks(net, self.units, self.final, share)
        if added:
            masked = sum(len(masked_indices(net, u)) for u in self.units)
            self.events.append({"progress": round(progress, 4), "event": "masks", "share": round(share, 4),
                                "added": added, "masked": masked})
            self.log(f"joint: {progress:.0%} of the run, masks at {share:.0%} of rho ({masked} heads/channels masked)")
        if progress >= self.spec.fake_quant_from and not fake_quant_on(net):
            device = next(net.parameters()).device
            pairs = [({k: v.to(device) if torch.is_tensor(v) else v for k, v in a.items()},
                      {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}) for a, b in self.calib()]
            calibrate_fake_quant(net, pairs)
            self.events.append({"progress": round(progress, 4), "event": "fake_quant_on", "calibration_pairs": len(pairs)})
            self.log(f"joint: {progress:.0%} of the run, fake quantization on (ranges from {len(pairs)} calibration pairs)")
        loss, logs = self.distill(model, view1, view2, gt, progress)
        logs["fq"] = float(progress >= self.spec.fake_quant_from)
        return loss, logs

    def close(self) -> None:
        self.distill.close()


def prepare_joint(teacher: nn.Module, spec: JointSpec) -> tuple[nn.Module, list[Unit], dict[str, int]]:
    """The derived student with fake quantization (off) and masks (none) installed, its units
    and the final per-unit counts (uniform allocation of ρ)."""
    from pqk.methods.distill import derive_student

    student = derive_student(unwrap(teacher), spec.distill.ratio) if spec.distill.ratio > 0 else copy.deepcopy(unwrap(teacher))
    units = prunable_units(student, spec.prune.heads, spec.prune.ffn)
    final = allocate_uniform(units, spec.rho, spec.prune)
    install_fake_quant(student)
    install_masks(student, units)
    return student, units, final


def settle(trained: nn.Module, units: list[Unit]) -> tuple[nn.Module, dict[str, int], dict[str, tuple[float, float]]]:
    """The trained joint model as an ordinary pruned DUSt3R (masked heads/channels removed,
    plain Linears) plus the per-unit removed counts and the trained activation ranges."""
    from pqk.methods.qat import strip_qat

    ranges = activation_ranges(trained)
    removed = {u.name: masked_indices(trained, u) for u in units}
    work = copy.deepcopy(trained)
    for unit in units:  # a masked input channel is a zero weight column: the same function
        layer = output_layer(work, unit)
        with torch.no_grad():
            layer.weight.mul_(getattr(layer, MASK))
    plain = strip_qat(work)  # plain Linears: the masked layers (hooks, mask buffers) are gone
    for p in plain.parameters():
        p.requires_grad_(True)
    scores = {u.name: torch.tensor([0.0 if i in removed[u.name] else 1.0 for i in range(u.count)]) for u in units}
    counts = {name: len(idx) for name, idx in removed.items()}
    pruned = apply_pruning(plain.eval(), units, scores, counts)
    return pruned.eval(), counts, ranges


@dataclass
class JointOutcome:
    model: nn.Module  # the pruned FP32 student (trained weights, masks removed)
    counts: dict[str, int]
    ranges: dict[str, tuple[float, float]]
    fit: Any  # the trainer's FitResult
    events: list[dict]
    stats: dict


def train_joint(teacher: nn.Module, spec: JointSpec, out_dir: Path, width: int, height: int, *, budget: float = 1.0,
                resume: bool = True, log: Callable[[str], None] = print, show_progress: bool = True,
                device: str | None = None, on_step: Callable[[int, dict], None] | None = None,
                calib_pairs: list | None = None) -> JointOutcome:
    """The joint run: derive, train with masks + distillation + fake quantization, settle.
    `calib_pairs`: the quantization calibration pairs when the caller has them already
    (default: generated from `spec.quant` when first needed)."""
    from pqk.methods.distill import _is_main
    from pqk.models.dust3r import count_parameters
    from pqk.train.trainer import fit

    distill_spec = spec.distill.scaled(budget) if budget != 1.0 else spec.distill
    torch.manual_seed(42)
    student, units, final = prepare_joint(teacher, spec)
    params_before = count_parameters(student)
    cache: list = []

    def calib() -> list[tuple[dict, dict]]:
        if not cache:
            from pqk.methods.quantize import calibration_pairs

            pairs = calib_pairs if calib_pairs is not None else calibration_pairs(spec.quant, width, height)
            cache.extend(calibration_views(pairs, width, height))
        return cache

    loss = JointLoss(student, teacher, replace(spec, distill=distill_spec), units, final, calib, log)
    try:
        result = fit(student, loss, distill_spec.train, Path(out_dir), resume=resume,
                     extra_modules=dict(loss.projections), log=log, show_progress=show_progress, name="joint",
                     device=device, on_step=on_step)
    finally:
        loss.close()
    # The deployed model is the end of the run (masks settled, on the integer grid), not the
    # trainer's best-validation epoch, which may predate both.
    trained = result.model
    last = Path(out_dir) / "last.pth"
    if last.is_file() and _is_main():
        trained.load_state_dict(torch.load(last, map_location="cpu", weights_only=True)["model"])
    trained = unwrap(trained).cpu().eval()
    if not fake_quant_on(trained):
        # A run too short to reach fake_quant_from (tiny budgets): calibrate at the end.
        calibrate_fake_quant(trained, calib())
    pruned, counts, ranges = settle(trained, units)
    removed = sum(counts[u.name] * u.params_per for u in units)
    stats = {
        "params_student": params_before, "params_after": count_parameters(pruned),
        "rho": spec.rho, "rho_achieved": removed / max(1, total_prunable(units)),
        "heads_removed": sum(counts[u.name] for u in units if u.kind == "heads"),
        "heads_total": sum(u.count for u in units if u.kind == "heads"),
        "ffn_channels_removed": sum(counts[u.name] for u in units if u.kind == "ffn"),
        "ffn_channels_total": sum(u.count for u in units if u.kind == "ffn"),
        "block_widths": pruned.config.block_widths, "removed_per_unit": counts,
    }
    return JointOutcome(pruned, counts, ranges, result, loss.events, stats)
