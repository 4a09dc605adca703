"""An exponential moving average of a model's weights, the weights a run validates and keeps.

On the short schedules of the embedded default (240 steps at budget 0.1) a student's validation
figures swing by several points of δ1 from one epoch to the next while its training loss falls
smoothly: the last optimizer steps move the weights more than they improve them. Averaging the
weights over the last ~1/(1 - decay) steps takes most of that swing out (Polyak averaging; the
"EMA teacher/student" of DINO, Mean Teacher and most distillation recipes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


class WeightAverage:
    """EMA of `model`'s floating-point state (parameters and buffers). The decay ramps up as
    (1 + n) / (10 + n) over the first updates, so the average is not dominated by the
    starting weights (a student's inherited, not yet trained ones)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r} is not in (0, 1)")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                avg.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.updates = int(saved["updates"])
        for k, v in saved["state"].items():
            self.state[k].copy_(v)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` with the averaged weights for the duration (validation), its own after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(live)
