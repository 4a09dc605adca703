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

The package, one job a module, layered bottom-up: `spec` (the spec and its validation),
`calibration` (the calibration pairs and their quality), `units` (prunable units and their
sizes), `graph` (Torch-Pruning's dependency graph and groups), `importance` (scores),
`sensitivity` (the masked single-unit trials), `table` (the sensitivity table on disk and its
plot), `allocation` (heads / channels per unit), `apply` (pruning and the clean rebuild) and
`step` (prune, fine-tune, save). Everything callers import from `pqk.methods.prune` is
re-exported here.
"""

from __future__ import annotations

# Besides __all__, the flat module's other public names (and the private ones tests read)
# stay importable from here: hence the noqa on the imports.
from pqk.methods.prune.allocation import (  # noqa: F401
    allocate,
    allocate_sensitivity,
    allocate_uniform,
)
from pqk.methods.prune.apply import (
    PruneOutcome,
    apply_pruning,
    block_widths_of,
    prune,
    prune_model,
    rebuild_clean,
)
from pqk.methods.prune.calibration import calibration_examples, calibration_quality
from pqk.methods.prune.graph import _traceable, dependency_graph, unit_group  # noqa: F401
from pqk.methods.prune.importance import importance_scores, least_important  # noqa: F401
from pqk.methods.prune.sensitivity import masked, relative_drop, sensitivity_analysis  # noqa: F401
from pqk.methods.prune.spec import (  # noqa: F401
    ALLOCATIONS,
    IMPORTANCES,
    PRUNE_CALIB_SEED_MIN,
    SENSITIVITY_METRICS,
    PruneCalibSpec,
    PruneSpec,
    check_choice,
    check_rho,
    load_prune_spec,
    rho_tag,
    train_spec,
)
from pqk.methods.prune.step import artifact_name, finetune, prune_step, task_loss  # noqa: F401
from pqk.methods.prune.table import (  # noqa: F401
    plot_available,
    plot_sensitivity,
    sensitivity_fingerprint,
    sensitivity_table,
    state_fingerprint,
)
from pqk.methods.prune.units import (  # noqa: F401
    Unit,
    _round_half_up,
    channel_indices,
    max_removable,
    prunable_units,
    total_prunable,
)

__all__ = [
    "ALLOCATIONS", "IMPORTANCES", "PruneCalibSpec", "PruneOutcome", "PruneSpec", "Unit", "allocate",
    "apply_pruning", "artifact_name", "block_widths_of", "calibration_examples", "calibration_quality",
    "dependency_graph", "importance_scores", "load_prune_spec", "masked", "plot_sensitivity", "prunable_units",
    "prune", "prune_model", "prune_step", "rebuild_clean", "rho_tag", "sensitivity_analysis", "sensitivity_table",
    "train_spec",
]
