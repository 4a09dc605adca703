"""The pruning calibration pairs: held-out generated scenes (`calibration_examples`) and the
quality of a model on them (`calibration_quality`), which importance and sensitivity use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from pqk.methods.prune.spec import PruneCalibSpec


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
