"""The pair results of `global_alignment` read into a checked edge list: per edge, both
views' pointmaps in view 1's frame and their confidences, and the image sizes they imply."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pqk.errors import InputError


@dataclass
class _PairGraph:
    """The pair results as edges; lists are per edge, maps keep their image shape."""

    shapes: list[tuple[int, int]]  # (H, W) per image
    edges: list[tuple[int, int]]
    pred_i: list[torch.Tensor]  # (H_i, W_i, 3): image i in camera i
    pred_j: list[torch.Tensor]  # (H_j, W_j, 3): image j in camera i
    conf_i: list[torch.Tensor]
    conf_j: list[torch.Tensor]

    @property
    def n_images(self) -> int:
        return len(self.shapes)

    def im_conf(self) -> list[torch.Tensor]:
        """Per image, the pixel-wise maximum confidence over every edge it appears in."""
        best: list[torch.Tensor | None] = [None] * self.n_images
        for (i, j), ci, cj in zip(self.edges, self.conf_i, self.conf_j):
            for k, c in ((i, ci), (j, cj)):
                best[k] = c.clone() if best[k] is None else torch.maximum(best[k], c)
        return best  # type: ignore[return-value]


def _record_shape(shapes: list, k: int, hw: tuple[int, int]) -> None:
    if shapes[k] is None:
        shapes[k] = hw
    elif shapes[k] != hw:
        raise InputError(f"image {k} appears with two shapes: {shapes[k]} and {hw}")


def _read_pairs(pair_results: list[dict], n_images: int | None, device: torch.device) -> _PairGraph:
    if not pair_results:
        raise InputError("global alignment needs at least one pair result")
    edges = [(int(r["view1"]["idx"]), int(r["view2"]["idx"])) for r in pair_results]
    n = n_images if n_images is not None else 1 + max(max(e) for e in edges)
    if any(not (0 <= k < n) for e in edges for k in e) or any(i == j for i, j in edges):
        raise InputError(f"pair indices must be distinct and in [0, {n}): got {edges}")

    def grab(r: dict, view: str, key: str) -> torch.Tensor:
        return torch.as_tensor(r[view][key]).to(device=device, dtype=torch.float32)

    pred_i = [grab(r, "pred1", "pts3d") for r in pair_results]
    pred_j = [grab(r, "pred2", "pts3d_in_other_view") for r in pair_results]
    conf_i = [grab(r, "pred1", "conf") for r in pair_results]
    conf_j = [grab(r, "pred2", "conf") for r in pair_results]
    shapes: list = [None] * n
    for (i, j), pi, pj, ci, cj in zip(edges, pred_i, pred_j, conf_i, conf_j):
        if pi.shape[:-1] != ci.shape or pj.shape[:-1] != cj.shape or pi.shape[-1] != 3:
            raise InputError(f"pair ({i}, {j}): pointmaps must be (H, W, 3) with (H, W) confidences")
        _record_shape(shapes, i, tuple(ci.shape))
        _record_shape(shapes, j, tuple(cj.shape))
    missing = [k for k, s in enumerate(shapes) if s is None]
    if missing:
        raise InputError(f"images {missing} appear in no pair")
    return _PairGraph(shapes, edges, pred_i, pred_j, conf_i, conf_j)
