"""TEAL as a plan step (`method: teal`): training-free activation sparsity (Liu et al. 2024,
"Training-Free Activation Sparsity in Large Language Models"). Every Linear of the transformer
blocks zeroes the small-magnitude entries of its input; the threshold of each Linear is the
`sparsity` quantile of |x| over held-out generated pairs at the workload's shape (calibration
seeds, never the workload's).

Which Linears: those of `enc_blocks`, `dec_blocks` and `dec_blocks2` (attention qkv/proj,
cross-attention projq/k/v/proj, MLP fc1/fc2), as TEAL sparsifies every projection of the
blocks. Left dense: `decoder_embed` (one small projection per view, under 1 % of the
FLOPs, and the only way into both decoders: an error there reaches all of their blocks;
TEAL likewise leaves the embedding alone) and the heads (the linear head writes the
pointmaps themselves, as TEAL leaves lm_head; the DPT head is convolutions).

Two variants:
- unstructured: entries with |x| <= t are zeroed (`x * (|x| > t)`, then the dense GEMM). The
  paper's form; the speed-up it reports needs a GPU kernel that skips weight columns per
  token, which a CPU GEMM does not have (benchmarks/teal_speed.py).
- structured: per view (batch item), the input channels whose mean |x| over that view's tokens
  is <= t are zeroed for every token, and the kept channels run as a smaller dense GEMM
  (`x[..., keep] @ W[:, keep]ᵀ`): the form a CPU GEMM can run faster (full-size Linears of a
  pair, 2 threads: 1.30x at 40 %, 1.56x at 50 %). t is calibrated so the share of dropped
  channels hits the target.

Saved as plain weights (`ctx.family.save_model`: same state_dict keys) plus teal_thresholds.json;
a following `quantize` step keeps the masks: they export to ONNX before each Linear, and the
oneDNN INT8 runtime carries the threshold into `Int8Linear` (pqk.backends.torch_int8)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common
from pqk.methods.hooks import hooked

VARIANTS = ("unstructured", "structured")
BLOCK_STACKS = ("enc_blocks", "dec_blocks", "dec_blocks2")
THRESHOLDS_FILE = "teal_thresholds.json"
MIN_CALIBRATION_PAIRS = 4  # a budget < 1 never scales calibration below this
SEED_CALIBRATION = 600_000  # offsets from CALIBRATION_SEED_MIN: apart from quantize's and cascade's scenes
SEED_HELD_OUT = 650_000


@dataclass(frozen=True)
class TealSpec:
    sparsity: float = 0.4
    variant: str = "unstructured"
    calibration_pairs: int = 16
    held_out_pairs: int = 4

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"teal sparsity must be a fraction in [0, 1) (e.g. 0.25, 0.4, 0.5); got {s!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"teal variant {self.variant!r} is not known; accepted: {', '.join(VARIANTS)}")
        for key, low in (("calibration_pairs", 1), ("held_out_pairs", 0)):
            n = getattr(self, key)
            if isinstance(n, bool) or not isinstance(n, int) or n < low:
                raise ConfigError(f"teal {key} must be an integer >= {low}; got {n!r}")


# --- the sparsified Linear ----------------------------------------------------------------------


class SparseInputLinear(nn.Linear):
    """nn.Linear whose input is sparsified first; same parameters (weight, bias), so the
    state_dict and strict checkpoint loading do not change. `input_threshold` is a plain float
    (not a buffer: it is saved in teal_thresholds.json); 0 means dense."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_threshold: float = 0.0,
                 structured: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_threshold = float(input_threshold)
        self.structured = bool(structured)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_threshold: float = 0.0, structured: bool = False) -> SparseInputLinear:
        """A SparseInputLinear sharing `linear`'s parameters (no copy)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, input_threshold, structured,
                  device="meta")
        out.weight = linear.weight
        out.bias = linear.bias
        return out.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.input_threshold
        if t <= 0:
            return F.linear(x, self.weight, self.bias)
        if not self.structured:
            return F.linear(x * (x.abs() > t), self.weight, self.bias)
        keep = channel_keep(x, t)  # (items, C)
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            # The graph gets the equivalent mask: the weight stays one constant that the
            # quantizer can turn into an int8 initializer (a gathered weight could not be).
            return F.linear(x * keep.reshape(*x.shape[:-2], 1, x.shape[-1]), self.weight, self.bias)
        return gathered_linear(x, keep, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "structured" if self.structured else "unstructured"
        return f"{super().extra_repr()}, input_threshold={self.input_threshold:.4g} ({kind})"


def channel_keep(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(items, C) bool: channels whose mean |x| over the item's tokens (dim -2) is above
    `threshold`; items are the leading dims flattened (one per view)."""
    return x.abs().mean(dim=-2).reshape(-1, x.shape[-1]) > threshold


def gathered_linear(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per item, the kept channels as a smaller dense GEMM: x[:, keep] @ W[:, keep]ᵀ + b."""
    items = x.reshape(-1, *x.shape[-2:])
    outs = []
    for item, k in zip(items, keep):
        idx = k.nonzero().squeeze(1)
        outs.append(F.linear(item.index_select(-1, idx), weight.index_select(1, idx), bias))
    return torch.stack(outs).reshape(*x.shape[:-1], weight.shape[0])


def sparsifiable_linears(model: nn.Module) -> list[str]:
    """Module paths of the Linears TEAL sparsifies: every Linear inside the transformer blocks."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[0] in BLOCK_STACKS]


def apply_thresholds(model: nn.Module, thresholds: Mapping[str, float], variant: str) -> nn.Module:
    """Replace (in place) each Linear named in `thresholds` by a SparseInputLinear sharing its
    parameters; returns `model`."""
    from pqk.backends.torch_int8 import set_module

    if variant not in VARIANTS:
        raise ConfigError(f"teal variant {variant!r} is not known; accepted: {', '.join(VARIANTS)}")
    for name, t in thresholds.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"teal threshold for {name!r}: that module is a {type(module).__name__}, not a Linear")
        set_module(model, name, SparseInputLinear.from_linear(module, float(t), variant == "structured"))
    return model


# --- calibration --------------------------------------------------------------------------------


class LogHistogram:
    """Counts of log10(value) in fixed bins, for quantiles of |x| over many large calls without
    keeping x (a full-size encoder input is 2 x 768 x 4096 floats per call)."""

    LO, HI, BINS = -8.0, 4.0, 6000  # 1e-8 .. 1e4; a bin is 0.5 % wide; values outside land in the end bins
    MAX_SAMPLES = 1 << 20  # per call: an odd stride over the flat tensor meets every channel

    def __init__(self) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1)
        if flat.numel() > self.MAX_SAMPLES:
            flat = flat[:: (flat.numel() // self.MAX_SAMPLES) | 1]
        logs = flat.float().clamp_min(1e-30).log10()
        idx = ((logs - self.LO) * (self.BINS / (self.HI - self.LO))).floor().clamp_(0, self.BINS - 1).long()
        self.counts += torch.bincount(idx, minlength=self.BINS).to(self.counts)

    def quantile(self, q: float) -> float:
        """The value below which a share `q` of the counts lies (log-linear within a bin)."""
        total = float(self.counts.sum())
        if q <= 0 or total == 0:
            return 0.0
        cum = self.counts.cumsum(0)
        target = q * total
        k = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).clamp(max=self.BINS - 1))
        before = float(cum[k - 1]) if k > 0 else 0.0
        frac = (target - before) / max(float(self.counts[k]), 1.0)
        return float(10 ** (self.LO + (k + frac) * (self.HI - self.LO) / self.BINS))


def _run_pairs(model: nn.Module, pairs: list) -> None:
    with torch.inference_mode():
        for view1, view2 in pairs:
            model(view1, view2)


def collect_histograms(model: nn.Module, pairs: list, names: list[str], variant: str) -> dict[str, LogHistogram]:
    """Per named Linear, the histogram of what its threshold is compared with: |x| entries
    (unstructured) or per-item channel means of |x| (structured), before its own mask."""
    hists = {name: LogHistogram() for name in names}

    def hook(name):
        def pre(_module, args):
            x = args[0]
            hists[name].add(x.abs().mean(dim=-2) if variant == "structured" else x.abs())
        return pre

    with hooked(((model.get_submodule(n), hook(n)) for n in names), pre=True):
        _run_pairs(model, pairs)
    return hists


def measure_sparsity(model: nn.Module, pairs: list, names: list[str]) -> dict:
    """The share of input entries (unstructured) or per-item channels (structured) each
    SparseInputLinear zeroes on `pairs`: mean, min and max over the layers."""
    dropped = {n: [0.0, 0.0] for n in names}

    def hook(name):
        def pre(module, args):
            x, t = args[0], module.input_threshold
            gone = ~channel_keep(x, t) if module.structured else x.abs() <= t
            dropped[name][0] += float(gone.sum()) if t > 0 else 0.0
            dropped[name][1] += gone.numel()
        return pre

    with hooked(((model.get_submodule(n), hook(n)) for n in names), pre=True):
        _run_pairs(model, pairs)
    shares = [d / max(total, 1.0) for d, total in dropped.values()]
    if not shares:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "layers": 0}
    return {"mean": sum(shares) / len(shares), "min": min(shares), "max": max(shares), "layers": len(shares)}


def calibrate(model: nn.Module, pairs: list, sparsity: float, variant: str) -> dict[str, float]:
    """Sparsify `model` in place and return its thresholds (layer path -> t).

    Two passes: the first fits each threshold on the dense model's activations (as TEAL does);
    the second re-fits each on its input with every threshold of the first pass applied, since
    sparsifying the earlier layers shifts what the later ones see. On the tiny test model at
    target 0.5 (16 pairs) that narrows the layers' held-out sparsity from 0.47..0.62 to
    0.47..0.52; the mean over layers was already within about a point."""
    names = sparsifiable_linears(model)
    apply_thresholds(model, {n: 0.0 for n in names}, variant)  # dense: also resets an earlier TEAL step
    thresholds: dict[str, float] = {}
    for _ in range(2 if sparsity > 0 else 1):
        hists = collect_histograms(model, pairs, names, variant)
        thresholds = {n: hists[n].quantile(sparsity) for n in names}
        for n, t in thresholds.items():
            model.get_submodule(n).input_threshold = t
    return thresholds


def teal_pairs(n_pairs: int, width: int, height: int, seed_offset: int, device: str = "cpu", batch: int = 1) -> list:
    """`n_pairs` (view1, view2), each the two views of its own generated scene from the
    calibration seed range (CALIBRATION_SEED_MIN + `seed_offset` on): never the workload's
    seeds. One scene a pair: views of one scene share their statistics, and more scenes per
    pair count give thresholds that carry over to unseen scenes. `batch` pairs go in one
    forward call (each view stays its own batch item, so the structured variant's
    per-view channel means are unchanged)."""
    from pqk.data.scenes import generate_scene
    from pqk.methods.quantize.spec import CALIBRATION_SEED_MIN
    from pqk.tasks.dust3r.measure import scene_view

    pairs = []
    for k in range(n_pairs):
        scene = generate_scene(CALIBRATION_SEED_MIN + seed_offset + k, n_views=2, width=width, height=height)
        pairs.append((scene_view(scene, 0, device), scene_view(scene, 1, device)))
    return [tuple(_stack([p[v] for p in pairs[i:i + batch]]) for v in (0, 1)) for i in range(0, n_pairs, batch)]


def _stack(views: list[dict]) -> dict:
    if len(views) == 1:
        return views[0]
    return {"img": torch.cat([v["img"] for v in views]), "true_shape": torch.cat([v["true_shape"] for v in views]),
            "idx": [i for v in views for i in v["idx"]], "instance": [i for v in views for i in v["instance"]]}


# --- saving and restoring ---------------------------------------------------------------------------


def save_thresholds(path: Path, thresholds: Mapping[str, float], variant: str, target: float) -> Path:
    payload = {"variant": variant, "target": target, "thresholds": dict(thresholds)}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_thresholds(path: Path) -> tuple[dict[str, float], str, float]:
    """(thresholds, variant, target) from a teal_thresholds.json."""
    data = json.loads(Path(path).read_text())
    return {k: float(v) for k, v in data["thresholds"].items()}, data["variant"], float(data["target"])


def tag(variant: str, sparsity: float) -> str:
    """u40 / s25: the variant's letter and the target in percent."""
    return f"{variant[0]}{round(100 * float(sparsity)):02d}"


# --- the method ---------------------------------------------------------------------------------------


@register
class Teal(Method):
    name = "teal"
    letter = "T"
    options = frozenset({"sparsity", "variant", "calibration_pairs"})
    default_config = "configs/teal.yaml"

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> TealSpec:
        from pqk.yaml_io import read_config_mapping

        data = read_config_mapping(config, "teal config", set(TealSpec.__dataclass_fields__))
        data = {**data, **{k: options[k] for k in self.options if k in options}}
        return TealSpec(**data)

    def run(self, model: nn.Module, ctx: StepContext, spec: TealSpec) -> StepResult:
        start = time.perf_counter()
        model = model.to(ctx.device).eval()
        height, width = ctx.family.input_shape(ctx.workload)
        n_cal, notes = spec.calibration_pairs, [f"teal {spec.variant} {spec.sparsity:g}"]
        if ctx.budget < 1:
            n_cal = min(n_cal, max(MIN_CALIBRATION_PAIRS, round(n_cal * ctx.budget)))
            if n_cal < spec.calibration_pairs:
                notes.append(f"calibration {n_cal} of {spec.calibration_pairs} pairs (budget {ctx.budget:g})")
        ctx.log(f"teal: calibrating {spec.variant} thresholds for sparsity {spec.sparsity:g} on {n_cal} pairs "
                f"at {width}x{height}")
        calibration = teal_pairs(n_cal, width, height, SEED_CALIBRATION, ctx.device)
        thresholds = calibrate(model, calibration, spec.sparsity, spec.variant)
        names = list(thresholds)
        details = {"variant": spec.variant, "target": spec.sparsity, "layers": len(names), "calibration_pairs": n_cal,
                   "sparsity_calibration": measure_sparsity(model, calibration, names)}
        if spec.held_out_pairs:
            held_out = teal_pairs(spec.held_out_pairs, width, height, SEED_HELD_OUT, ctx.device)
            details["held_out_pairs"] = spec.held_out_pairs
            details["sparsity_held_out"] = measure_sparsity(model, held_out, names)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        artifact = ctx.family.save_model(model, ctx.out_dir / "teal_model.safetensors")
        save_thresholds(ctx.out_dir / THRESHOLDS_FILE, thresholds, spec.variant, spec.sparsity)
        measured = details.get("sparsity_held_out", details["sparsity_calibration"])
        ctx.log(f"teal: {len(names)} Linears, measured sparsity {measured['mean']:.3f} "
                f"(layers {measured['min']:.3f}..{measured['max']:.3f})")
        return StepResult(model=model, artifact=Path(artifact), device_hours=(time.perf_counter() - start) / 3600,
                          details=details, notes=notes,
                          runtime=f"torch eager fp32 + teal {spec.variant} {spec.sparsity:g}")

    def restore(self, done, entering, task) -> StepResult:
        model = task.load_model(done["artifact"]).eval()
        thresholds, variant, _ = load_thresholds(Path(done["artifact"]).with_name(THRESHOLDS_FILE))
        return StepResult(model=apply_thresholds(model, thresholds, variant), **restore_common(done))

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        details = result.details if result is not None else {}
        variant = details.get("variant", options.get("variant", "unstructured"))
        return tag(str(variant), float(details.get("target", options.get("sparsity", 0.4))))

    def stage(self, alone: bool) -> str:
        return "P2"  # training-free, judged like Q: quality against the model it received

    def reference(self, alone: bool) -> str:
        return "input"

    def cost(self, costing, step, model, where: str):
        """Calibration: two passes over the calibration pairs, one to measure them, one over the
        held-out pairs, at the evaluation's shape; the model leaves with the same size."""
        cfg = costing.config(step)
        n_cal = int(step.options.get("calibration_pairs", cfg.get("calibration_pairs", TealSpec.calibration_pairs)))
        if costing.budget < 1:
            n_cal = min(n_cal, max(MIN_CALIBRATION_PAIRS, round(n_cal * costing.budget)))
        held = int(cfg.get("held_out_pairs", TealSpec.held_out_pairs))
        sh = costing.shape
        item = costing.forwards("teal", f"calibration: 3 x {n_cal} + {held} held-out pairs at {sh['width']}x{sh['height']}",
                                model, 3 * n_cal + held, sh["width"], sh["height"])
        return [item], model
