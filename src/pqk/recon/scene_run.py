"""One scene, end to end: every pair of its graph through the network (each view encoded once,
its tokens cached as `cache` says; optionally a draft model with full-model verification),
then global alignment; with the time of each part and what the cache held.

`pqk infer`, evaluate's scene-level figures and benchmarks/scene_scale.py all go through
`reconstruct`, so the figures they report are measured the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pqk.data.pairs import make_pair_indices
from pqk.inference import EncoderCache, caches_encoder, inference
from pqk.recon.global_alignment import AlignmentResult, global_alignment


@dataclass
class GaSettings:
    niter: int = 300
    lr: float = 0.01
    schedule: str = "cosine"
    seed: int = 42


@dataclass
class SceneRun:
    n_views: int
    pairs: list[tuple[int, int]]
    results: list[dict]
    t_infer_s: float
    t_ga_s: float | None = None
    aligned: AlignmentResult | None = None
    encoded_views: int | None = None  # encoder calls (one per view per model with a cache; 2 per pair without)
    cache_bytes: int | None = None
    verified_pairs: list[int] | None = None  # cascade only: pairs the full model re-ran
    t_draft_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def t_scene_s(self) -> float:
        return self.t_infer_s + (self.t_ga_s or 0.0)

    def summary(self) -> dict:
        """The figures, JSON-ready (no tensors)."""
        return {
            "n_views": self.n_views, "n_pairs": len(self.pairs), "t_infer_s": self.t_infer_s, "t_ga_s": self.t_ga_s,
            "t_scene_s": self.t_scene_s, "encoded_views": self.encoded_views,
            "cache_MB": None if self.cache_bytes is None else self.cache_bytes / 2**20,
            "verified_pairs": None if self.verified_pairs is None else len(self.verified_pairs),
            "t_draft_s": self.t_draft_s, "ga_final_loss": None if self.aligned is None else self.aligned.final_loss,
            **self.extra,
        }


def _cache_for(model, cache: str, device: str) -> EncoderCache | str:
    return EncoderCache(model, device, cache) if cache != "none" and caches_encoder(model) else "none"


def infer_scene(views: list[dict], model: Callable, scene_graph: str = "complete", *, symmetrize: bool = True,
                cache: str = "fp", draft: Callable | None = None, threshold: float | None = None, stride: int = 1,
                device: str = "cpu", batch_size: int = 1, on_batch: Callable[[int], None] | None = None) -> SceneRun:
    """The network part: all pairs of `scene_graph` over `views` (dicts with img, true_shape and
    an int idx). With `draft` and `threshold`, a cascade (pqk.cascade). `stride` subsamples
    every kept prediction (global alignment's resolution)."""
    from pqk.cascade import cascade_inference
    from pqk.token_codecs import get_codec

    if cache != "none":
        get_codec(cache)
    from pqk.methods.cascade import CascadeModel

    if draft is None and isinstance(model, CascadeModel):  # a cascade step's model: each part keeps its cache
        model, draft, threshold = model.full, model.draft, model.threshold
    indices = make_pair_indices(len(views), scene_graph, symmetrize=symmetrize)
    pairs = [(views[i], views[j]) for i, j in indices]
    reduce = (lambda t: t[::stride, ::stride]) if stride > 1 else None
    full_cache = _cache_for(model, cache, device)
    start = time.perf_counter()
    if draft is None:
        results = inference(pairs, model, device=device, batch_size=batch_size, cache=full_cache, reduce=reduce,
                            on_batch=on_batch)
        verified, t_draft, caches = None, None, [full_cache]
    else:
        draft_cache = _cache_for(draft, cache, device)
        run = cascade_inference(pairs, draft, model, threshold, cache=draft_cache, full_cache=full_cache,
                                device=device, batch_size=batch_size, reduce=reduce, on_batch=on_batch)
        results, verified, t_draft, caches = run.results, run.verified, run.t_draft_s, [draft_cache, full_cache]
    t_infer = time.perf_counter() - start
    held = [c for c in caches if isinstance(c, EncoderCache)]
    return SceneRun(
        n_views=len(views), pairs=indices, results=results, t_infer_s=t_infer,
        encoded_views=sum(c.encoded for c in held) if held else 2 * (len(pairs) + len(verified or ())),
        cache_bytes=sum(c.nbytes for c in held) if held else None, verified_pairs=verified, t_draft_s=t_draft,
    )


def align_scene(run: SceneRun, ga: GaSettings, device: str = "cpu") -> SceneRun:
    """Global alignment of `run`'s pairs (timed into run.t_ga_s)."""
    start = time.perf_counter()
    run.aligned = global_alignment(run.results, n_images=run.n_views, niter=ga.niter, lr=ga.lr, schedule=ga.schedule,
                                   seed=ga.seed, device=device)
    run.t_ga_s = time.perf_counter() - start
    return run


def predictions_finite(results: list[dict]) -> bool:
    return all(bool(torch.isfinite(r[v][k]).all()) for r in results for v in ("pred1", "pred2") for k in r[v])
