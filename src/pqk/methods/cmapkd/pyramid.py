"""UCMP, the unified cross-modal pyramid of CMAPKD (seed 004, §4.2 and technical plans 1-2).

Both towers are tapped at four blocks (d//4, d//2, 3d//4, d; `CLIP.tap_layers`), and each set of
taps becomes four levels of a common width `channels` (the paper's 256; a CPU run uses less:
the 3×3 convolutions on the 4g×4g map dominate the cost, ~(4g)²·9·channels² MACs per image).

Decisions (the seed's sketch code contradicts its text in places; the text wins):

* **Visual levels.** A ViT is isotropic: every tap is the same g×g patch grid, so the four
  resolutions are *made*, not found. The text (P5 7×7 … P2 56×56 for ViT-B/16 at 224, and
  "P_5 = AvgPool(layer_12)") fixes s = (4g, 2g, g, max(1, g//2)) with the deepest, most semantic
  tap the coarsest, as in FPN. P5 is the deepest tap average-pooled to g//2 (adaptive pooling, so
  an odd g such as ViT-B/32's 7 and g = 1 work); P4 is tap 3 at g; P3 and P2 are taps 2 and 1
  nearest-upsampled ×2 and ×4. The sketch instead keeps P5 at 14×14 and labels P4 14×14 after
  a ×2 upsample — internally inconsistent, so not followed. P2/P3 hold no more spatial
  information than the g×g grid (nearest upsampling commutes with the 1×1 laterals and the sums);
  only their 3×3 smoothing convs can give them sub-patch structure. The alternative (ViTDet's
  "simple feature pyramid": deconvolutions of the last block only) is not the seed's design.
* **Top-down pathway** as the seed sketch: each level's *smoothed* output is upsampled into the
  next finer level (torchvision's FPN chains the unsmoothed sums instead; either is "FPN-style";
  chaining the smoothed maps is what the seed writes and gives the fine levels a deeper
  receptive field). P5 also gets a 3×3 smoothing conv, so every level has one.
* **Language levels.** The sketch mean-pools every level to (N, 256) — which would make L1/L2
  "token"/"phrase" levels in name only — and uses [CLS] for L4, which CLIP's causal text tower
  does not have. Following the text: L1 = projected tokens of tap 1 and L2 = projected tokens of
  tap 2 mixed by a single-head *local window* attention ("phrase level, window size 3": each
  token attends to itself and its ±window//2 neighbours among the real tokens) stay token-level,
  (N, L, channels); L3 = attention pooling of tap 3 with one learned query (initialised to zero,
  i.e. starting as the masked mean — LiT's own pooling); L4 = projection of the tower's own pooled
  state (CLIP: EOT token; LiT: masked mean), passed in by the caller. Padding never matters: taps
  are zeroed at padding on entry, attention only reaches real tokens, and L1/L2 are zero there.
* **Alignment bridge** (§4.2.3): V_aligned[i] = f_v2l(GAP(P_i)), L_aligned[i] = f_l2v(pool(L_i));
  both pyramids have width `channels`, so C = D and both maps are Linear(channels, channels).
  L_i is pooled by a masked mean for the token levels L1/L2 and used as is for L3/L4.
* **Teacher pyramid.** The teacher gets its own UCMP that is NOT trained: it stays at a fixed
  seeded initialisation. A random linear-ish projection preserves the geometry of the teacher's
  features (distances, up to a near-isometry), which is what the student should match; a trained
  teacher pyramid could co-adapt with the student's into a trivial match (e.g. both collapsing to
  a constant, zeroing L_intra). The caller builds it under `torch.manual_seed(seed)` and freezes
  it; construction here is deterministic given the RNG state, so two builds are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _check_four(name: str, widths: Sequence[int]) -> list[int]:
    widths = [int(w) for w in widths]
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"{name} needs 4 positive widths (one per tapped block), got {widths}")
    return widths


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """(N, L, C), (N, L) bool -> (N, C) mean over real tokens (zero for an all-padding row)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class VisualPyramid(nn.Module):
    """Four ViT taps -> [P2, P3, P4, P5] maps (N, channels, s, s), s = (4g, 2g, g, max(1, g//2))."""

    def __init__(self, in_widths: Sequence[int], channels: int = 256):
        super().__init__()
        widths = _check_four("VisualPyramid", in_widths)
        self.channels = int(channels)
        # index k = tap k+1 = level P(k+2): lateral[0] feeds P2, lateral[3] feeds P5
        self.lateral = nn.ModuleList(nn.Conv2d(w, self.channels, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(self.channels, self.channels, 3, padding=1) for _ in range(4))

    @staticmethod
    def sizes(grid: int) -> tuple[int, int, int, int]:
        """Side lengths of P2..P5 for a g×g patch grid."""
        return (4 * grid, 2 * grid, grid, max(1, grid // 2))

    def _to_map(self, tap: Tensor, grid: int) -> Tensor:
        n, t, c = tap.shape
        if t != 1 + grid * grid:
            raise ValueError(f"a visual tap has {t} tokens; a {grid}x{grid} grid needs 1 + {grid * grid}")
        # drop the class token; patches are row-major, so a plain reshape restores the grid
        return tap[:, 1:].transpose(1, 2).reshape(n, c, grid, grid)

    def forward(self, taps: Sequence[Tensor], grid: int) -> list[Tensor]:
        """taps: 4 tensors (N, 1 + grid*grid, C_k), class token first. Returns [P2, P3, P4, P5]."""
        if len(taps) != 4:
            raise ValueError(f"VisualPyramid takes 4 taps, got {len(taps)}")
        maps = [self._to_map(t, grid) for t in taps]
        sizes = self.sizes(grid)
        # P5: pool before the 1x1 lateral (they commute; pooling first is cheaper)
        top = self.smooth[3](self.lateral[3](F.adaptive_avg_pool2d(maps[3], sizes[3])))
        levels = [top]
        for k in (2, 1, 0):  # P4, P3, P2: coarse to fine
            size = (sizes[k], sizes[k])
            lateral = self.lateral[k](maps[k])  # at g; upsample after the 1x1 conv (commutes, cheaper)
            if lateral.shape[-1] != sizes[k]:
                lateral = F.interpolate(lateral, size=size, mode="nearest")
            top = self.smooth[k](lateral + F.interpolate(top, size=size, mode="nearest"))
            levels.append(top)
        return levels[::-1]


class LanguageHierarchy(nn.Module):
    """Four text taps -> [L1 (N,L,C) token, L2 (N,L,C) phrase, L3 (N,C) sentence, L4 (N,C) global]."""

    def __init__(self, in_widths: Sequence[int], channels: int = 256, window: int = 3):
        super().__init__()
        widths = _check_four("LanguageHierarchy", in_widths)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.channels, self.window = int(channels), int(window)
        c = self.channels
        self.token_proj = nn.Linear(widths[0], c)
        self.phrase_proj = nn.Linear(widths[1], c)
        self.phrase_qkv = nn.Linear(c, 3 * c)  # single head; v's own projection makes an output one redundant
        # zero query: uniform scores, so L3 starts as the masked mean of tap 3
        self.sentence_query = nn.Parameter(torch.zeros(widths[2]))
        self.sentence_proj = nn.Linear(widths[2], c)
        self.global_proj = nn.Linear(widths[3], c)

    def _window_attention(self, x: Tensor, mask: Tensor) -> Tensor:
        """Single-head attention within ±window//2 positions, over real tokens only."""
        q, k, v = self.phrase_qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / self.channels ** 0.5  # (N, L, L); L <= 77, a dense band is cheap
        pos = torch.arange(x.shape[1], device=x.device)
        band = (pos[:, None] - pos[None, :]).abs() <= self.window // 2
        # a padded query may see only padding; let it see itself so its row is never all -inf (no NaN),
        # its output is zeroed by the caller anyway
        allowed = band & (mask[:, None, :] | torch.eye(x.shape[1], dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(dim=-1) @ v

    def _attention_pool(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = (x @ self.sentence_query) / x.shape[-1] ** 0.5  # (N, L)
        # a finite fill, not -inf: an all-padding row would give NaN weights (and NaN gradients
        # through nan_to_num); with the finite fill it is uniform, then zeroed by the mask
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1) * mask.to(scores.dtype)
        return (weights.unsqueeze(-1) * x).sum(dim=1)

    def forward(self, taps: Sequence[Tensor], mask: Tensor, pooled: Tensor) -> list[Tensor]:
        """taps: 4 tensors (N, L, D_k); mask (N, L) bool, True = real token; pooled (N, D_4), the
        tower's own pooled state of tap 4 (L4 reads only `pooled`; taps[3] is accepted for symmetry)."""
        if len(taps) != 4:
            raise ValueError(f"LanguageHierarchy takes 4 taps, got {len(taps)}")
        mask = mask.bool()
        keep = mask.unsqueeze(-1)
        # zero padding on entry: whatever the tower left there cannot reach any output
        t1, t2, t3 = (torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in taps[:3])
        m = keep.to(t1.dtype)
        l1 = self.token_proj(t1) * m  # the bias would otherwise make padding non-zero
        l2 = self._window_attention(self.phrase_proj(t2), mask) * m
        l3 = self.sentence_proj(self._attention_pool(t3, mask))
        l4 = self.global_proj(pooled)
        return [l1, l2, l3, l4]


class CrossModalBridge(nn.Module):
    """f_v2l and f_l2v of seed §4.2.3; both pyramids have width `channels`, so both are square."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.v2l = nn.Linear(channels, channels)
        self.l2v = nn.Linear(channels, channels)


@dataclass
class PyramidOutput:
    visual: list[Tensor]  # [P2, P3, P4, P5], (N, channels, s, s)
    language: list[Tensor]  # [L1 (N,L,C), L2 (N,L,C), L3 (N,C), L4 (N,C)]
    mask: Tensor  # (N, L) bool
    visual_levels: Tensor  # (N, 4, channels): GAP of P2..P5
    language_levels: Tensor  # (N, 4, channels): masked mean of L1, L2; L3; L4
    visual_aligned: Tensor  # (N, 4, channels): f_v2l(visual_levels)
    language_aligned: Tensor  # (N, 4, channels): f_l2v(language_levels)


class UCMP(nn.Module):
    """The unified cross-modal pyramid: a VisualPyramid, a LanguageHierarchy and the bridge."""

    def __init__(self, vision_widths: Sequence[int], text_widths: Sequence[int],
                 channels: int = 256, window: int = 3):
        super().__init__()
        self.channels = int(channels)
        self.visual = VisualPyramid(vision_widths, channels)
        self.language = LanguageHierarchy(text_widths, channels, window)
        self.bridge = CrossModalBridge(channels)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, vision_taps: Sequence[Tensor], grid: int, text_taps: Sequence[Tensor],
                mask: Tensor, pooled: Tensor) -> PyramidOutput:
        visual, visual_levels, visual_aligned = self.visual_side(vision_taps, grid)
        language, language_levels, language_aligned = self.language_side(text_taps, mask, pooled)
        return PyramidOutput(visual=visual, language=language, mask=mask.bool(), visual_levels=visual_levels,
                             language_levels=language_levels, visual_aligned=visual_aligned,
                             language_aligned=language_aligned)

    def visual_side(self, vision_taps: Sequence[Tensor], grid: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """[P2..P5], their GAPs (N, 4, C) and f_v2l of those: what depends on the image alone."""
        visual = self.visual(vision_taps, grid)
        visual_levels = torch.stack([p.mean(dim=(2, 3)) for p in visual], dim=1)
        return visual, visual_levels, self.bridge.v2l(visual_levels)

    def language_side(self, text_taps: Sequence[Tensor], mask: Tensor, pooled: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """[L1..L4], their pooled levels (N, 4, C) and f_l2v of those: what depends on the text alone."""
        mask = mask.bool()
        language = self.language(text_taps, mask, pooled)
        language_levels = torch.stack(
            [_masked_mean(language[0], mask), _masked_mean(language[1], mask), language[2], language[3]], dim=1)
        return language, language_levels, self.bridge.l2v(language_levels)
