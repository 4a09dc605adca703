"""Training/evaluation batches of image pairs with ground-truth pointmaps, drawn from scenes
(`pqk.data.scenes.Scene`): view 1 and view 2 images plus both views' points in view 1's
camera frame, the layout DUSt3R's regression loss expects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pqk.data.images import normalize_array


def window_pairs(n_views: int, window: int) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j, at most `window` views apart along the cyclic trajectory
    (the pairs a swin-`window` symmetrized graph can produce)."""
    out = []
    for i in range(n_views):
        for j in range(n_views):
            d = min(abs(i - j), n_views - abs(i - j))
            if 0 < d <= window:
                out.append((i, j))
    return out


def pair_example(scene, i: int, j: int) -> dict[str, torch.Tensor]:
    """Tensors of one pair: images normalized to [-1, 1], GT points in camera i."""
    pts_i, valid_i, pts_j, valid_j = scene.pair_gt(i, j)
    vi, vj = scene.views[i], scene.views[j]
    return {
        "img1": normalize_array(vi.img),
        "img2": normalize_array(vj.img),
        "pts1": torch.from_numpy(np.ascontiguousarray(pts_i, dtype=np.float32)),
        "pts2": torch.from_numpy(np.ascontiguousarray(pts_j, dtype=np.float32)),
        "valid1": torch.from_numpy(np.ascontiguousarray(valid_i, dtype=bool)),
        "valid2": torch.from_numpy(np.ascontiguousarray(valid_j, dtype=bool)),
    }


def collate_pairs(examples: Sequence[dict[str, torch.Tensor]]) -> tuple[dict, dict, dict]:
    """-> (view1, view2, gt) with view dicts as the model takes them."""
    stack = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    B, _, H, W = stack["img1"].shape
    shape1 = torch.tensor([[H, W]] * B, dtype=torch.int32)
    shape2 = torch.tensor([list(stack["img2"].shape[-2:])] * B, dtype=torch.int32)
    view1 = {"img": stack["img1"], "true_shape": shape1}
    view2 = {"img": stack["img2"], "true_shape": shape2}
    gt = {k: stack[k] for k in ("pts1", "pts2", "valid1", "valid2")}
    return view1, view2, gt


class PairSampler:
    """Seeded random pairs (scene, i, j) from a pool of scenes, neighbours within `window`."""

    def __init__(self, scenes: Sequence, window: int = 4, seed: int = 42):
        self.scenes = scenes
        self.pairs = [(s, i, j) for s, sc in enumerate(scenes) for i, j in window_pairs(len(sc.views), window)]
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> tuple[dict, dict, dict]:
        picks = self.rng.integers(0, len(self.pairs), size=batch_size)
        return collate_pairs([pair_example(self.scenes[s], i, j) for s, i, j in (self.pairs[k] for k in picks)])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
