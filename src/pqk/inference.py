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
    pair of an image. Tokens that miss are encoded together, one batch per image shape, and
    stored by `codec` (pqk.token_codecs: "fp" exact, "int8", "1bit"); positions are stored once
    per image shape."""

    def __init__(self, model, device: torch.device | str, codec: str = "fp"):
        from pqk.token_codecs import get_codec

        self.model, self.device, self.codec = model, device, get_codec(codec)
        self.tokens: dict[int, object] = {}
        self.positions: dict[tuple, torch.Tensor] = {}
        self._shape_of: dict[int, tuple] = {}
        self._views: list[dict] = []  # keeps the keyed views alive, so no id is reused
        self.encoded = 0

    def fill(self, views: list[dict]) -> None:
        from pqk.models.dust3r.model import true_shape_of

        missing = list({id(v): v for v in views if id(v) not in self.tokens}.values())
        by_shape: dict[tuple, list[dict]] = {}
        for view in missing:
            by_shape.setdefault(tuple(view["img"].shape[-2:]) + tuple(view["true_shape"].reshape(-1).tolist()), []).append(view)
        for shape, group in by_shape.items():
            batch = _to_device(collate_views(group), self.device)
            feat, pos = self.model.encode_image(batch["img"], true_shape_of(batch))
            self.positions.setdefault(shape, pos[0])
            for k, view in enumerate(group):
                self.tokens[id(view)] = self.codec.encode(feat[k])
                self._shape_of[id(view)] = shape
                self._views.append(view)
            self.encoded += len(group)

    def stacked(self, views: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        self.fill(views)
        feats = [self.codec.decode(self.tokens[id(v)]) for v in views]
        poses = [self.positions[self._shape_of[id(v)]] for v in views]
        return torch.stack(feats), torch.stack(poses)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tokens (positions, shared per shape, not counted)."""
        return sum(e.nbytes for e in self.tokens.values())


def caches_encoder(model) -> bool:
    """Whether `model` can run from cached encoder tokens (pqk's PyTorch DUSt3R; not an ONNX runner)."""
    return callable(getattr(model, "encode_image", None)) and callable(getattr(model, "forward_tokens", None))


def inference(
    pairs: list[tuple[dict, dict]],
    model: Callable,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
    cache: str | EncoderCache = "fp",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Run `model` on every pair; returns per pair {'view1', 'view2', 'pred1', 'pred2'}
    with the batch dimension removed and tensors on the CPU. With `cache` other than "none"
    (and a model that allows it) each view is encoded once for all its pairs and its tokens kept
    as that codec stores them ("fp" exact, "int8", "1bit"; or an `EncoderCache` to fill).
    `reduce` maps each kept (H, W, ...) prediction (e.g. subsampling for global alignment), so a
    large scene never holds every pair at full resolution."""
    from pqk.models.dust3r.model import true_shape_of
    from pqk.token_codecs import get_codec

    results: list[dict] = [{} for _ in pairs]
    if isinstance(cache, str):
        if cache != "none":
            get_codec(cache)  # a bad name is an error even for a model that cannot cache
        cache = EncoderCache(model, device, cache) if cache != "none" and caches_encoder(model) else None
    # a reduced view is copied: a slice would keep the whole batch's storage alive
    keep = (lambda t: reduce(t).clone()) if reduce is not None else (lambda t: t)
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
                "pred1": {k: keep(v[b]).float().cpu() for k, v in pred1.items()},
                "pred2": {k: keep(v[b]).float().cpu() for k, v in pred2.items()},
            }
        if on_batch is not None:
            on_batch(len(indices))
    return results

