"""Batched pairwise inference: batching must not change results; portrait outputs of
landscape_only models line up with their images in the point cloud."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TINY_KWARGS
from pqk.data.images import load_images
from pqk.data.pairs import make_pairs
from pqk.inference import batch_pairs, inference
from pqk.models.dust3r import build_model
from pqk.pointcloud import pair_point_cloud


def _images(shapes):
    rng = np.random.default_rng(42)
    return load_images([rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in shapes], size=224)


def test_batching_groups_only_equal_shapes():
    imgs = load_images([np.zeros((64, 96, 3), np.uint8)] * 2 + [np.zeros((96, 64, 3), np.uint8)], size=512)
    pairs = make_pairs(imgs, "complete")
    groups = list(batch_pairs(pairs, batch_size=4))
    assert sorted(i for g in groups for i in g) == list(range(len(pairs)))
    for g in groups:
        assert len({tuple(pairs[i][0]["img"].shape) + tuple(pairs[i][1]["img"].shape) for i in g}) == 1


def test_batched_equals_one_by_one(tiny_model):
    imgs = _images([(240, 320)] * 3)
    pairs = make_pairs(imgs, "complete")
    one = inference(pairs, tiny_model, batch_size=1)
    many = inference(pairs, tiny_model, batch_size=4)
    for a, b in zip(one, many):
        assert (a["view1"]["idx"], a["view2"]["idx"]) == (b["view1"]["idx"], b["view2"]["idx"])
        for key in ("pts3d", "conf"):
            torch.testing.assert_close(a["pred1"][key], b["pred1"][key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["pred2"]["pts3d_in_other_view"], b["pred2"]["pts3d_in_other_view"], rtol=1e-4, atol=1e-5)


def test_point_cloud_of_portrait_pair_with_landscape_only_model():
    torch.manual_seed(42)
    model = build_model(**{**TINY_KWARGS, "landscape_only": True}).eval()
    imgs = load_images([np.zeros((96, 64, 3), np.uint8)] * 2, size=512)
    res = inference(make_pairs(imgs, "complete", symmetrize=False), model)[0]
    assert res["pred1"]["pts3d"].shape[:2] == (imgs[0]["img"].shape[-1], imgs[0]["img"].shape[-2])  # transposed
    points, colors, total = pair_point_cloud(res, imgs[0]["rgb"], imgs[1]["rgb"], min_conf=1.0)
    assert points.shape == colors.shape and total == 2 * imgs[0]["rgb"].shape[0] * imgs[0]["rgb"].shape[1]
