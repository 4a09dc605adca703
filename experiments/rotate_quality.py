"""Quality probe for `method: rotate` on the bundled teacher: δ1 and AbsRel on held-out generated
pairs of the float model and of transform none / hadamard / flatquant at W8A8, W4A8, W4A4
(fake quantization, pqk.methods.rotate). Writes benchmarks/results/rotate_quality.json.

    python experiments/rotate_quality.py [--pairs 8] [--steps 40] [--threads 1]

Held-out pairs: seeds CALIBRATION_SEED_MIN + 800,000.. (neither the workload's 42..46 nor
rotate's own calibration scenes at + 700,000), at the workload's 512x384.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from pqk.assets import default_checkpoint
from pqk.data.scenes import generate_scene
from pqk.methods.quantize.spec import CALIBRATION_SEED_MIN
from pqk.methods.rotate.method import RotateSpec, calibration_pairs, rotate_model
from pqk.models.dust3r import load_checkpoint
from pqk.tasks.dust3r.measure import scene_view
from pqk.tasks.dust3r.metrics import aggregate_depth_metrics, depth_metrics

HELD_OUT_SEED = CALIBRATION_SEED_MIN + 800_000
BITS = ((8, 8), (4, 8), (4, 4))
TRANSFORMS = ("none", "hadamard", "flatquant")


def held_out_pairs(n: int, width: int, height: int) -> list:
    """(view1, view2, ground truth of view 1) from n two-view generated scenes."""
    out = []
    for k in range(n):
        scene = generate_scene(HELD_OUT_SEED + k, n_views=2, width=width, height=height)
        out.append((scene_view(scene, 0), scene_view(scene, 1), scene.views[0]))
    return out


def evaluate(model: torch.nn.Module, pairs: list, reference: list | None = None) -> tuple[dict, list]:
    """Pooled δ1 / AbsRel of view 1's depth, and (given the float model's pointmaps) the mean
    relative L2 distance of both views' pointmaps from them."""
    metrics, points = [], []
    for v1, v2, gt in pairs:
        with torch.inference_mode():
            res1, res2 = model(v1, v2)
        metrics.append(depth_metrics(res1["pts3d"][0, ..., 2].float().numpy(), gt.depth, gt.valid))
        points.append((res1["pts3d"], res2["pts3d_in_other_view"]))
    agg = aggregate_depth_metrics(metrics)
    row = {"delta1": agg["delta1"], "absrel": agg["absrel"]}
    if reference is not None:
        dist = [float((a - ra).norm() / ra.norm()) for p, r in zip(points, reference) for a, ra in zip(p, r)]
        row["pts3d_rel_l2"] = sum(dist) / len(dist)
    return row, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="held-out pairs")
    parser.add_argument("--calibration-pairs", type=int, default=RotateSpec.calibration_pairs)
    parser.add_argument("--steps", type=int, default=RotateSpec.flatquant_steps, help="flatquant Adam steps per layer")
    parser.add_argument("--tokens", type=int, default=RotateSpec.calibration_tokens, help="flatquant rows per layer")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 contended threads ran 3-12x slower)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rotate_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    path, _ = default_checkpoint()
    teacher = load_checkpoint(path).eval()
    pairs = held_out_pairs(args.pairs, args.width, args.height)
    calib = calibration_pairs(args.calibration_pairs, args.width, args.height)
    float_row, reference = evaluate(teacher, pairs)
    rows = [{"transform": "float", "bits": "W32A32", **float_row, "pts3d_rel_l2": 0.0}]
    print(f"float: δ1 {float_row['delta1']:.4f} AbsRel {float_row['absrel']:.4f}", flush=True)
    base = RotateSpec(calibration_pairs=args.calibration_pairs, calibration_tokens=args.tokens, flatquant_steps=args.steps)
    for bits_w, bits_a in BITS:
        for transform in TRANSFORMS:
            t0 = time.perf_counter()
            model = copy.deepcopy(teacher)
            spec = replace(base, transform=transform, bits_w=bits_w, bits_a=bits_a)
            details = rotate_model(model, spec, calib if transform == "flatquant" else calib[:1], log=lambda m: None)
            t_rotate = time.perf_counter() - t0
            row, _ = evaluate(model, pairs, reference)
            row = {"transform": transform, "bits": spec.bits_tag, **row, "rotate_s": round(t_rotate, 1)}
            if transform == "flatquant":
                fq = details["flatquant"]
                row.update({k: fq[k] for k in ("loss_plain_mean", "loss_before_mean", "loss_after_mean")})
            rows.append(row)
            print(f"{transform} {spec.bits_tag}: δ1 {row['delta1']:.4f} AbsRel {row['absrel']:.4f} "
                  f"pts3d rel {row['pts3d_rel_l2']:.4f} ({t_rotate:.0f} s)", flush=True)
    payload = {
        "what": "bundled teacher, fake-quantized block Linears (weights per-channel symmetric RTN, activations "
                "per-token asymmetric dynamic); δ1 / AbsRel of view 1's depth vs generated ground truth (median-aligned), "
                "pts3d_rel_l2: mean relative L2 distance of both views' pointmaps from the float model's",
        "checkpoint": str(path), "pairs": args.pairs, "held_out_seed": HELD_OUT_SEED,
        "calibration_pairs": args.calibration_pairs, "flatquant_steps": args.steps, "flatquant_tokens": args.tokens,
        "width": args.width, "height": args.height, "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
