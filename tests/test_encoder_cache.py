"""Scene inference with each view encoded once (pqk.inference.EncoderCache): the same outputs
as encoding both images of every pair, and every view encoded exactly once."""

from __future__ import annotations

import pytest
import torch

from pqk.data.pairs import make_pairs
from pqk.inference import EncoderCache, caches_encoder, inference


def _views() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 96), (64, 96), (96, 64), (64, 96)]  # one portrait view: tokens are grouped per shape
    return [{"img": torch.randn(1, 3, h, w, generator=gen), "true_shape": torch.tensor([[h, w]]), "idx": i,
             "instance": str(i)} for i, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_encoder_gives_the_uncached_outputs(tiny_model, batch_size):
    pairs = make_pairs(_views(), scene_graph="complete", symmetrize=True)
    plain = inference(pairs, tiny_model, batch_size=batch_size, cache_encoder=False)
    cached = inference(pairs, tiny_model, batch_size=batch_size, cache_encoder=True)
    assert len(plain) == len(cached) == 12
    for a, b in zip(plain, cached):
        assert (a["view1"]["idx"], a["view2"]["idx"]) == (b["view1"]["idx"], b["view2"]["idx"])
        for pred in ("pred1", "pred2"):
            assert a[pred].keys() == b[pred].keys()
            for key in a[pred]:
                # the same arithmetic; only the GEMM batch sizes differ (fp32 rounding, ~1e-7 per op)
                scale = a[pred][key].abs().max()
                assert (a[pred][key] - b[pred][key]).abs().max() <= 1e-5 * scale, (pred, key)


def test_every_view_is_encoded_once(tiny_model):
    views = _views()
    pairs = make_pairs(views, scene_graph="complete", symmetrize=True)
    cache = EncoderCache(tiny_model, "cpu")
    with torch.inference_mode():
        for view1, view2 in pairs:
            cache.stacked([view1])
            cache.stacked([view2])
    assert cache.encoded == len(views) and len(cache.tokens) == len(views)
    assert caches_encoder(tiny_model) and not caches_encoder(lambda v1, v2: None)
