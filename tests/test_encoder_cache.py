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
    plain = inference(pairs, tiny_model, batch_size=batch_size, cache="none")
    cached = inference(pairs, tiny_model, batch_size=batch_size, cache="fp")
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


def test_codecs_store_fewer_bytes_within_their_error_bound():
    from pqk.token_codecs import CODECS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 20, generator=gen) * torch.linspace(0.1, 8.0, 20)  # channels of unequal range
    sizes = {}
    for name, codec in CODECS.items():
        e = codec.encode(x)
        y = codec.decode(e)
        assert y.shape == x.shape and y.dtype == x.dtype
        sizes[name] = e.nbytes
        if name == "fp":
            assert torch.equal(y, x)
        elif name == "int8":  # rounding: at most half a step of the channel's scale
            step = x.abs().amax(dim=0) / 127
            assert ((y - x).abs() <= step / 2 + 1e-6).all()
        else:  # sign pattern kept, and the least-squares amplitude beats the mean alone
            mu = x.mean(dim=0)
            assert torch.equal((y > mu), (x > mu))
            assert (y - x).pow(2).sum() < (x - mu).pow(2).sum()
    assert sizes["fp"] == 96 * 20 * 4 and sizes["int8"] == 96 * 20 + 20 * 4
    assert sizes["1bit"] == 96 * 3 + 2 * 20 * 4  # 20 bits of a token padded to 3 bytes


def test_compressed_cache_runs_every_pair_and_reports_its_bytes(tiny_model):
    pairs = make_pairs(_views(), scene_graph="complete", symmetrize=True)
    fp_cache, int8_cache = EncoderCache(tiny_model, "cpu", "fp"), EncoderCache(tiny_model, "cpu", "int8")
    exact = inference(pairs, tiny_model, cache=fp_cache)
    approx = inference(pairs, tiny_model, cache=int8_cache)
    assert int8_cache.encoded == fp_cache.encoded == 4
    assert 0 < int8_cache.nbytes < fp_cache.nbytes / 3  # 1 byte a value + one scale a channel, vs 4 bytes
    for a, b in zip(exact, approx):
        rel = (a["pred1"]["pts3d"] - b["pred1"]["pts3d"]).norm() / a["pred1"]["pts3d"].norm()
        assert 0 < rel < 0.1


def test_unknown_cache_is_an_input_error(tiny_model):
    from pqk.errors import InputError

    pairs = make_pairs(_views()[:2], scene_graph="complete", symmetrize=True)
    with pytest.raises(InputError, match="accepted: none, fp, int8, 1bit"):
        inference(pairs, tiny_model, cache="2bit")
