"""The four tapped blocks of each tower of a CLIP-family model, in one form whatever the model.

The pyramid (UCMP) reads each tower at 1/4, 1/2, 3/4 and the full depth (`CLIP.tap_layers`).
The official CLIP and the LiT teacher differ in how their hidden states come back (CLIP's text
list starts with the embeddings, MiniLM's with block 1), in where a text is pooled (CLIP: the
argmax id, the EOT; LiT: the mean over non-pad tokens) and in which positions are real (CLIP:
up to and including the EOT, the causal mask makes later positions padding; LiT: ids != 0);
`tap` hides those differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Taps:
    vision: list[Tensor]  # 4 x (N, 1 + grid*grid, C): class token, then patches row-major
    grid: int
    text: list[Tensor]  # 4 x (N, L, D)
    mask: Tensor  # (N, L) bool, True = a real token
    pooled: Tensor  # (N, D) the text tower's own pooled state of its last tap
    image_features: Tensor  # (N, E) what encode_image returns
    text_features: Tensor  # (N, E) what encode_text returns


def tap_layers(depth: int) -> list[int]:
    """1-based blocks [d//4, d//2, 3d//4, d] (0 = the input of block 1, for towers under 4 blocks)."""
    return [depth // 4, depth // 2, 3 * depth // 4, depth]


def tap(model, image: Tensor, text: Tensor) -> Taps:
    """Run both towers of `model` once, keeping the tapped blocks."""
    vision, grid, image_features = tap_image(model, image)
    text_taps, mask, pooled, text_features = tap_text(model, text)
    return Taps(vision, grid, text_taps, mask, pooled, image_features, text_features)


def tap_image(model, image: Tensor) -> tuple[list[Tensor], int, Tensor]:
    """The image tower's four taps, its patch grid side and encode_image's output."""
    image_features, vision_hidden = model.encode_image(image, return_hidden=True)
    vision = [vision_hidden[k] for k in tap_layers(len(vision_hidden) - 1)]
    grid = int(round((vision[0].shape[1] - 1) ** 0.5))
    return vision, grid, image_features


def tap_text(model, text: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """The text tower's four taps, its real-token mask, its pooled state and encode_text's output."""
    from pqk.models.clip.lit import LiTCLIP

    text_features, text_hidden = model.encode_text(text, return_hidden=True)
    if isinstance(model, LiTCLIP):  # MiniLM's list starts with block 1's output
        text_taps = [text_hidden[max(k, 1) - 1] for k in tap_layers(len(text_hidden))]
        mask = text != 0
        weights = mask.unsqueeze(-1).to(text_taps[-1].dtype)
        pooled = (text_taps[-1] * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    else:  # official CLIP: hidden[0] = token + positional embedding, pooled at argmax(ids)
        text_taps = [text_hidden[k] for k in tap_layers(len(text_hidden) - 1)]
        eot = text.argmax(dim=-1)
        mask = torch.arange(text.shape[1], device=text.device)[None, :] <= eot[:, None]
        pooled = text_taps[-1][torch.arange(len(text), device=text.device), eot]
    return text_taps, mask, pooled, text_features


def trim_padding(model, text: Tensor) -> Tensor:
    """A LiT teacher's token ids without the padding columns no row uses (MiniLM masks padding in
    attention, so the outputs at real tokens are the same); other models' ids unchanged."""
    from pqk.models.clip.lit import LiTCLIP

    if not isinstance(model, LiTCLIP):
        return text
    return text[:, : max(1, int((text != 0).sum(dim=1).max()))]


def tap_widths(model) -> tuple[list[int], list[int]]:
    """Channel widths of the four vision and four text taps (for building a pyramid)."""
    from pqk.models.clip.lit import LiTCLIP

    vision = [model.visual.transformer.width] * 4
    text = [model.text.config.hidden] * 4 if isinstance(model, LiTCLIP) else [model.transformer.width] * 4
    return vision, text
