"""Forward hooks for the methods that watch a model's layers on calibration pairs (TEAL's
thresholds, FlatQuant's captured inputs, joint PQK's activation ranges)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Register each (module, hook) as a forward hook (`pre`: a forward pre-hook) for the block's
    duration; removed however the block ends."""
    handles = [m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h) for m, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
