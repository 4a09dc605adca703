"""The distillation grid's command-line pieces: which runs `--runs` names, and K-4, the best run
by the family's main metric as measured on the frozen workload (the protocol's re-measurement
of the candidates, not a decision steering any training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from pqk.errors import InputError
from pqk.io.files import write_json


def parse_runs(text: str | None, grid) -> list[str]:
    """--runs "K-1,control" -> names in the given order; None -> every run, then selections."""
    accepted = list(grid.runs) + list(grid.select)
    if text is None:
        return accepted
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError(f"--runs is empty; accepted: {', '.join(accepted)}")
    for n in names:
        if n not in accepted:
            raise InputError(f"--runs names {n!r}, which is not in the config; accepted: {', '.join(accepted)}")
    return names


def select_best(grid, name: str, out_dir: Path, log: Callable[[str], None], task=None) -> str | None:
    """K-4: among the selection's runs that have a record in `out_dir`, the best by the family's
    main metric; its student is saved as `student_fp32_best.safetensors`."""
    from pqk.methods.distill import BEST_STUDENT_FILE, STUDENT_FILE
    from pqk.tasks import get_task

    task = task or get_task()
    metric = task.main_metric
    candidates = {}
    for run in grid.select[name]:
        exp = grid.exp_id(run)
        path = out_dir / f"{exp}_eval.json"
        if path.is_file():
            value = json.loads(path.read_text())["record"].get(metric)
            if value not in (None, "") and math.isfinite(float(value)):
                candidates[run] = {"exp_id": exp, metric: float(value)}
    if not candidates:
        log(f"{name}: none of {', '.join(grid.select[name])} has a finite {metric} in {out_dir} yet; nothing selected")
        return None
    sign = 1.0 if task.direction(metric) else -1.0
    best = max(candidates, key=lambda r: sign * candidates[r][metric])
    exp = candidates[best]["exp_id"]
    model = task.load_model(out_dir / exp / STUDENT_FILE)
    history = list(model.pqk_history) + [{"step": "select", "name": name, "metric": metric, "chosen": exp,
                                          "candidates": candidates}]
    task.save_model(model, out_dir / BEST_STUDENT_FILE, history=history)
    write_json(out_dir / f"{name}_select.json", {"selection": name, "metric": metric, "chosen": best, "exp_id": exp,
                                                 "candidates": candidates, "model": BEST_STUDENT_FILE})
    log(f"{name}: best of {', '.join(candidates)} by {metric} is {best} ({exp}) -> {out_dir / BEST_STUDENT_FILE}")
    return best
