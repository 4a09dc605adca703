"""How much worse a quality figure got, in the one convention every gate and method decision
uses: relative to the reference, positive when worse."""

from __future__ import annotations

import math


def relative_drop(new: float, ref: float, higher_is_better: bool) -> float:
    """Relative drop of a figure (positive = worse than the reference): for a higher-is-better
    metric ``(ref - new) / |ref|``, for a lower-is-better one ``(new - ref) / |ref|``."""
    if ref == 0:
        return 0.0 if new == ref else math.inf
    return (ref - new) / abs(ref) if higher_is_better else (new - ref) / abs(ref)


def quality_drop(new: float, ref: float, metric: str, task=None) -> float:
    """Relative drop of `metric` (positive = worse than the reference), in the direction the
    family's adapter (`task`, default DUSt3R) gives it."""
    from pqk.tasks import get_task

    return relative_drop(new, ref, (task or get_task()).direction(metric))
