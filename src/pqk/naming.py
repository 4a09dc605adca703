"""The protocol's record names (protocol.md, "Record fields": exp_id)."""

from __future__ import annotations


def exp_id(stage: str, combo: str, keyparams: str = "", run: int = 1) -> str:
    """`{stage}_{combo}_{keyparams}_{run}`, e.g. K_T3B05_sched_run1; empty parts are dropped."""
    parts = [p for p in (stage, combo, keyparams) if p]
    return "_".join(parts + [f"run{run}"])
