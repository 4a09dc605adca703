"""The frozen teacher's outputs on a training set, computed once and shared by every run that
trains against that teacher on that set.

A plan such as configs/plans/cmapkd.yaml trains twenty-odd students against one teacher on one
generated set; recomputing the teacher's embeddings (and, for CMAPKD and FitNet, its tapped
blocks) in every run cost more than the runs' own training. The teacher is frozen and the
training images are not augmented, so its outputs are a function of the set alone: they are
computed here in fixed chunks of the set's order (so a resumed run and an uninterrupted one,
or the first run of a plan and the tenth, get bit-identical targets) and kept, per teacher
object, for as long as that teacher lives (the plan runner holds one for the whole plan).

A target set larger than `limit_bytes` is not kept: the caller computes it per batch instead
(a user's COCO-scale set with a CLIP-L/14 teacher would not fit in memory).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any

import torch

LIMIT_BYTES = 3 * 2**30  # everything kept for one teacher, all kinds together

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_key(images: Any, captions: list[str]) -> str:
    """A digest of a training set's content (images and caption texts, in order)."""
    digest = hashlib.sha1()
    array = images.detach().cpu().contiguous().numpy() if isinstance(images, torch.Tensor) else images
    digest.update(array.tobytes())
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\0")
    return digest.hexdigest()


def nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


def kept(teacher: torch.nn.Module, kind: str, key: str, compute: Callable[[], Any],
         log: Callable[[str], None] = print, limit_bytes: int = LIMIT_BYTES) -> Any:
    """`compute()`'s result for (teacher, kind, key): computed on the first call and kept while it
    fits within `limit_bytes` (with what is already kept for this teacher)."""
    store = _KEPT.setdefault(teacher, {})
    if (kind, key) in store:
        log(f"teacher targets ({kind}): reused")
        return store[(kind, key)]
    value = compute()
    if sum(nbytes(v) for v in store.values()) + nbytes(value) <= limit_bytes:
        store[(kind, key)] = value
    return value


def fits(size_bytes: int, limit_bytes: int = LIMIT_BYTES) -> bool:
    """Whether a target set of `size_bytes` should be precomputed (else: computed per batch)."""
    return size_bytes <= limit_bytes


def in_chunks(n: int, fn: Callable[[slice], Any], size: int = 128) -> list[Any]:
    """fn over consecutive slices of range(n) of `size` items: the fixed chunking that makes
    precomputed targets the same in every run."""
    return [fn(slice(k, min(n, k + size))) for k in range(0, n, size)]
