"""Cascade as a plan step (`method: cascade`): the model it receives becomes the full model of a
draft-and-verify pair (pqk.cascade). Nothing is trained; the step picks the confidence
threshold on held-out generated pairs (seeds of the calibration range, never the workload's)
and returns a `CascadeModel` that `evaluate` measures like any model: per pair the draft runs
and the full model re-runs the pair when the draft is unsure; on a scene, each model encodes
each view once (pqk.recon.scene_run).

Saved as the full model's weights plus the threshold in the step's summary; restored by
wrapping the entering model again (the draft is the same weights at half resolution)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pqk.errors import ConfigError
from pqk.methods.base import Method, StepContext, StepResult, register, restore_common

DRAFTS = ("half",)


@dataclass(frozen=True)
class CascadeSpec:
    draft: str = "half"
    threshold: float | str = "auto"
    max_quality_drop: float = 0.01
    calibration_pairs: int = 24

    def __post_init__(self) -> None:
        if self.draft not in DRAFTS:
            raise ConfigError(f"cascade draft {self.draft!r} is not known; accepted: {', '.join(DRAFTS)}")
        t = self.threshold
        if t != "auto" and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 1):
            raise ConfigError(f"cascade threshold must be 'auto' or a number >= 1 (DUSt3R confidence starts at 1); got {t!r}")
        if isinstance(self.max_quality_drop, bool) or not isinstance(self.max_quality_drop, (int, float)) \
                or not 0 <= self.max_quality_drop < 1:
            raise ConfigError(f"cascade max_quality_drop must be a fraction in [0, 1); got {self.max_quality_drop!r}")
        n = self.calibration_pairs
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"cascade calibration_pairs must be an integer >= 2; got {n!r}")


class CascadeModel(torch.nn.Module):
    """(view1, view2) -> (res1, res2): the draft's answer, or the full model's for the batch items
    whose draft confidence is below `threshold`. `draft` and `full` stay reachable so that scene
    inference can cache each one's encoder tokens."""

    def __init__(self, full: torch.nn.Module, draft: torch.nn.Module, threshold: float):
        super().__init__()
        self.full, self.draft, self.threshold = full, draft, float(threshold)

    def forward(self, view1: dict, view2: dict):
        from pqk.cascade import pair_scores

        res1, res2 = self.draft(view1, view2)
        low = (pair_scores(res1["conf"], res2["conf"]) < self.threshold).nonzero().flatten()
        if len(low) == 0:
            return res1, res2
        full1, full2 = self.full(_rows(view1, low), _rows(view2, low))
        for res, full in ((res1, full1), (res2, full2)):
            for key in res:
                res[key] = res[key].clone()
                res[key][low] = full[key].to(res[key].dtype)
        return res1, res2


def _rows(view: dict, rows: torch.Tensor) -> dict:
    """The batch items `rows` of a view dict (its per-item tensors; the rest as is)."""
    batch = view["img"].shape[:1]
    return {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == batch else v for k, v in view.items()}


def make_draft(model: torch.nn.Module, draft: str) -> torch.nn.Module:
    from pqk.cascade import LowResolutionDraft

    if draft == "half":
        return LowResolutionDraft(model, 2)
    raise ConfigError(f"cascade draft {draft!r} is not known; accepted: {', '.join(DRAFTS)}")


def choose_threshold(full: torch.nn.Module, draft: torch.nn.Module, pairs: list, max_drop: float) -> dict:
    """The smallest threshold whose merged pairs keep pooled δ1 within `max_drop` of the full
    model's on `pairs` ((view1, view2, gt_view) with ground truth)."""
    from pqk.cascade import pair_confidence
    from pqk.tasks.dust3r.metrics import aggregate_depth_metrics, depth_metrics

    def depth_of(model):
        out = []
        for v1, v2, gt in pairs:
            with torch.inference_mode():
                res1, res2 = model(v1, v2)
            result = {"pred1": {"conf": res1["conf"][0]}, "pred2": {"conf": res2["conf"][0]}}
            out.append((depth_metrics(res1["pts3d"][0, ..., 2].float().numpy(), gt.depth, gt.valid), pair_confidence(result)))
        return out

    fulls, drafts = depth_of(full), depth_of(draft)
    scores = [s for _, s in drafts]
    order = np.argsort(scores, kind="stable")
    full_d1 = aggregate_depth_metrics([m for m, _ in fulls])["delta1"]
    for k in range(len(pairs) + 1):
        redo = set(order[:k].tolist())
        merged = [fulls[i][0] if i in redo else drafts[i][0] for i in range(len(pairs))]
        d1 = aggregate_depth_metrics(merged)["delta1"]
        if d1 >= (1 - max_drop) * full_d1:
            if k == 0:
                threshold = 1.0
            elif k == len(pairs):
                threshold = math.inf
            else:
                threshold = (scores[order[k - 1]] + scores[order[k]]) / 2
            return {"threshold": threshold, "calibration_verify_fraction": k / len(pairs),
                    "calibration_delta1_full": full_d1, "calibration_delta1_cascade": d1}
    raise AssertionError("verifying every pair reproduces the full model")


def calibration_scene_pairs(n_pairs: int, width: int, height: int) -> list:
    """Neighbouring views of generated scenes from the calibration seed range, with ground truth."""
    from pqk.data.scenes import generate_scene
    from pqk.methods.quantize.spec import CALIBRATION_SEED_MIN
    from pqk.tasks.dust3r.measure import scene_view

    pairs, seed = [], CALIBRATION_SEED_MIN + 500_000  # apart from quantization's own calibration scenes
    while len(pairs) < n_pairs:
        scene = generate_scene(seed, n_views=4, width=width, height=height)
        for i, j in ((0, 1), (1, 2), (2, 3), (3, 0)):
            if len(pairs) < n_pairs:
                pairs.append((scene_view(scene, i), scene_view(scene, j), scene.views[i]))
        seed += 1
    return pairs


@register
class Cascade(Method):
    name = "cascade"
    letter = "C"
    options = frozenset({"threshold", "draft"})
    default_config = "configs/cascade.yaml"

    def load_spec(self, config: Path, options: Mapping[str, Any]) -> CascadeSpec:
        from pqk.yaml_io import read_yaml, reject_unknown_keys

        data = read_yaml(Path(config), "cascade config", invalid=ConfigError) or {}
        reject_unknown_keys(f"cascade config {config}", data, set(CascadeSpec.__dataclass_fields__))
        data = {**data, **{k: options[k] for k in ("threshold", "draft") if k in options}}
        return CascadeSpec(**data)

    def run(self, model: torch.nn.Module, ctx: StepContext, spec: CascadeSpec) -> StepResult:
        import time

        start = time.perf_counter()
        full = model.to(ctx.device).eval()
        draft = make_draft(full, spec.draft)
        height, width = ctx.family.input_shape(ctx.workload)
        if spec.threshold == "auto":
            ctx.log(f"cascade: choosing the threshold on {spec.calibration_pairs} held-out pairs")
            chosen = choose_threshold(full, draft, calibration_scene_pairs(spec.calibration_pairs, width, height),
                                      spec.max_quality_drop)
        else:
            chosen = {"threshold": float(spec.threshold)}
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        artifact = ctx.family.save_model(full, ctx.out_dir / "full_model.safetensors")
        details = {"draft": spec.draft, **chosen}
        ctx.log(f"cascade: threshold {chosen['threshold']:.4g}")
        return StepResult(model=CascadeModel(full, draft, chosen["threshold"]), artifact=Path(artifact),
                          device_hours=(time.perf_counter() - start) / 3600, details=details,
                          runtime=f"torch eager fp32 cascade ({spec.draft} draft, threshold {chosen['threshold']:.4g})",
                          notes=[f"cascade threshold {chosen['threshold']:.4g}"])

    def restore(self, done, entering, task) -> StepResult:
        full = task.load_model(done["artifact"]).eval()
        details = done["details"]
        common = restore_common(done)
        return StepResult(model=CascadeModel(full, make_draft(full, details["draft"]), details["threshold"]), **common)

    def keyparams(self, options: Mapping[str, Any], result: StepResult | None) -> str:
        threshold = (result.details.get("threshold") if result is not None else None) or options.get("threshold", "auto")
        return f"{options.get('draft', 'half')}_t{threshold if isinstance(threshold, str) else format(threshold, '.3g')}"

    def stage(self, alone: bool) -> str:
        return "P2"  # training-free, judged like Q: quality within 1 %, p50 down by half

    def reference(self, alone: bool) -> str:
        return "input"
