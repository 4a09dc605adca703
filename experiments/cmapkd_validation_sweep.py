"""Choose CMAPKD's free hyper-parameters and the "best other baseline" of the three-seed
comparison on the validation split (generated validation scenes, VAL_SEED), never on the
workload. Every run is trained exactly as configs/plans/cmapkd.yaml trains it (the plan's
budget, seed 42); the figure is the final epoch's validation R mean.

    python experiments/cmapkd_validation_sweep.py [--budget 0.25] [--out runs/cmapkd_sweep]

Variants: λ_task (the seed's 0.1; 1.0, every baseline's task weight; 3.0) × Table 1's per-stage
LR ratios on/off; then every baseline, for the choice of the best one besides Scratch and KD.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from pqk.methods.base import StepContext
from pqk.methods.cmapkd.method import Cmapkd
from pqk.models.clip.family import load_family_model
from pqk.tasks import get_task

CONFIG = Path("configs/clip/cmapkd.yaml")
TEACHER = Path("src/pqk/assets/teacher_clip_lit.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("runs/cmapkd_sweep"))
    parser.add_argument("--only", default="", help="run only the variants whose label starts with this")
    args = parser.parse_args()
    teacher = load_family_model(TEACHER).eval()
    method = Cmapkd()
    variants = []
    for task_weight in (0.1, 1.0, 3.0):
        for stage_lr in (True, False):
            variants.append((f"CMAPKD task={task_weight} stage_lr={stage_lr}", "CMAPKD",
                             {"task": task_weight}, stage_lr))
    variants += [(run, run, None, True) for run in ("Scratch", "KD", "FitNet", "CLIP-KD", "PromptKD", "C2KD", "LLaVA-KD")]
    results = json.loads((args.out / "sweep.json").read_text()) if (args.out / "sweep.json").is_file() else {}
    for k, (label, run, weights, stage_lr) in enumerate(variants):
        if not label.startswith(args.only):
            continue
        spec = method.load_spec(CONFIG, {"run": run})
        inner = replace(spec.spec, stage_lr=stage_lr,
                        weights=replace(spec.spec.weights, **weights) if weights else spec.spec.weights)
        ctx = StepContext(teacher=teacher, workload=None, out_dir=args.out / label.replace(" ", "_").replace("=", ""), budget=args.budget,
                          log=lambda m: None, task=get_task("clip"))
        start = time.perf_counter()
        result = method.run(teacher, ctx, replace(spec, spec=inner))
        history = result.details["train"]
        results[label] = {"val_r_mean": history[-1]["val_r_mean"], "best_epoch_val": max(h["val_r_mean"] for h in history),
                          "wall_s": round(time.perf_counter() - start, 1)}
        print(f"{label:40s} val R mean {results[label]['val_r_mean']:.4f}  ({results[label]['wall_s']} s)", flush=True)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
