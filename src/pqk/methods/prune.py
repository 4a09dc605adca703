"""P-only (protocol stage P4): structured pruning of attention heads and FFN channels that
leaves an ordinary DUSt3R.

    model = prune(model, PruneSpec(rho=0.3), calib)          # one call, Torch-Pruning style

What is pruned, and how the pieces fit:
- Units. Every attention module (encoder self-attention, decoder self- and cross-attention)
  loses whole heads, keeping head_dim (2D RoPE splits each head in a row half and a column half);
  every FFN loses hidden channels. The residual width (embedding) is not pruned.
- Dependency graph. Torch-Pruning's DepGraph finds what moves together: head h of a fused qkv
  is three row slices of `qkv` (q, k and v) plus a column slice of `proj`; of a cross-attention
  it is rows of projq, projk, projv plus columns of proj; an FFN channel is a row of fc1 and a
  column of fc2. Our network splits q, k, v by indexing and rotates inside each head (chunk +
  cat on the head dim); DepGraph reads those as channel splits and maps a head to the wrong
  indices. So the graph is traced with a forward that means the same but is written in the ops
  DepGraph understands (`_traceable`: `unbind` for q/k/v, RoPE as one opaque element-wise op);
  with it DepGraph yields exactly the slices above (checked in tests/test_prune.py against
  masking), and its groups do both the scoring and the pruning.
- Importance: L1 magnitude over each group (default) or first-order Taylor |w·∂L/∂w| with the
  task loss on the calibration pairs; a head scores the mean of its channels.
- Sensitivity: each unit alone loses a share of its heads/channels (the least important ones)
  and the quality drop on held-out generated calibration pairs is measured with the metric code
  `evaluate` uses, on both pointmaps (`calibration_quality` says why). Removing a head is exactly zeroing its columns of `proj` (an FFN channel: its
  column of fc2), so the trials mask weights instead of rebuilding the network.
- Allocation: ρ is the fraction of the prunable parameters (the weights that leave with a head
  or a channel) to remove. "uniform" removes ρ of every unit (heads rounded to whole heads, the
  rounding made up in the FFN widths so the total is still ρ); "sensitivity" takes the cheapest
  drop per removed parameter first (lower convex hull of each unit's measured curve), FFN steps
  in any size, head steps whole.
- A clean model. Torch-Pruning edits modules in place and leaves `num_heads` stale; the result
  is rebuilt from a config whose `block_widths` hold the per-block head counts and FFN widths,
  and the weights are copied in strictly. `load_checkpoint` rebuilds it with no pruning code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pqk.errors import ConfigError
from pqk.models.dust3r.checkpoint import load_state_dict_strict, save_model
from pqk.models.dust3r.model import (
    AsymmetricCroCo3DStereo,
    Attention,
    CrossAttention,
    Mlp,
    Rope2D,
    attention_core,
    count_parameters,
    merge_heads,
)
from pqk.yaml_io import read_yaml, reject_unknown_keys

IMPORTANCES = ("l1", "taylor")
ALLOCATIONS = ("sensitivity", "uniform")
SENSITIVITY_METRICS = ("delta1", "absrel", "rmse", "loss")
# Seeds of the pruning calibration scenes. Taken below: evaluation workloads start at 42, the
# teacher trains from 1,000,000 and validates from 2,000,000, quantization calibrates from
# 3,000,000 (pqk.methods.quantize.CALIBRATION_SEED_MIN).
PRUNE_CALIB_SEED_MIN = 4_000_000
_LOWER_IS_BETTER = {"delta1": False, "absrel": True, "rmse": True, "loss": True}


# --- the spec ---------------------------------------------------------------------------------


@dataclass
class PruneCalibSpec:
    """Held-out generated pairs for importance (Taylor) and the sensitivity trials."""

    n_pairs: int = 8
    n_scenes: int = 4
    width: int = 512
    height: int = 384
    views: int = 8
    window: int = 4
    seed_base: int = PRUNE_CALIB_SEED_MIN
    batch_size: int = 4


@dataclass
class PruneSpec:
    """What to prune and how; mirrors configs/prune.yaml. Validated on construction."""

    rho: float = 0.3
    allocation: str = "sensitivity"
    importance: str = "l1"
    heads: bool = True  # prune whole attention heads (self and cross)
    ffn: bool = True  # prune FFN hidden channels
    embed: bool = False  # residual width: not supported (see _check_spec)
    min_heads: int = 1  # heads every attention module keeps
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    sensitivity_metric: str = "delta1"
    # Least drop a step is assumed to cost, per share of the unit removed: measured on a few
    # calibration pairs, a "gain" is noise, and removal is never free.
    sensitivity_floor: float = 0.01
    calibration: PruneCalibSpec = field(default_factory=PruneCalibSpec)
    finetune: dict = field(default_factory=dict)  # TrainSpec fields (pqk.train.trainer)
    seed: int = 42

    def __post_init__(self) -> None:
        if isinstance(self.calibration, Mapping):
            reject_unknown_keys("calibration", self.calibration, set(PruneCalibSpec.__dataclass_fields__))
            self.calibration = PruneCalibSpec(**dict(self.calibration))
        _check_spec(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a pruning spec must be a mapping; got {type(data).__name__}")
        reject_unknown_keys("pruning spec", data, set(cls.__dataclass_fields__))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_ratio(self) -> float:
        return max(self.sensitivity_ratios)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_rho(rho: Any) -> float:
    if not _is_number(rho) or not 0 < float(rho) < 1:
        raise ConfigError(f"rho {rho!r} is outside (0, 1); accepted: a fraction of the prunable parameters, e.g. 0.1 or 0.3")
    return float(rho)


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ConfigError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return value


def _check_spec(spec: PruneSpec) -> None:
    spec.rho = check_rho(spec.rho)
    check_choice("allocation", spec.allocation, ALLOCATIONS)
    check_choice("importance", spec.importance, IMPORTANCES)
    check_choice("sensitivity_metric", spec.sensitivity_metric, SENSITIVITY_METRICS)
    for name in ("heads", "ffn", "embed"):
        if not isinstance(getattr(spec, name), bool):
            raise ConfigError(f"{name} must be true or false; got {getattr(spec, name)!r}")
    if spec.embed:
        # A pruned residual width would change every LayerNorm's statistics and, with the config
        # deriving head_dim from embed_dim / num_heads, only multiples of head_dim are expressible.
        raise ConfigError("embed: true (pruning the embedding width) is not supported; accepted: false")
    if not (spec.heads or spec.ffn):
        raise ConfigError("heads and ffn are both false: nothing to prune; accepted: at least one true")
    if not _is_int(spec.min_heads) or spec.min_heads < 1:
        raise ConfigError(f"min_heads must be an integer >= 1; got {spec.min_heads!r}")
    ratios = spec.sensitivity_ratios
    if (isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios
            or not all(_is_number(r) and 0 < float(r) < 1 for r in ratios)):
        raise ConfigError(f"sensitivity_ratios must be a non-empty list of fractions in (0, 1); got {ratios!r}")
    spec.sensitivity_ratios = sorted({float(r) for r in ratios})
    if not _is_number(spec.sensitivity_floor) or not 0 <= float(spec.sensitivity_floor) < 1:
        raise ConfigError(f"sensitivity_floor must be a number in [0, 1); got {spec.sensitivity_floor!r}")
    if spec.allocation == "sensitivity" and spec.rho > spec.max_ratio:
        raise ConfigError(
            f"rho {spec.rho} exceeds the largest sensitivity ratio {spec.max_ratio}; accepted: rho <= "
            f"max(sensitivity_ratios), or allocation uniform"
        )
    c = spec.calibration
    for name in ("n_pairs", "n_scenes", "width", "height", "views", "window", "batch_size"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"calibration.{name} must be a positive integer; got {value!r}")
    if not _is_int(c.seed_base) or c.seed_base < PRUNE_CALIB_SEED_MIN:
        raise ConfigError(
            f"calibration.seed_base must be an integer >= {PRUNE_CALIB_SEED_MIN:,} (lower seeds are the "
            f"evaluation, training, validation and quantization scenes); got {c.seed_base!r}"
        )
    if not isinstance(spec.finetune, Mapping):
        raise ConfigError(f"finetune must be a mapping of training settings; got {spec.finetune!r}")
    if spec.finetune:
        train_spec(spec)  # fail at load time, not after the sensitivity trials


def train_spec(spec: PruneSpec):
    """The fine-tuning `TrainSpec` (pqk.train.trainer) of `spec.finetune`, seeded like the spec."""
    from pqk.train.trainer import TrainSpec

    return TrainSpec.from_dict({"seed": spec.seed, **dict(spec.finetune)})



def load_prune_spec(path: str | Path) -> PruneSpec:
    """Read and validate a pruning spec (configs/prune.yaml); missing keys take defaults."""
    data = read_yaml(Path(path), "pruning config", invalid=ConfigError)
    return PruneSpec.from_dict({} if data is None else data)


def rho_tag(rho: float) -> str:
    """0.1 -> 'r010', 0.3 -> 'r030' (the protocol's file and exp_id names)."""
    return f"r{round(rho * 100):03d}"


# --- the calibration pairs --------------------------------------------------------------------


def calibration_examples(spec: PruneCalibSpec, seed: int = 42) -> list[dict[str, torch.Tensor]]:
    """`spec.n_pairs` pairs (images + GT pointmaps, `pair_example` layout) from generated scenes
    with seeds `seed_base`, `seed_base + 1`, ...: never the workload's. Same spec, same pairs."""
    from pqk.data.pair_batches import pair_example, window_pairs
    from pqk.data.scenes import generate_scene

    scenes = [generate_scene(spec.seed_base + k, n_views=spec.views, width=spec.width, height=spec.height)
              for k in range(spec.n_scenes)]
    pairs = [(s, i, j) for s in range(len(scenes)) for i, j in window_pairs(spec.views, spec.window)]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pairs), size=min(spec.n_pairs, len(pairs)), replace=False)
    return [pair_example(scenes[pairs[k][0]], pairs[k][1], pairs[k][2]) for k in sorted(picks)]


@torch.no_grad()
def calibration_quality(model: nn.Module, calib: Sequence[dict], batch_size: int = 4) -> dict[str, float]:
    """Quality on the calibration pairs with the metric code `evaluate` uses (`depth_metrics`:
    median-aligned, pooled over pixels) and the task loss.

    absrel / delta1 / rmse pool *both* pointmaps: the z of view 1's `pts3d` and of view 2's
    `pts3d_in_other_view` (both in view 1's camera, as is their GT). The protocol's record scores
    view 1 only, but the second decoder's last block reaches view 2 only: scored on view 1 alone
    it would look free to prune. `view1_*` are the record's figures."""
    from pqk.data.pair_batches import collate_pairs
    from pqk.tasks.dust3r.metrics import aggregate_depth_metrics, depth_metrics
    from pqk.train.losses import conf_regression_loss

    was_training = model.training
    model.eval()
    per_view: dict[str, list[dict]] = {"1": [], "2": []}
    losses, weights = [], []
    try:
        for start in range(0, len(calib), batch_size):
            view1, view2, gt = collate_pairs(calib[start : start + batch_size])
            res1, res2 = model(view1, view2)
            loss, _ = conf_regression_loss(res1, res2, gt)
            losses.append(float(loss))
            weights.append(view1["img"].shape[0])
            for b in range(view1["img"].shape[0]):
                for v, pred, gt_pts in (("1", res1["pts3d"], gt["pts1"]), ("2", res2["pts3d_in_other_view"], gt["pts2"])):
                    per_view[v].append(depth_metrics(pred[b, ..., 2].float().numpy(), gt_pts[b, ..., 2].numpy(),
                                                     gt[f"valid{v}"][b].numpy()))
    finally:
        model.train(was_training)
    both = aggregate_depth_metrics(per_view["1"] + per_view["2"])
    out = {"loss": float(np.average(losses, weights=weights)), **{k: both[k] for k in ("absrel", "delta1", "rmse")}}
    for v in ("1", "2"):
        agg = aggregate_depth_metrics(per_view[v])
        out.update({f"view{v}_{k}": agg[k] for k in ("absrel", "delta1", "rmse")})
    return out


# --- prunable units ---------------------------------------------------------------------------


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


def _unit_root(model: nn.Module, unit: Unit):
    """(root module, Torch-Pruning pruning function) of a unit's dependency group."""
    import torch_pruning as tp

    module = model.get_submodule(unit.name)
    if unit.kind == "heads":
        # The downstream proj is the root, as Torch-Pruning's own head pruning does: its input
        # channels are exactly the heads' channels, q/k/v slices follow through the graph.
        return module.proj, tp.prune_linear_in_channels
    return module.fc1, tp.prune_linear_out_channels


def channel_indices(unit: Unit, removed: Sequence[int]) -> list[int]:
    """Root channels of the removed heads (head h = channels h*hd ... h*hd + hd - 1)."""
    if unit.kind == "ffn":
        return sorted(int(i) for i in removed)
    return [h * unit.head_dim + d for h in sorted(int(i) for i in removed) for d in range(unit.head_dim)]


# --- the dependency graph ---------------------------------------------------------------------


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
    return self.proj(merge_heads(attention_core(q, k, v, self.core_dtype)))


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


# --- importance -------------------------------------------------------------------------------


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


# --- masking: the exact effect of removal, without rebuilding -----------------------------------


@contextlib.contextmanager
def masked(model: nn.Module, removals: Mapping[str, Sequence[int]], units: Mapping[str, Unit]) -> Iterator[None]:
    """Within the block, the model computes exactly what it computes once `removals` (unit name ->
    removed heads/channels) are pruned: a removed head's only path to the output is its columns
    of proj, an FFN channel's its column of fc2; zeroing those is removal (biases stay in both)."""
    saved = []
    try:
        with torch.no_grad():
            for name, removed in removals.items():
                if not len(removed):
                    continue
                module = model.get_submodule(name)
                out_layer = module.proj if units[name].kind == "heads" else module.fc2
                cols = torch.tensor(channel_indices(units[name], removed), dtype=torch.long)
                saved.append((out_layer.weight, cols, out_layer.weight[:, cols].clone()))
                out_layer.weight[:, cols] = 0.0
        yield
    finally:
        with torch.no_grad():
            for weight, cols, values in saved:
                weight[:, cols] = values


# --- sensitivity ------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def max_removable(unit: Unit, spec: PruneSpec) -> int:
    cap = _round_half_up(spec.max_ratio * unit.count)
    floor = spec.min_heads if unit.kind == "heads" else 1
    return max(0, min(cap, unit.count - floor))


def relative_drop(new: float, ref: float, metric: str) -> float:
    """Positive = worse than the reference; the gates' definition, with 'loss' lower-is-better."""
    if metric != "loss":
        from pqk.pipeline.gates import quality_drop

        return quality_drop(new, ref, metric)
    if ref == 0:
        return 0.0 if new == ref else math.inf
    return (new - ref) / abs(ref)


def sensitivity_analysis(
    model: AsymmetricCroCo3DStereo,
    units: Sequence[Unit],
    scores: Mapping[str, torch.Tensor],
    calib: Sequence[dict],
    spec: PruneSpec,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Each unit alone loses each ratio of its heads/channels (least important first); the
    quality on the calibration pairs is measured. Returns the JSON-ready table."""
    by_name = {u.name: u for u in units}
    start = time.perf_counter()
    model.eval()
    base = calibration_quality(model, calib, spec.calibration.batch_size)
    rows = []
    for k, unit in enumerate(units):
        done = set()
        for ratio in spec.sensitivity_ratios:
            n = min(_round_half_up(ratio * unit.count), max_removable(unit, spec))
            if n <= 0 or n in done:
                continue
            done.add(n)
            removed = least_important(scores[unit.name], n)
            with masked(model, {unit.name: removed}, by_name):
                q = calibration_quality(model, calib, spec.calibration.batch_size)
            rows.append({
                "unit": unit.name, "kind": unit.kind, "ratio": ratio, "n_removed": n, "count": unit.count,
                "params_removed": n * unit.params_per, **q,
                "drop": {m: relative_drop(q[m], base[m], m) for m in SENSITIVITY_METRICS},
            })
        log(f"sensitivity {k + 1}/{len(units)} {unit.name}: "
            + ", ".join(f"-{r['n_removed']} {spec.sensitivity_metric} drop {r['drop'][spec.sensitivity_metric]:+.2%}"
                        for r in rows if r["unit"] == unit.name))
    return {
        "baseline": base,
        "metric": spec.sensitivity_metric,
        "ratios": spec.sensitivity_ratios,
        "importance": spec.importance,
        "calibration": asdict(spec.calibration),
        "units": [asdict(u) | {"prunable_params": u.prunable_params} for u in units],
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }


def _hash_state(h, model: nn.Module) -> None:
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights (names, shapes and values)."""
    h = hashlib.sha256()
    _hash_state(h, model)
    return h.hexdigest()


def sensitivity_fingerprint(model: nn.Module, spec: PruneSpec) -> str:
    """Identifies a table: the weights and every setting the trials depend on."""
    h = hashlib.sha256()
    _hash_state(h, model)
    settings = {"quality": "both pointmaps, v1", "ratios": spec.sensitivity_ratios, "importance": spec.importance, "heads": spec.heads,
                "ffn": spec.ffn, "min_heads": spec.min_heads, "calibration": asdict(spec.calibration), "seed": spec.seed}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def plot_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_sensitivity(table: dict, path: Path) -> Path | None:
    """A heat map (units x ratios, relative drop of the table's metric); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = table["metric"]
    names = [u["name"] for u in table["units"]]
    ratios = table["ratios"]
    grid = np.full((len(names), len(ratios)), np.nan)
    for row in table["rows"]:
        grid[names.index(row["unit"]), ratios.index(row["ratio"])] = 100.0 * row["drop"][metric]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(ratios), 1.2 + 0.26 * len(names)))
    limit = max(1e-6, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(ratios)), [f"{r:.0%}" for r in ratios])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("share of the unit's heads / FFN channels removed (alone)")
    ax.set_title(f"{metric} drop (%) on {table['calibration']['n_pairs']} calibration pairs", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --- allocation -------------------------------------------------------------------------------


def total_prunable(units: Sequence[Unit]) -> int:
    return sum(u.prunable_params for u in units)


def allocate_uniform(units: Sequence[Unit], rho: float, spec: PruneSpec) -> dict[str, int]:
    """ρ of every unit: whole heads by rounding, the rounding error made up in the FFN widths
    (the same share of each), so the total removed is ρ of the prunable parameters."""
    target = rho * total_prunable(units)
    out: dict[str, int] = {}
    floor = {u.name: (spec.min_heads if u.kind == "heads" else 1) for u in units}
    for u in units:
        if u.kind == "heads":
            out[u.name] = min(_round_half_up(rho * u.count), u.count - floor[u.name])
    head_removed = sum(out[u.name] * u.params_per for u in units if u.kind == "heads")
    ffn = [u for u in units if u.kind == "ffn"]
    ffn_total = sum(u.prunable_params for u in ffn)
    share = min(1.0, max(0.0, (target - head_removed) / ffn_total)) if ffn_total else 0.0
    for u in ffn:
        out[u.name] = min(_round_half_up(share * u.count), u.count - floor[u.name])
    return out


def _lower_hull(points: list[tuple]) -> list[tuple]:
    """Lower convex hull of (params, n, drop, ...) from (0, 0, 0, ...), in params order: the
    steps a cost-per-parameter greedy may take in sequence."""
    pts = sorted(points)
    hull: list[tuple] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, _, y1, *_), (x2, _, y2, *_) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment hull[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[2] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_sensitivity(units: Sequence[Unit], rho: float, table: Mapping, spec: PruneSpec) -> dict[str, int]:
    """Remove ρ of the prunable parameters where the measured drop per removed parameter is
    lowest: each unit's curve is reduced to its lower convex hull, the segments are taken
    cheapest first; an FFN segment may be taken in part (any channel count), a head segment only
    whole; a head step that would overshoot ρ is skipped, with its unit's later steps, while FFN
    steps remain.

    A drop counts as at least `spec.sensitivity_floor` x the share of the unit removed. Without
    the floor, units whose trials measured a small gain (noise on a few pairs) cost nothing and
    are cut to the maximum first; their damage together is not the sum of their single-unit
    drops (teacher, ρ = 0.1, held-out validation pairs: δ1 0.65 without the floor, 0.76 with 1%).
    Equal costs are ordered by the drop as measured."""
    metric = table["metric"]
    by_name = {u.name: u for u in units}
    floor = float(spec.sensitivity_floor)
    # (params removed, heads/channels removed, drop used, drop as measured)
    curves: dict[str, list[tuple[int, int, float, float]]] = {u.name: [(0, 0, 0.0, 0.0)] for u in units}
    for row in table["rows"]:
        if row["unit"] in curves:
            drop, n = float(row["drop"][metric]), int(row["n_removed"])
            used = max(drop, floor * n / by_name[row["unit"]].count)
            curves[row["unit"]].append((int(row["params_removed"]), n, used, drop))
    missing = [u.name for u in units if len(curves[u.name]) == 1 and max_removable(u, spec) > 0]
    if missing:
        raise ConfigError(f"the sensitivity table has no rows for {', '.join(missing[:3])}; recompute it for this model")
    segments = []
    for name, pts in curves.items():
        hull = _lower_hull(pts)
        for order, (a, b) in enumerate(zip(hull, hull[1:])):
            span = max(1, b[0] - a[0])
            segments.append(((b[2] - a[2]) / span, (b[3] - a[3]) / span, order, name, a, b))
    segments.sort(key=lambda s: s[:4])
    target = rho * total_prunable(units)
    removed_params = 0.0
    out = {u.name: 0 for u in units}
    closed: set[str] = set()
    has_ffn_after = [any(by_name[s[3]].kind == "ffn" for s in segments[k + 1:]) for k in range(len(segments))]
    for k, (_, _, _, name, a, b) in enumerate(segments):
        if removed_params >= target:
            break
        if name in closed or out[name] != a[1]:
            continue  # an earlier step of this unit was skipped
        unit = by_name[name]
        need = target - removed_params
        gain = (b[1] - a[1]) * unit.params_per
        if gain <= need:
            out[name] = b[1]
            removed_params += gain
        elif unit.kind == "ffn":
            out[name] = a[1] + math.ceil(need / unit.params_per)
            removed_params += (out[name] - a[1]) * unit.params_per
        elif has_ffn_after[k]:
            closed.add(name)  # a whole head would overshoot: let FFN channels make up the rest
        else:
            out[name] = b[1]
            removed_params += gain
    return out


def allocate(units: Sequence[Unit], rho: float, spec: PruneSpec, table: Mapping | None = None) -> dict[str, int]:
    """Heads / channels to remove per unit so that ρ of the prunable parameters go."""
    rho = check_rho(rho)
    check_choice("allocation", spec.allocation, ALLOCATIONS)
    if spec.allocation == "uniform":
        return allocate_uniform(units, rho, spec)
    if table is None:
        raise ConfigError("allocation 'sensitivity' needs a sensitivity table (sensitivity_analysis)")
    return allocate_sensitivity(units, rho, table, spec)


# --- pruning and the clean rebuild --------------------------------------------------------------


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


# --- fine-tuning and the step ----------------------------------------------------------------


def task_loss(model: nn.Module, view1: dict, view2: dict, gt: dict, progress: float):
    """The fine-tuning loss: DUSt3R's confidence-weighted regression (as the teacher was trained)."""
    from pqk.train.losses import conf_regression_loss

    res1, res2 = model(view1, view2)
    return conf_regression_loss(res1, res2, gt)


def finetune(model: nn.Module, spec: PruneSpec, out_dir: Path, budget: float = 1.0, *, resume: bool = True,
             log: Callable[[str], None] = print, show_progress: bool = True, name: str = "finetune"):
    """Fine-tune with the task loss through the shared trainer; returns its FitResult."""
    from pqk.train.trainer import fit

    ts = train_spec(spec)
    if budget != 1.0:
        ts = ts.scaled(budget)
    return fit(model, task_loss, ts, Path(out_dir), resume=resume, log=log, show_progress=show_progress, name=name)


def artifact_name(rho: float, allocation: str = "sensitivity") -> str:
    """pruned_r030.pth; the uniform baseline gets pruned_r030_uniform.pth."""
    return f"pruned_{rho_tag(rho)}" + ("" if allocation == "sensitivity" else f"_{allocation}") + ".pth"


def sensitivity_table(
    model: AsymmetricCroCo3DStereo,
    spec: PruneSpec,
    calib: Sequence[dict],
    out_dir: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """The sensitivity table of `model` under `spec`: read from `out_dir/sensitivity.json` when
    it was computed for the same weights and settings, else measured and saved there (JSON and,
    when matplotlib imports, `sensitivity.png`; the JSON's `plot` says which)."""
    fingerprint = sensitivity_fingerprint(model, spec)
    path = None if out_dir is None else Path(out_dir) / "sensitivity.json"
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
        if table.get("fingerprint") == fingerprint:
            log(f"sensitivity: reusing {path}")
            table["metric"] = spec.sensitivity_metric  # every trial recorded all metrics
            return table
    model.eval()
    units = prunable_units(model, spec.heads, spec.ffn)
    scores = importance_scores(model, units, spec.importance, calib, spec.calibration.batch_size)
    table = {"fingerprint": fingerprint, **sensitivity_analysis(model, units, scores, calib, spec, log)}
    if path is not None:
        from pqk.io.files import write_json

        png = plot_sensitivity(table, path.with_suffix(".png"))
        table["plot"] = str(png.name) if png else "skipped: matplotlib is not installed"
        write_json(path, table)
    return table


def prune_step(model: AsymmetricCroCo3DStereo, ctx, spec: PruneSpec, *, sensitivity: dict | None = None,
               calib: Sequence[dict] | None = None):
    """The plan runner's P step: prune to `spec.rho`, fine-tune (epochs scaled by `ctx.budget`),
    save `pruned_rXXX.pth` in `ctx.out_dir`. Record slice: rho. `sensitivity` / `calib` reuse a
    table and calibration pairs the caller already has (several ρ on one model)."""
    from pqk.methods.base import StepResult

    start = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if calib is None and (spec.allocation == "sensitivity" or spec.importance == "taylor"):
        calib = calibration_examples(spec.calibration, spec.seed)
    if sensitivity is None and spec.allocation == "sensitivity":
        sensitivity = sensitivity_table(model, spec, calib, out_dir, ctx.log)
    outcome = prune_model(model, spec, calib, sensitivity=sensitivity, log=ctx.log)
    pruned, history = outcome.model, outcome.model.pqk_history
    tag = rho_tag(spec.rho) + ("" if spec.allocation == "sensitivity" else f"_{spec.allocation}")
    details: dict[str, Any] = {"prune": outcome.stats, "spec": spec.to_dict()}
    notes = [f"{spec.allocation} allocation, {spec.importance} importance, rho achieved {outcome.stats['rho_achieved']:.3f}"]
    if calib:
        details["calibration_after_pruning"] = calibration_quality(pruned, calib)
    if spec.finetune:
        # No progress bar of its own: callers (the CLI's status line, the plan runner) show ctx.log.
        # The folder is named by the pruned weights: a resume continues this model's run, never
        # one of another allocation or base model written to the same --out.
        ft_dir = out_dir / f"finetune_{tag}_{state_fingerprint(pruned)[:8]}"
        result = finetune(pruned, spec, ft_dir, ctx.budget, resume=ctx.resume, log=ctx.log,
                          show_progress=False, name=f"finetune_{tag}")
        pruned = result.model.eval()
        details["finetune"] = {
            "budget": ctx.budget, "epochs": len(result.history), "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "wall_time_s": round(result.wall_time_s, 1),
            "best_val": result.best_val, "log": str(result.log_path),
        }
        if calib:
            details["calibration_after_finetune"] = calibration_quality(pruned, calib)
        history = history + [{"step": "finetune", "budget": ctx.budget, "best_epoch": result.best_epoch}]
    else:
        notes.append("no fine-tuning (finetune is empty)")
    pruned.pqk_history = history
    artifact = save_model(pruned, out_dir / artifact_name(spec.rho, spec.allocation))
    hours = (time.perf_counter() - start) / 3600.0
    return StepResult(model=pruned, artifact=artifact, fields={"rho": spec.rho}, device_hours=hours,
                      notes=notes, details=details)


__all__ = [
    "ALLOCATIONS", "IMPORTANCES", "PruneCalibSpec", "PruneOutcome", "PruneSpec", "Unit", "allocate",
    "apply_pruning", "artifact_name", "block_widths_of", "calibration_examples", "calibration_quality",
    "dependency_graph", "importance_scores", "load_prune_spec", "masked", "plot_sensitivity", "prunable_units",
    "prune", "prune_model", "prune_step", "rebuild_clean", "rho_tag", "sensitivity_analysis", "sensitivity_table",
    "train_spec",
]
