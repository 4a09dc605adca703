"""The CLIP family's task pieces: metrics, the per-family method registry, pruning, the two-tower
ONNX pair and the LiT model's file format."""

from __future__ import annotations

import math

import pytest
import torch

from pqk.errors import ConfigError
from pqk.methods.base import get_method, method_names
from pqk.tasks.clip.metrics import (
    chance_recalls,
    class_embeddings,
    retrieval_recalls,
    vqa_accuracy,
    vqa_chance,
    zero_shot_accuracy,
)

SMALL_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                  context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2)


def test_perfect_embeddings_recall_everything():
    emb = torch.eye(6)
    out = retrieval_recalls(emb, torch.cat([emb, emb]), [*range(6), *range(6)])
    assert all(v == 1.0 for v in out.values())


def test_constant_embeddings_are_not_rewarded():
    """Ties count against the model: a model that says the same for everything finds nothing at R@1."""
    out = retrieval_recalls(torch.ones(5, 3), torch.ones(10, 3), [k // 2 for k in range(10)])
    assert out["r1_i2t"] == 0.0 and out["r1_t2i"] == 0.0


def test_recall_counts_any_own_caption_and_ranks():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [0.9, 0.1], [0.8, 0.2]])  # captions 0, 1 of image 0; caption 2 of image 1
    out = retrieval_recalls(image, text, [0, 0, 1])
    assert out["r1_i2t"] == 0.5  # image 0's best caption (1) is its own; image 1's best (0) is not
    assert out["r1_t2i"] == pytest.approx(1 / 3)  # caption 0 -> image 1 (wrong), 1 -> image 0 (right), 2 -> image 0 (wrong)


def test_chance_recalls_match_a_random_ranking():
    captions = [2, 1, 3, 2]
    gen = torch.Generator().manual_seed(42)
    runs = [retrieval_recalls(torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen), [0, 0, 1, 2, 2, 2, 3, 3])
            for _ in range(3000)]
    expected = chance_recalls(4, captions)
    for key in ("r1_i2t", "r5_i2t", "r1_t2i"):
        observed = sum(r[key] for r in runs) / len(runs)
        assert observed == pytest.approx(expected[key], abs=0.03), key
    assert expected["r1_t2i"] == 0.25 and expected["r10_t2i"] == 1.0


def test_zero_shot_and_vqa():
    classes = class_embeddings(torch.eye(4).repeat_interleave(2, dim=0), 4, 2)
    assert torch.allclose(classes, torch.eye(4, dtype=torch.float64))
    out = zero_shot_accuracy(torch.eye(4)[[0, 1, 2, 3, 0]], classes, [0, 1, 2, 3, 1])
    assert out["zs_top1"] == pytest.approx(0.8)
    vqa = vqa_accuracy(torch.eye(2)[[0, 1]], [torch.eye(2), torch.eye(2)], [0, 0], ["yes/no", "number"])
    assert vqa["vqa_acc"] == 0.5 and vqa["vqa_yesno"] == 1.0 and vqa["vqa_number"] == 0.0 and vqa["vqa_other"] is None
    chance = vqa_chance([2, 5], ["yes/no", "number"])
    assert chance["vqa_yesno"] == 0.5 and math.isclose(chance["vqa_acc"], 0.35)


def test_methods_are_per_family():
    assert set(method_names("clip")) == {"cmapkd", "distill", "prune", "quantize"}
    assert "joint" in method_names("dust3r")
    assert get_method("distill", "clip") is not get_method("distill", "dust3r")
    assert get_method("distill", "clip").families == ("clip",)
    with pytest.raises(ConfigError, match="no implementation for the clip family; accepted for clip: cmapkd, distill, prune, quantize"):
        get_method("joint", "clip")


def test_plan_of_the_clip_family_refuses_a_dust3r_only_method(tmp_path):
    from pqk.pipeline.plan import load_plan

    plan = tmp_path / "p.yaml"
    plan.write_text("name: p\ntask: clip\nexperiments:\n  - {id: J, steps: [{method: joint}]}\n")
    with pytest.raises(ConfigError, match="unknown method 'joint' for the clip family"):
        load_plan(plan, strict=True)


def test_pruning_removes_mlp_channels_and_reloads(tmp_path):
    from pqk.methods.clip.prune import prune_mlps
    from pqk.models.clip import CLIP
    from pqk.models.clip.family import load_family_model, save_family_model, text_tokenizer

    torch.manual_seed(0)
    model = CLIP(**SMALL_CLIP).eval()
    text = text_tokenizer(model)(["a red circle", "two blue squares"])
    image = torch.randn(2, 3, 32, 32)
    report = prune_mlps(model, 0.5)
    assert report["params_after"] < report["params_before"]
    assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == 128  # 4 * 64, half kept
    back = load_family_model(save_family_model(model, tmp_path / "p.safetensors"))
    assert sum(p.numel() for p in back.parameters()) == report["params_after"]
    assert torch.equal(back.encode_text(text), model.encode_text(text))
    assert torch.equal(back.encode_image(image), model.encode_image(image))


def test_tower_pair_in_onnx_runtime_matches_pytorch(tmp_path):
    from pqk.backends.clip_onnx import OrtTowerPair, export_towers
    from pqk.models.clip import CLIP
    from pqk.models.clip.family import text_tokenizer
    from pqk.tasks import infer_family

    torch.manual_seed(0)
    model = CLIP(**SMALL_CLIP).eval()
    files = export_towers(model, tmp_path / "m.onnx")
    assert infer_family(files.image) == "clip"
    pair = OrtTowerPair(files.image)
    image = torch.randn(3, 3, 32, 32)
    captions = ["a red circle", "two blue squares", "a"]
    text = text_tokenizer(model)(captions)
    pairs = ((pair.images(image), model.encode_image(image)), (pair.texts(pair.tokenize(captions)), model.encode_text(text)))
    for got, ref in pairs:
        # fp32 kernels of two runtimes: relative error a few ulps times the depth
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5
