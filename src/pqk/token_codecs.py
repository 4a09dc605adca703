"""Compressed storage for a view's cached encoder tokens (scene-scale inference).

A scene of many views keeps every view's encoder tokens while its pairs run; at full size
(1024 channels, 768 tokens at 512x384) that is 3 MiB a view in float32. These codecs store
one view's tokens, shape (N tokens, C channels), in fewer bytes and give back float tokens
for the decoder. They are the feed-forward counterpart of seed 003's KV-cache compression
(KV-Compress, 1-bit KV cache): the cached tensors here are the decoder's cross-attention
memory, read by every pair the view is in.

- ``fp``: the tokens as computed (exact).
- ``int8``: symmetric INT8 with one scale per channel over the view's tokens. Per channel
  rather than per token because a ViT's LayerNorm output has a few channels of much larger
  magnitude (its affine weights); one scale per token would spend the 8 bits on them.
- ``1bit``: one bit per value: x ~ mu_c + a_c * sign(x - mu_c), with mu_c the channel's
  mean over the view's tokens and a_c its mean absolute deviation (the least-squares a for
  a fixed sign pattern), bits packed 8 to a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pqk.errors import InputError

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# byte -> its 8 bits as -1/+1 (bit k of the byte is channel 8m + k): decoding is one gather
_SIGNS = ((torch.arange(256, dtype=torch.uint8).unsqueeze(-1) & _BIT_WEIGHTS).ne(0).float() * 2 - 1)


@dataclass(frozen=True)
class Encoded:
    """One view's tokens as stored: the tensors a codec keeps and the float shape/dtype."""

    parts: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)


class FpCodec:
    name = "fp"

    def encode(self, x: torch.Tensor) -> Encoded:
        return Encoded((x,), tuple(x.shape), x.dtype)

    def decode(self, e: Encoded) -> torch.Tensor:
        return e.parts[0]


class Int8Codec:
    name = "int8"

    def encode(self, x: torch.Tensor) -> Encoded:
        scale = x.abs().amax(dim=0).float().clamp_min(1e-12) / 127.0  # (C,)
        q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
        return Encoded((q, scale), tuple(x.shape), x.dtype)

    def decode(self, e: Encoded) -> torch.Tensor:
        q, scale = e.parts
        return (q.float() * scale).to(e.dtype)


class OneBitCodec:
    name = "1bit"

    def encode(self, x: torch.Tensor) -> Encoded:
        xf = x.float()
        mu = xf.mean(dim=0)  # (C,)
        dev = xf - mu
        amp = dev.abs().mean(dim=0)
        bits = (dev > 0).to(torch.uint8)
        n, c = bits.shape
        pad = (-c) % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
        packed = (bits.reshape(n, -1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)
        return Encoded((packed, mu, amp), tuple(x.shape), x.dtype)

    def decode(self, e: Encoded) -> torch.Tensor:
        packed, mu, amp = e.parts
        n, c = e.shape
        sign = _SIGNS.to(packed.device)[packed.long()].reshape(n, -1)[:, :c]
        return (mu + amp * sign).to(e.dtype)


CODECS = {codec.name: codec for codec in (FpCodec(), Int8Codec(), OneBitCodec())}
CACHE_MODES = ("none", *CODECS)


def get_codec(name: str):
    if name not in CODECS:
        raise InputError(f"token cache {name!r} is not known; accepted: {', '.join(CACHE_MODES)}")
    return CODECS[name]
