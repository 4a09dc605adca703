"""Joint PQK: prune, distil and quantize in one training run, then export the INT8 model.

The sequential path (P→K→Q) prunes the teacher, fine-tunes, derives and distils a student,
then calibrates and maybe fine-tunes again with fake quantization: three trainings, each
blind to what the next will do. Here one run of the shared trainer does all three:

- **K.** The student is derived from the teacher exactly as in K (`derive_student`, the
  distillation run's `ratio`) and trained with that run's loss (α·L_task + β·KL_T + γ·F)
  for that run's length.
- **P.** Every attention module's heads and every FFN's hidden channels carry a mask on the
  input of their output layer (`proj` / `fc2`): a masked head's or channel's contribution
  is exactly zero, as after removal. The number masked per unit grows with a cubic schedule
  (Zhu & Gupta, 2017) from 0 to the uniform allocation of ρ (`allocate_uniform`) over the
  first `prune_until` of the run, in `mask_updates` steps; each update masks the smallest
  remaining heads/channels by weight magnitude (the score `derive_student` uses). Masks only
  grow, and after `prune_until` they are settled; the rest of the run trains the survivors.
  Sensitivity allocation is not offered: it would be measured on a freshly derived student,
  whose quality says nothing yet about which layers matter.
- **Q.** Every Linear computes on fake-quantized input (uint8, per tensor) and weight (int8,
  per output channel): `FakeQuantLinear`, the QAT module. At `fake_quant_from` of the run
  (the protocol's "last third") the activation ranges are calibrated once, min/max over
  the quantization spec's calibration pairs at the workload's shape (the rule PTQ applies),
  then held fixed while training adapts the weights to the grid.

After the last step the masked heads/channels are removed through Torch-Pruning's dependency
groups (`apply_pruning`: an ordinary, smaller DUSt3R) and the model is exported to QDQ ONNX
with the trained activation ranges imposed (`export_with_ranges`), so the INT8 file computes
what the run trained. Masks and ranges are buffers in the trainer's checkpoints: a killed run
resumes exactly.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pqk.errors import ConfigError
from pqk.methods.distill import DistillLoss, DistillSpec, _cross_attn_scores, _mlp_scores, _self_attn_scores
from pqk.methods.prune import PruneSpec, Unit, allocate_uniform, apply_pruning, prunable_units, total_prunable
from pqk.methods.qat import FakeQuantLinear, activation_ranges, fake_quant_modules, set_fake_quant
from pqk.train.trainer import unwrap

MASK = "pqk_in_mask"  # buffer on a unit's output layer: 1 = input channel kept, 0 = masked


# --- the spec -------------------------------------------------------------------------------


@dataclass
class JointSpec:
    """One joint run: the K run (student, loss, length), ρ of P, the W8A8 spec of Q and when
    each happens (fractions of the run)."""

    distill: DistillSpec
    prune: PruneSpec
    quant: Any  # pqk.methods.quantize.QuantSpec
    distill_run: str = "K-1"
    prune_until: float = 0.5
    mask_updates: int = 8
    fake_quant_from: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        for name in ("prune_until", "fake_quant_from"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ConfigError(f"schedule.{name} = {v!r} is not accepted; expected a fraction of the run in (0, 1)")
        if isinstance(self.mask_updates, bool) or not isinstance(self.mask_updates, int) or self.mask_updates < 1:
            raise ConfigError(f"schedule.mask_updates = {self.mask_updates!r} is not accepted; expected an integer >= 1")
        if self.prune_until > self.fake_quant_from:
            raise ConfigError(f"schedule.prune_until ({self.prune_until:g}) must not come after schedule.fake_quant_from "
                              f"({self.fake_quant_from:g}): activation ranges are calibrated on the settled masks")
        if self.prune.allocation != "uniform":
            self.prune = replace(self.prune, allocation="uniform")

    @property
    def rho(self) -> float:
        return float(self.prune.rho)

    def keyparams(self) -> str:
        """The exp_id part: joint_r010_K1."""
        return f"joint_r{round(self.rho * 100):03d}_{self.distill_run.replace('-', '').replace('_', '')}"

    def record_fields(self) -> dict:
        return {"rho": self.rho, **self.distill.record_fields(), **self.quant.to_record_fields()}

    def to_json(self) -> dict:
        return {"distill_run": self.distill_run, "distill": self.distill.to_json(), "prune": self.prune.to_dict(),
                "quant": self.quant.to_dict(), "prune_until": self.prune_until, "mask_updates": self.mask_updates,
                "fake_quant_from": self.fake_quant_from}


_JOINT_KEYS = {"distill", "prune", "quantize", "schedule"}
_SECTION_KEYS = {"distill": {"config", "run"}, "prune": {"config", "rho"}, "quantize": {"config"},
                 "schedule": {"prune_until", "mask_updates", "fake_quant_from"}}


_REFERENCED = (("distill", "distill.yaml"), ("prune", "prune.yaml"), ("quantize", "quant.yaml"))


def referenced_configs(data: Mapping, base: Path) -> dict[str, Any]:
    """The distillation, pruning and quantization config a joint config names, by section
    (default: the file of that name beside it); a relative path is tried from the working
    folder, then from `base` (the joint config's folder). Non-path values are returned as is."""
    out: dict[str, Any] = {}
    for key, default in _REFERENCED:
        section = data.get(key)
        name = section.get("config", default) if isinstance(section, dict) else default
        if not isinstance(name, str) or not name:
            out[key] = name
            continue
        path = Path(name)
        out[key] = path if path.is_absolute() or path.exists() else base / path
    return out


def _existing(path: Any, what: str) -> Path:
    if not isinstance(path, Path):
        raise ConfigError(f"{what} must be a file path; got {path!r}")
    if not path.is_file():
        from pqk.errors import InputError

        raise InputError(f"{what}: {path} does not exist")
    return path


def load_joint_spec(path: str | Path, run: str | None = None, rho: float | None = None) -> JointSpec:
    """Read configs/joint.yaml: it points at the distillation, pruning and quantization configs
    (paths relative to itself) and sets the schedule. `run` / `rho` override its choices."""
    from pqk.methods.distill import load_distill_config
    from pqk.methods.prune import check_rho, load_prune_spec
    from pqk.methods.quantize import load_quant_spec
    from pqk.yaml_io import read_yaml, reject_unknown_keys

    path = Path(path)
    data = read_yaml(path, "joint PQK config", invalid=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"joint PQK config {path} must be a mapping with distill, prune, quantize, schedule")
    reject_unknown_keys("joint PQK config", data, _JOINT_KEYS)
    sections = {}
    for key, accepted in _SECTION_KEYS.items():
        section = data.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"joint PQK config {path}: {key} must be a mapping")
        reject_unknown_keys(f"joint PQK config {key}", section, accepted)
        sections[key] = section
    configs = referenced_configs(data, path.resolve().parent)
    grid = load_distill_config(_existing(configs["distill"], "distill.config"))
    run = run or sections["distill"].get("run") or next(iter(grid.runs))
    if run not in grid.runs:
        raise ConfigError(f"distillation run {run!r} is not in the distillation config; accepted: {', '.join(grid.runs)}")
    distill = grid.runs[run]
    if distill.task_only:
        raise ConfigError(f"distillation run {run!r} is the task-only control; joint PQK distils from the teacher")
    prune = load_prune_spec(_existing(configs["prune"], "prune.config"))
    rho = rho if rho is not None else sections["prune"].get("rho", prune.rho)
    prune = replace(prune, rho=check_rho(rho))
    quant = load_quant_spec(_existing(configs["quantize"], "quantize.config"))
    schedule = sections["schedule"]
    return JointSpec(distill=distill, prune=prune, quant=quant, distill_run=run,
                     prune_until=schedule.get("prune_until", 0.5), mask_updates=schedule.get("mask_updates", 8),
                     fake_quant_from=schedule.get("fake_quant_from", 2.0 / 3.0))


# --- masks ------------------------------------------------------------------------------------


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


# --- fake quantization ------------------------------------------------------------------------


def install_fake_quant(model: nn.Module) -> None:
    """Every Linear becomes a `FakeQuantLinear`, switched off until calibrated."""
    from pqk.backends.torch_int8 import set_module

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            fq = FakeQuantLinear(module, 1.0, 0)
            fq.enabled.fill_(False)
            set_module(model, name, fq)


def uint8_range_params(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 grid over [low, high] widened to hold 0, as
    ONNX Runtime derives them from a calibrated range."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, int(min(255, max(0, round(-low / scale))))


@torch.no_grad()
def calibrate_fake_quant(model: nn.Module, pairs: list[tuple[dict, dict]]) -> dict[str, tuple[float, float]]:
    """Min/max of every FakeQuantLinear's (masked) input over `pairs`, set as its fixed grid;
    fake quantization is switched on. Returns the observed ranges."""
    modules = fake_quant_modules(model)
    seen: dict[str, list[float]] = {}

    def observe(name: str):
        def hook(_module: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            low, high = float(x.min()), float(x.max())
            old = seen.get(name)
            seen[name] = [low, high] if old is None else [min(old[0], low), max(old[1], high)]
        return hook

    set_fake_quant(model, False)
    handles = [m.register_forward_hook(observe(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for view1, view2 in pairs:
            model(view1, view2)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, module in modules.items():
        if name in seen:
            scale, zp = uint8_range_params(*seen[name])
            module.input_scale.fill_(scale)
            module.input_zero_point.fill_(zp)
    set_fake_quant(model, True)
    return {k: (v[0], v[1]) for k, v in seen.items()}


def fake_quant_on(model: nn.Module) -> bool:
    """Whether the activation ranges were calibrated (fake quantization switched on)."""
    return any(bool(m.enabled) for m in fake_quant_modules(model).values())


def calibration_views(pairs: list, width: int, height: int) -> list[tuple[dict, dict]]:
    """Calibration pairs (`calibration_pairs`: arrays for ONNX Runtime) as view dicts."""
    shape = torch.tensor([[height, width]], dtype=torch.int32)

    def view(img, k: int) -> dict:
        return {"img": torch.from_numpy(img), "true_shape": shape, "idx": [k], "instance": [str(k)]}

    return [(view(a, 0), view(b, 1)) for a, b in pairs]


# --- the training run ---------------------------------------------------------------------------


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


# --- the plan step -------------------------------------------------------------------------------


JOINT_FILE = "joint_student.safetensors"


def joint_step(teacher: nn.Module, ctx, spec: JointSpec, runtimes: tuple[str, ...] = ("onednn", "onnxruntime"),
               latency_rounds: int = 10):
    """The plan runner's joint PQK step (from the teacher): train, settle, export INT8, build
    the INT8 runtimes and time them side by side. Returns (StepResult on the fastest runtime,
    PtqOutcome)."""
    from pqk.backends.torch_int8 import int8_model_from_qdq, onednn_int8_available
    from pqk.methods.qat import export_with_ranges
    from pqk.methods.quantize_step import PtqOutcome, budget_calibration, fastest_runtime, side_by_side_latency, workload_shape
    from pqk.models.dust3r import save_model

    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = workload_shape(ctx.workload)
    quant, notes = budget_calibration(spec.quant, ctx.budget)
    spec = replace(spec, quant=quant)
    ctx.log(f"joint PQK: {spec.distill_run} student, rho {spec.rho:g} (masks to {spec.prune_until:.0%} of the run), "
            f"fake quantization from {spec.fake_quant_from:.0%}")
    from pqk.methods.quantize import calibration_pairs

    calib_pairs = calibration_pairs(quant, width, height)  # one set: the run's ranges and the export's
    outcome = train_joint(ctx.teacher, spec, out_dir / "train", width, height, budget=ctx.budget, resume=ctx.resume,
                          log=ctx.log, show_progress=False, device=ctx.device, calib_pairs=calib_pairs)
    history = [{"step": "joint_pqk", **spec.to_json(), "budget": ctx.budget, "removed_per_unit": outcome.counts,
                "activation_ranges": {k: list(v) for k, v in outcome.ranges.items()}}]
    checkpoint = save_model(outcome.model, out_dir / JOINT_FILE, history=history)
    ctx.log("joint PQK: export to QDQ with the trained scales")
    exported = export_with_ranges(outcome.model, outcome.ranges, quant, calib_pairs,
                                  out_dir, height, width, name="joint_int8.onnx")
    int8_model, details = None, {}
    if "onednn" in runtimes:
        if onednn_int8_available():
            int8_model, details["onednn"] = int8_model_from_qdq(outcome.model, exported["onnx_int8"])
        else:
            notes.append("no oneDNN INT8 kernels in this PyTorch: runtime onednn skipped")
    ctx.log("latency side by side")
    details["latency_side_by_side"] = side_by_side_latency(outcome.model, exported["onnx_fp32"], exported["onnx_int8"],
                                                           int8_model, height, width, latency_rounds)
    fit = outcome.fit
    details.update({
        "joint": {**outcome.stats, "schedule": outcome.events, "epochs": len(fit.history), "steps": fit.steps_done,
                  "wall_time_s": fit.wall_time_s, "history": fit.history, "checkpoint": str(checkpoint),
                  "spec": spec.to_json()},
        "ptq": exported["summary"], "onnx_fp32": str(exported["onnx_fp32"]), "keyparams": spec.keyparams(),
    })
    notes = [*notes, f"joint PQK: one run of {fit.steps_done} steps, {outcome.stats['heads_removed']} heads and "
             f"{outcome.stats['ffn_channels_removed']} FFN channels masked (rho {outcome.stats['rho_achieved']:.3f}), "
             f"fake quantization from {spec.fake_quant_from:.0%}"]
    fields = spec.record_fields()
    ptq = PtqOutcome(outcome.model, Path(exported["onnx_fp32"]), Path(exported["onnx_int8"]), int8_model, fields,
                     details, notes, (time.perf_counter() - start) / 3600.0 * max(1, fit.world_size))
    return ptq.step_result(fastest_runtime(ptq, runtimes)), ptq


__all__ = [
    "JOINT_FILE", "JointLoss", "JointOutcome", "JointSpec", "calibrate_fake_quant", "cubic_share", "grow_masks",
    "fake_quant_on", "install_fake_quant", "install_masks", "joint_step", "load_joint_spec", "masked_indices", "prepare_joint",
    "referenced_configs", "settle", "train_joint", "uint8_range_params",
]
