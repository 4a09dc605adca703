"""Pairwise inference over a list of images: batches pairs that share shapes, runs the
model (a torch DUSt3R or any callable with the same `(view1, view2)` interface, such as
the ONNX Runtime runner), and returns one result per pair."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

VIEW_TENSOR_KEYS = ("img", "true_shape")


def collate_views(views: list[dict]) -> dict:
    """Stack single-image view dicts (1,3,H,W) into one batch; labels stay lists."""
    batch = {k: torch.cat([v[k] for v in views]) for k in VIEW_TENSOR_KEYS}
    batch["idx"] = [v["idx"] for v in views]
    batch["instance"] = [v["instance"] for v in views]
    return batch


def _shape_key(pair: tuple[dict, dict]) -> tuple:
    return tuple(pair[0]["img"].shape[-2:]) + tuple(pair[1]["img"].shape[-2:])


def batch_pairs(pairs: list[tuple[dict, dict]], batch_size: int) -> Iterator[list[int]]:
    """Indices of consecutive pairs that can share a batch (same view shapes), in order."""
    current: list[int] = []
    for i, pair in enumerate(pairs):
        if current and (len(current) == batch_size or _shape_key(pairs[current[0]]) != _shape_key(pair)):
            yield current
            current = []
        current.append(i)
    if current:
        yield current


def _to_device(view: dict, device: torch.device | str) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in view.items()}


class EncoderCache:
    """Each view's encoder tokens, computed once per scene and reused by every pair the view is in
    (a swin-K or complete graph puts a view in many pairs; the official loop encodes both images
    of every pair again). Views are keyed by identity: make_pairs hands the same dict to every
    pair of an image. Tokens that miss are encoded together, one batch per image shape."""

    def __init__(self, model, device: torch.device | str):
        self.model, self.device = model, device
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views: list[dict] = []  # keeps the keyed views alive, so no id is reused
        self.encoded = 0

    def fill(self, views: list[dict]) -> None:
        from pqk.models.dust3r.model import true_shape_of

        missing = list({id(v): v for v in views if id(v) not in self.tokens}.values())
        by_shape: dict[tuple, list[dict]] = {}
        for view in missing:
            by_shape.setdefault(tuple(view["img"].shape[-2:]), []).append(view)
        for group in by_shape.values():
            batch = _to_device(collate_views(group), self.device)
            feat, pos = self.model.encode_image(batch["img"], true_shape_of(batch))
            for k, view in enumerate(group):
                self.tokens[id(view)] = (feat[k], pos[k])
                self._views.append(view)
            self.encoded += len(group)

    def stacked(self, views: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        self.fill(views)
        feats, poses = zip(*(self.tokens[id(v)] for v in views))
        return torch.stack(feats), torch.stack(poses)


def caches_encoder(model) -> bool:
    """Whether `model` can run from cached encoder tokens (pqk's PyTorch DUSt3R; not an ONNX runner)."""
    return callable(getattr(model, "encode_image", None)) and callable(getattr(model, "forward_tokens", None))


def inference(
    pairs: list[tuple[dict, dict]],
    model: Callable,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
    cache_encoder: bool = True,
) -> list[dict]:
    """Run `model` on every pair; returns per pair {'view1', 'view2', 'pred1', 'pred2'}
    with the batch dimension removed and tensors on the CPU. With `cache_encoder` (and a model
    that allows it) each view is encoded once for all its pairs (`EncoderCache`)."""
    from pqk.models.dust3r.model import true_shape_of

    results: list[dict] = [{} for _ in pairs]
    cache = EncoderCache(model, device) if cache_encoder and caches_encoder(model) else None
    for indices in batch_pairs(pairs, batch_size):
        view1 = _to_device(collate_views([pairs[i][0] for i in indices]), device)
        view2 = _to_device(collate_views([pairs[i][1] for i in indices]), device)
        with torch.inference_mode():
            if cache is None:
                pred1, pred2 = model(view1, view2)
            else:
                feat1, pos1 = cache.stacked([pairs[i][0] for i in indices])
                feat2, pos2 = cache.stacked([pairs[i][1] for i in indices])
                pred1, pred2 = model.forward_tokens((true_shape_of(view1), true_shape_of(view2)), (feat1, feat2),
                                                    (pos1, pos2))
        for b, i in enumerate(indices):
            results[i] = {
                "view1": {"idx": view1["idx"][b], "instance": view1["instance"][b], "true_shape": view1["true_shape"][b].cpu()},
                "view2": {"idx": view2["idx"][b], "instance": view2["instance"][b], "true_shape": view2["true_shape"][b].cpu()},
                "pred1": {k: v[b].float().cpu() for k, v in pred1.items()},
                "pred2": {k: v[b].float().cpu() for k, v in pred2.items()},
            }
        if on_batch is not None:
            on_batch(len(indices))
    return results

