"""One point of issue 18's K-recipe table: distil the bundled teacher's 0.3 student (K-1's loss,
configs/distill.yaml's training with overrides) at a budget, then δ1 / AbsRel on the frozen
workload's pairs and the motorcycle pair (torch eager, the evaluation code's pair metrics), and
the best epoch's validation figures. Appends one JSON line to --out.

    python experiments/k_recipe.py NAME '{"train": {"resolution_schedule": [[0.25, 512, 384, 2]]}}'
    python experiments/k_recipe.py kl_raw '{"kl_standardize": false}'
    python experiments/k_recipe.py g01 '{"gamma": 0.1}' --budget 0.1

Overrides: `train` (TrainSpec fields, over configs/distill.yaml's), `gamma`, `kl_standardize`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pqk.methods.distill.spec import DistillSpec
from pqk.methods.distill.step import distill
from pqk.methods.distill.student import derive_student
from pqk.models.dust3r.checkpoint import load_checkpoint
from pqk.tasks.dust3r.measure import TorchRunner, _pair_quality
from pqk.tasks.dust3r.workload import load_scenes, load_workload
from pqk.yaml_io import read_yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--work", type=Path, default=Path("runs/k_recipe"))
    parser.add_argument("--out", type=Path, default=Path("runs/k_recipe/results.jsonl"))
    args = parser.parse_args()
    over = json.loads(args.overrides)
    cfg = read_yaml(Path("configs/distill.yaml"), "distill config")
    train = {**cfg["train"], **over.get("train", {})}
    spec = DistillSpec(T=3, beta=0.5, gamma=over.get("gamma", 0.0), ratio=0.3, train=train,
                       kl_standardize=over.get("kl_standardize", True)).scaled(args.budget)
    teacher = load_checkpoint("src/pqk/assets/teacher_dust3r.safetensors").eval()
    student = derive_student(teacher, 0.3)
    torch.manual_seed(42)  # as the plan runner's distill step
    start = time.time()
    res = distill(student, teacher, spec, args.work / args.name, show_progress=False, resume=False)
    train_s = time.time() - start
    workload = load_workload(Path("configs/workload.yaml"))
    scenes = load_scenes(workload)
    runner = TorchRunner(res.model.eval(), "cpu")
    quality, _ = _pair_quality(runner, scenes, workload.pairs, [])
    moto, _ = _pair_quality(runner, scenes, workload.real_pairs, [])
    out = {"name": args.name, "overrides": over, "budget": args.budget, "train_s": round(train_s),
           "delta1": quality["delta1"], "absrel": quality["absrel"], "moto_delta1": moto["delta1"],
           "best_epoch": res.best_epoch, "best_val": res.best_val,
           "history": [(h["epoch"], round(h["val_delta1"], 4), round(h["val_absrel"], 4)) for h in res.history]}
    print(json.dumps(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
