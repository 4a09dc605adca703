"""Learning-rate schedule shared by pqk's trainers."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, lr: float, lr_min: float = 0.0) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `lr_min` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
