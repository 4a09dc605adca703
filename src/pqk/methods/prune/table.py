"""The sensitivity table on disk: fingerprints of weights and settings (so a saved table is
reused only for the same model and spec), its heat map, and `sensitivity_table`, which reads
or measures and saves it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch.nn as nn

from pqk.methods.prune.importance import importance_scores
from pqk.methods.prune.sensitivity import sensitivity_analysis
from pqk.methods.prune.spec import PruneSpec
from pqk.methods.prune.units import prunable_units
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo


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
