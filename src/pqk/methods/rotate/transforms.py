"""The pieces of `method: rotate`: orthonormal Hadamard-like matrices, the Kronecker transform
x ↦ (x / s)(A ⊗ B), fake quantization at any bit width, and the Linear that runs them.

Conventions: activations are row vectors (x Wᵀ + b, as nn.Linear). A transform T applied to a
Linear's input online is paired with the weight W' = W T⁻ᵀ, so that (x T) W'ᵀ = x Wᵀ: the
float output is unchanged and only the quantization grid sees the transformed values. For an
orthogonal T (Hadamard) T⁻ᵀ = T, so W' = W T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_BITS = 32  # a bit width of 32 means "not quantized"


# --- orthonormal matrices -------------------------------------------------------------------


def walsh_hadamard(n: int) -> torch.Tensor:
    """Sylvester's orthonormal Walsh–Hadamard matrix of order `n` (a power of 2), float64:
    entries ±1/√n, H Hᵀ = I. H_{2k} = [[H_k, H_k], [H_k, -H_k]] / √2."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Walsh–Hadamard matrix needs a power-of-2 order; got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded Haar-random orthogonal n×n matrix (QR of a Gaussian, signs fixed by R's
    diagonal so the draw is uniform), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def hadamard_like(n: int, seed: int = 0) -> torch.Tensor:
    """An orthonormal n×n matrix that spreads any one channel over (nearly) all of them.

    n = m·2^k with m odd: H_n itself when m = 1, else Q_m ⊗ H_{2^k} with Q_m a seeded random
    orthogonal m×m (DUSt3R widths: 768 = 3·256, 1024 = 2^10, 3072 = 3·1024, head_dim 64; the
    bundled teacher's 192 = 3·64, 48 = 3·16). A true Hadamard matrix of order 3 (or 12·...)
    would need a Paley construction; any orthogonal Q_m keeps the transform exact, and the
    power-of-2 factor does the spreading, so a random Q_m is enough."""
    if n < 1:
        raise ValueError(f"matrix order must be positive; got {n}")
    power = n & -n  # the largest power of 2 dividing n
    h = walsh_hadamard(power)
    odd = n // power
    return h if odd == 1 else torch.kron(random_orthogonal(odd, seed), h)


def kron_factors(n: int) -> tuple[int, int]:
    """(n1, n2) with n1·n2 = n and n1 the largest divisor <= √n: applying A ⊗ B costs
    n·(n1 + n2) per token instead of n² (1024 -> 32·32, 768 -> 24·32, 4096 -> 64·64)."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x (left ⊗ right) along the last dim, without forming the n×n product: with x's last dim
    read as an n1×n2 matrix X (row-major), x (A ⊗ B) is leftᵀ X right.

    Both products are written with the constant as the *first* MatMul operand (X B as
    (Bᵀ Xᵀ)ᵀ): pqk's INT8 quantizer (methods.quantize.keep) quantizes MatMuls whose second
    input is a weight, and an online rotation must stay float there (as QuaRot keeps its
    online Hadamard in high precision) or its input — the outlier-heavy activation the
    rotation exists to flatten — would be rounded before it is flattened."""
    n1, n2 = left.shape[0], right.shape[0]
    y = x.reshape(*x.shape[:-1], n1, n2)
    # transpose(-1, -2), not .mT: the legacy ONNX exporter has no aten::mT.
    if n1 > 1:
        y = torch.matmul(left.transpose(-1, -2), y)
    if n2 > 1:
        y = torch.matmul(right.transpose(-1, -2), y.transpose(-1, -2)).transpose(-1, -2)
    return y.reshape(x.shape)


# --- fake quantization ----------------------------------------------------------------------


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (row) fake quantization to signed `bits`, grid
    [-(2^(b-1)-1), 2^(b-1)-1]·scale with scale = max|w_row| / (2^(b-1)-1) (round to nearest,
    no clipping search: the RTN baseline both papers start from)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.clamp(round_ste(w / scale), -qmax, qmax) * scale


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-token fake quantization to unsigned `bits`, range [min, max] of each
    token widened to hold 0 (so 0 is exact, as in ONNX Runtime's uint8 grids), computed on
    the fly (dynamic). Per token rather than per tensor: it is the scheme QuaRot and
    FlatQuant evaluate and that low-bit kernels run (activations quantized per row at run
    time), and it isolates what a rotation fixes — outlier *channels*, which widen every
    token's range — from token-to-token spread, which no channel transform touches."""
    levels = 2 ** bits - 1
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / levels
    zero = torch.round(-low / scale).detach()
    q = torch.clamp(round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


# --- modules --------------------------------------------------------------------------------


class KroneckerTransform(nn.Module):
    """x ↦ (x ⊙ inv_scale)(left ⊗ right) along the last dim: the online half of a transform
    whose inverse is folded into the next Linear's weight (see `TransformedLinear.build`)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, inv_scale: torch.Tensor | None = None):
        super().__init__()
        # Own copies: each layer's matrices are its own state (learned ones differ per layer), and
        # tensors shared between modules would be saved once and not found again on restore.
        self.register_buffer("left", left.detach().float().clone())
        self.register_buffer("right", right.detach().float().clone())
        self.inv_scale: torch.Tensor | None
        self.register_buffer("inv_scale", None if inv_scale is None else inv_scale.detach().float().clone())

    @property
    def size(self) -> int:
        return self.left.shape[0] * self.right.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale is not None:
            x = x * self.inv_scale
        return kron_apply(x, self.left, self.right)

    def extra_repr(self) -> str:
        return f"{self.left.shape[0]}⊗{self.right.shape[0]}" + (", scaled" if self.inv_scale is not None else "")


class TransformedLinear(nn.Module):
    """A Linear whose input goes through an online `transform` (or none) and whose input and
    weight are fake-quantized at `bits_a` / `bits_w` (32: left float). The inner `linear`
    holds the already transformed weight W' and stays an nn.Linear, so the exported graph and
    pqk's INT8 path (which map MatMul nodes to Linear modules) see an ordinary Linear."""

    def __init__(self, linear: nn.Linear, transform: KroneckerTransform | None = None,
                 bits_w: int = FLOAT_BITS, bits_a: int = FLOAT_BITS):
        super().__init__()
        self.linear = linear
        self.transform = transform
        self.bits_w, self.bits_a = int(bits_w), int(bits_a)

    @classmethod
    @torch.no_grad()
    def build(cls, linear: nn.Linear, left: torch.Tensor, right: torch.Tensor,
              scale: torch.Tensor | None = None) -> "TransformedLinear":
        """Wrap `linear` with the online transform T = diag(1/scale)(left ⊗ right) and fold
        T⁻ᵀ into its weight: W' = (W ⊙ scale)(left⁻ᵀ ⊗ right⁻ᵀ). Computed in float64."""
        w = linear.weight.double()
        if scale is not None:
            w = w * scale.double()
        w = kron_apply(w, torch.linalg.inv(left.double()).mT, torch.linalg.inv(right.double()).mT)
        linear.weight.copy_(w.to(linear.weight.dtype))
        inv_scale = None if scale is None else 1.0 / scale
        return cls(linear, KroneckerTransform(left, right, inv_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        if self.bits_w >= FLOAT_BITS and self.bits_a >= FLOAT_BITS:
            return self.linear(x)  # the plain module call: the export names this node after `linear`
        if self.bits_a < FLOAT_BITS:
            x = quantize_activation(x, self.bits_a)
        w = self.linear.weight
        if self.bits_w < FLOAT_BITS:
            w = quantize_weight(w, self.bits_w)
        return F.linear(x, w, self.linear.bias)

    def extra_repr(self) -> str:
        return f"W{self.bits_w}A{self.bits_a}" if self.bits_w < FLOAT_BITS else "float"
