"""FlatQuant-style learnable affine transforms: per Linear an invertible P = P1 ⊗ P2 and a
per-channel scale s, fitted with Adam so that Q_a((x/s) P) · Q_w(P⁻¹ diag(s) Wᵀ) ≈ x Wᵀ on
activations captured from calibration pairs (rounding passes gradients straight through).

Each layer is fitted alone, on the float model's activations (not on the activations of a
model whose earlier layers are already quantized): layers are independent, so capture is one
pass and the fit order does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pqk.methods.hooks import hooked
from pqk.methods.rotate.transforms import (
    FLOAT_BITS, hadamard_like, kron_apply, kron_factors, quantize_activation, quantize_weight,
)


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: Mapping[str, nn.Linear], pairs: Iterable[tuple[dict, dict]],
                   tokens: int, n_pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per layer name, up to `tokens` rows of that Linear's input over `pairs` (a random
    subset of each call's tokens, so memory stays tokens × width per layer at any resolution)."""
    gen = torch.Generator().manual_seed(seed)
    per_pair = max(1, math.ceil(tokens / max(1, n_pairs)))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def grab(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            keep = torch.randperm(rows.shape[0], generator=gen)[:per_pair]
            seen[name].append(rows[keep].float().clone())
        return grab

    with hooked((m, hook(n)) for n, m in layers.items()):
        for view1, view2 in pairs:
            model(view1, view2)
    return {name: torch.cat(rows)[:tokens] for name, rows in seen.items() if rows}


@dataclass
class AffineFit:
    left: torch.Tensor  # P1 (n1×n1)
    right: torch.Tensor  # P2 (n2×n2)
    scale: torch.Tensor  # s (n)
    loss_plain: float  # relative error of plain quantization (no transform) on the same tokens
    loss_before: float  # at the initial transform
    loss_after: float  # at the fitted transform (the best seen)
    init: str  # the start taken: identity or hadamard


def affine_objective(x: torch.Tensor, weight: torch.Tensor, ref: torch.Tensor, left: torch.Tensor,
                     right: torch.Tensor, log_scale: torch.Tensor, bits_w: int, bits_a: int) -> torch.Tensor:
    """||Q_a((x/s) P) Q_w(W diag(s) P⁻ᵀ)ᵀ − x Wᵀ||² / ||x Wᵀ||² for P = left ⊗ right, s = exp(log_scale)."""
    s = log_scale.exp()
    xt = kron_apply(x / s, left, right)
    wt = kron_apply(weight * s, torch.linalg.inv(left).mT, torch.linalg.inv(right).mT)
    if bits_a < FLOAT_BITS:
        xt = quantize_activation(xt, bits_a)
    if bits_w < FLOAT_BITS:
        wt = quantize_weight(wt, bits_w)
    return ((xt @ wt.T - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30)


def fit_affine(x: torch.Tensor, weight: torch.Tensor, bits_w: int, bits_a: int, *, init: str = "auto",
               steps: int = 40, lr: float = 5e-3) -> AffineFit:
    """Fit P1, P2 (Kronecker factors of the input width) and s for one Linear (weight out×n)
    on its input rows `x` (T×n). `init`: start from the identity, from the Hadamard-like
    rotation, or ("auto") from whichever of the two has the lower objective — a rotation
    helps only where there are outlier channels to spread; elsewhere it can hurt (it turns
    near-uniform weight rows Gaussian, widening their per-channel grid)."""
    n = weight.shape[1]
    n1, n2 = kron_factors(n)
    x, weight = x.float(), weight.detach().float()
    ref = x @ weight.T
    no_scale = torch.zeros(n)  # log s = 0
    starts = {"identity": (torch.eye(n1), torch.eye(n2)),
              "hadamard": (hadamard_like(n1).float(), hadamard_like(n2).float())}
    with torch.no_grad():
        scores = {k: float(affine_objective(x, weight, ref, a, b, no_scale, bits_w, bits_a)) for k, (a, b) in starts.items()}
    chosen = min(scores, key=scores.get) if init == "auto" else init
    left = nn.Parameter(starts[chosen][0].clone())
    right = nn.Parameter(starts[chosen][1].clone())
    log_scale = nn.Parameter(torch.zeros(n))
    params = [left, right, log_scale]

    def loss() -> torch.Tensor:
        return affine_objective(x, weight, ref, left, right, log_scale, bits_w, bits_a)

    opt = torch.optim.Adam(params, lr=lr)
    best, best_params, before = math.inf, [p.detach().clone() for p in params], None
    for step in range(steps + 1):  # the last pass only scores the final step
        value = loss()
        score = float(value.detach())
        if before is None:
            before = score
        if math.isfinite(score) and score < best:  # keep the best seen: Adam may overshoot
            best, best_params = score, [p.detach().clone() for p in params]
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return AffineFit(best_params[0], best_params[1], best_params[2].exp(), scores["identity"], before, best, chosen)
