"""Cascade inference over a scene's pairs: a cheap draft model runs every pair and the full
model re-runs only the pairs the draft is unsure of (seed 003's speculative decoding, EAGLE-3
and QSpec, adapted: a feed-forward pair has no tokens to accept one by one, so a whole pair is
accepted or redone).

The draft's own confidence decides, since the full model's answer is what is being saved:
a pair's score is the geometric mean of DUSt3R's confidence over both views' pixels
(conf >= 1; exp of the mean log-confidence), and pairs scoring below the threshold are
verified. Threshold 1 verifies nothing (the draft alone); infinity verifies every pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pqk.inference import EncoderCache, inference


def pair_scores(conf1: torch.Tensor, conf2: torch.Tensor) -> torch.Tensor:
    """(B,) geometric mean of the confidence over both views' pixels of each batch item."""
    logs = torch.stack([c.clamp_min(1.0).log().flatten(1).mean(1) for c in (conf1, conf2)])
    return logs.mean(0).exp()


def pair_confidence(result: dict) -> float:
    """Geometric mean of the confidence of both views of one pair result (no batch dimension)."""
    return float(pair_scores(result["pred1"]["conf"][None], result["pred2"]["conf"][None])[0])


def pairs_to_verify(draft_results: list[dict], threshold: float, scores: list[float] | None = None) -> list[int]:
    """Indices of the draft results whose confidence is below `threshold`."""
    scores = scores if scores is not None else [pair_confidence(r) for r in draft_results]
    return [k for k, s in enumerate(scores) if s < threshold]


@dataclass
class CascadeRun:
    results: list[dict]
    verified: list[int]  # indices of the pairs the full model re-ran
    t_draft_s: float
    t_verify_s: float
    scores: list[float]


def verify(pairs: list, draft_results: list[dict], full: Callable, threshold: float, *, t_draft_s: float = 0.0,
           cache: str | EncoderCache = "fp", device: str = "cpu", batch_size: int = 1, reduce=None,
           on_batch: Callable[[int], None] | None = None, scores: list[float] | None = None) -> CascadeRun:
    """The full model on the pairs of `draft_results` scoring below `threshold`; merged results.
    `scores`: the draft results' `pair_confidence`, when the caller has them already."""
    if not threshold >= 1.0:  # also refuses NaN; infinity (verify every pair) passes
        from pqk.errors import InputError

        raise InputError(f"cascade threshold must be >= 1 (DUSt3R confidence starts at 1); got {threshold!r}")
    scores = scores if scores is not None else [pair_confidence(r) for r in draft_results]
    low = pairs_to_verify(draft_results, threshold, scores)
    start = time.perf_counter()
    redone = inference([pairs[k] for k in low], full, device=device, batch_size=batch_size, cache=cache,
                       reduce=reduce, on_batch=on_batch) if low else []
    t_verify = time.perf_counter() - start
    merged = list(draft_results)
    for k, result in zip(low, redone):
        merged[k] = result
    return CascadeRun(merged, low, t_draft_s, t_verify, scores)


def cascade_inference(pairs: list, draft: Callable, full: Callable, threshold: float, *, cache: str = "fp",
                      full_cache: str | EncoderCache | None = None, device: str = "cpu", batch_size: int = 1,
                      reduce=None, on_batch: Callable[[int], None] | None = None) -> CascadeRun:
    """Draft on every pair, then `verify`: the one call of the cascade. `cache` is the draft's
    (a codec name or an EncoderCache of the draft), `full_cache` the full model's (default:
    the same codec; never the draft's tokens)."""
    start = time.perf_counter()
    drafted = inference(pairs, draft, device=device, batch_size=batch_size, cache=cache, reduce=reduce, on_batch=on_batch)
    t_draft = time.perf_counter() - start
    if full_cache is None:
        full_cache = cache.codec.name if isinstance(cache, EncoderCache) else cache
    return verify(pairs, drafted, full, threshold, t_draft_s=t_draft, cache=full_cache, device=device,
                  batch_size=batch_size, reduce=reduce, on_batch=on_batch)


class LowResolutionDraft(torch.nn.Module):
    """The model itself as its own draft, on images downscaled by `factor` (area average, sides
    rounded down to the patch size); predictions are upsampled bilinearly to the input's pixels.
    Pointmaps are 3D points, so they need no rescaling, only resampling. On this CPU an INT8
    copy of the small embedded teacher is no faster than float32 (its time is in attention,
    which stays float), while half resolution is ~4x fewer tokens: see benchmarks/scene_scale.py."""

    def __init__(self, model: torch.nn.Module, factor: int = 2):
        super().__init__()
        self.model, self.factor = model, factor
        self.patch = int(getattr(model.config, "patch_size", 16)) if hasattr(model, "config") else 16

    def _small(self, h: int, w: int) -> tuple[int, int]:
        p = self.patch
        return max(p, h // self.factor // p * p), max(p, w // self.factor // p * p)

    def _shrink(self, img: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(img, size=self._small(*img.shape[-2:]), mode="area")

    def _small_shape(self, true_shape: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._small(int(h), int(w)) for h, w in true_shape.tolist()], dtype=true_shape.dtype,
                            device=true_shape.device)

    def _grow(self, res: dict, true_shape: torch.Tensor) -> dict:
        h, w = (int(v) for v in true_shape[0])
        out = {}
        for key, value in res.items():
            channels_last = value.dim() == 4
            x = value.permute(0, 3, 1, 2) if channels_last else value.unsqueeze(1)
            x = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
            out[key] = x.permute(0, 2, 3, 1) if channels_last else x.squeeze(1)
        return out

    def encode_image(self, img: torch.Tensor, true_shape: torch.Tensor):
        return self.model.encode_image(self._shrink(img), self._small_shape(true_shape))

    def forward_tokens(self, shapes: tuple, feats: tuple, poses: tuple):
        small = tuple(self._small_shape(s) for s in shapes)
        res1, res2 = self.model.forward_tokens(small, feats, poses)
        return self._grow(res1, shapes[0]), self._grow(res2, shapes[1])

    def forward(self, view1: dict, view2: dict):
        from pqk.models.dust3r.model import true_shape_of

        shapes = (true_shape_of(view1), true_shape_of(view2))
        small = [{"img": self._shrink(v["img"]), "true_shape": self._small_shape(s)} for v, s in zip((view1, view2), shapes)]
        res1, res2 = self.model(*small)
        return self._grow(res1, shapes[0]), self._grow(res2, shapes[1])
