"""Our CLIP against tensors of the official OpenAI code (../shared/conformance/clip): every case
folder with a config.json (a held-back case dropped in later is picked up), the official key
tables of ViT-B/16 and ViT-L/14 (built on the meta device), parameter counts, build_model."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from safetensors.torch import load_file

from pqk.errors import CheckpointError, ConfigError
from pqk.models.clip import (
    CLIP,
    CLIPConfig,
    build_model,
    count_parameters,
    load_checkpoint,
)
from pqk.models.clip.checkpoint import load_state_dict_strict, official_fp16_keys

CLIP_DIR = SHARED / "conformance" / "clip"
INPUTS = ("image", "text", "text_edge")
BOUND = 1e-5  # README: max|d|/max|ref| and |d|/|ref| per tensor; 10x the worst honest difference


def require_clip_conformance() -> Path:
    """The CLIP conformance folder; CI must have it (fail), a laptop without it skips."""
    if not CLIP_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CLIP conformance data not found at {CLIP_DIR} (set PQK_SHARED)")
        pytest.skip(f"CLIP conformance data not found at {CLIP_DIR}")
    return CLIP_DIR


def clip_cases() -> list[Path]:
    if not CLIP_DIR.is_dir():
        return []
    return sorted(p for p in CLIP_DIR.iterdir() if (p / "config.json").is_file())


CASES = clip_cases()
CASE_IDS = [c.name for c in CASES]


def case_config(case: Path) -> dict:
    return json.loads((case / "config.json").read_text())


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|d| / max|ref|, |d| / |ref|) in float64."""
    d = ours.detach().double() - ref.double()
    return float(d.abs().max() / ref.double().abs().max()), float(d.norm() / ref.double().norm())


def assert_close(ours: torch.Tensor, ref: torch.Tensor, key: str, bound: float = BOUND) -> None:
    assert tuple(ours.shape) == tuple(ref.shape), f"{key}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    rel, l2 = errors(ours, ref)
    assert rel <= bound and l2 <= bound, f"{key}: max rel {rel:.2e}, L2 {l2:.2e} (bound {bound:.0e})"


def test_cases_present():
    require_clip_conformance()
    assert {"tiny_vit_a", "tiny_vit_b"} <= set(CASE_IDS)


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Path, dict, CLIP]]:
    """Each case: CLIP(**constructor_args), strictly loaded from weights.safetensors."""
    require_clip_conformance()
    out = {}
    for case in CASES:
        cfg = case_config(case)
        model = CLIP(**cfg["constructor_args"]).eval()
        weights = load_file(str(case / cfg.get("weights_file", "weights.safetensors")))
        load_state_dict_strict(model, weights, case.name)
        state = model.state_dict()
        assert set(state) == set(weights)
        for key, value in state.items():
            assert value.dtype == weights[key].dtype == torch.float32 and torch.equal(value, weights[key]), key
        out[case.name] = (case, cfg, model)
    return out


def _ours(model: CLIP, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensor for every io key, fp64.* from a float64 copy of the model."""
    with torch.no_grad():
        ours = model.named_states(io["image"], io["text"])
        edge = model.named_states(text=io["text_edge"])
        ours["text_edge.encode_text"] = edge["encode_text"]
        ours["text_edge.pool_index"] = edge["text.pool_index"]
        m64 = CLIP(**model.config.constructor_args()).double().eval()
        m64.load_state_dict(model.state_dict())
        ours64 = m64.named_states(io["image"].double(), io["text"])
    for key in ("encode_image", "encode_text", "logits_per_image", "logits_per_text"):
        ours[f"fp64.{key}"] = ours64[key]
    return ours


@pytest.mark.parametrize("name", CASE_IDS)
def test_every_io_tensor_matches_official(models, name, record_property):
    case, cfg, model = models[name]
    io = load_file(str(case / cfg.get("io_file", "io.safetensors")))
    ours = _ours(model, io)
    checked = [k for k in io if k not in INPUTS]
    assert not [k for k in checked if k not in ours], "every io tensor has a counterpart"
    worst = 0.0
    for key in checked:
        if io[key].is_floating_point():
            assert ours[key].dtype == io[key].dtype, key
            assert_close(ours[key], io[key], key)
            worst = max(worst, *errors(ours[key], io[key]))
        else:
            assert torch.equal(ours[key].cpu(), io[key]), key  # pooling index: argmax, first maximum
    record_property("worst_rel", worst)
    depth_v, depth_t = cfg["constructor_args"]["vision_layers"], cfg["constructor_args"]["transformer_layers"]
    assert {f"vision.block{i}" for i in range(depth_v)} | {f"text.block{i}" for i in range(depth_t)} <= set(io)


@pytest.mark.parametrize("name", CASE_IDS)
def test_return_hidden_is_the_io_hidden_states(models, name):
    case, cfg, model = models[name]
    io = load_file(str(case / cfg.get("io_file", "io.safetensors")))
    with torch.no_grad():
        image_features, vision = model.encode_image(io["image"], return_hidden=True)
        text_features, text = model.encode_text(io["text"], return_hidden=True)
    assert len(vision) == model.visual.transformer.layers + 1 and len(text) == model.transformer.layers + 1
    assert_close(vision[0], io["vision.ln_pre"], "hidden[0] = ln_pre output")
    assert_close(text[0], io["text.embeddings"], "hidden[0] = text embeddings")
    for k in range(1, len(vision)):
        assert_close(vision[k], io[f"vision.block{k - 1}"], f"vision hidden[{k}]")
    for k in range(1, len(text)):
        assert_close(text[k], io[f"text.block{k - 1}"], f"text hidden[{k}]")
    assert_close(image_features, io["encode_image"], "encode_image")
    assert_close(text_features, io["encode_text"], "encode_text")
    assert torch.equal(model.encode_text(io["text"].int()), model.encode_text(io["text"]))  # int32 ids


@pytest.mark.parametrize("name", CASE_IDS)
def test_load_checkpoint_and_build_model(models, name):
    case, cfg, model = models[name]
    path = case / cfg.get("weights_file", "weights.safetensors")
    weights = load_file(str(path))
    if cfg["derived"]["build_model_compatible"]:
        for rebuilt in (build_model(weights), load_checkpoint(path)):
            assert rebuilt.config == model.config and not rebuilt.training
            assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in weights.items())
            assert all(v.dtype == torch.float32 for v in rebuilt.state_dict().values())  # no fp16 rounding
    else:  # text heads != width // 64: the official rule cannot rebuild it, one line says why
        for attempt in (lambda: build_model(weights), lambda: load_checkpoint(path)):
            with pytest.raises(CheckpointError) as info:
                attempt()
            assert "\n" not in str(info.value) and "width // 64" in str(info.value)


@pytest.mark.parametrize("name", CASE_IDS)
def test_fp16_like_official_reproduces_the_rounding(models, name):
    case = models[name][0]
    stats_file = case / "generation_stats.json"
    stats = json.loads(stats_file.read_text()).get("build_model", {}) if stats_file.is_file() else {}
    if not stats.get("ok"):
        pytest.skip("the official build_model cannot rebuild this case")
    io = load_file(str(case / "io.safetensors"))
    rounded = build_model(load_file(str(case / "weights.safetensors")), fp16_like_official=True)
    assert stats["inferred_args"] == rounded.config.constructor_args()
    assert len(official_fp16_keys(list(rounded.state_dict()))) == stats["n_fp16_tensors"]
    with torch.no_grad():
        logits_per_image, logits_per_text = rounded(io["image"], io["text"])
        ours = {"encode_image": rounded.encode_image(io["image"]), "encode_text": rounded.encode_text(io["text"]),
                "logits_per_image": logits_per_image, "logits_per_text": logits_per_text}
    for key, official in stats["fp16_rounded_weights_vs_fp32_outputs"].items():
        rel, l2 = errors(ours[key], io[key])  # the same rounding gives the same deviation
        assert rel == pytest.approx(official["max_abs_over_max_ref"], rel=0.05, abs=2e-6), key
        assert l2 == pytest.approx(official["rel_l2"], rel=0.05, abs=2e-6), key


# --- official key tables and parameter counts ----------------------------------------------------


def _architectures() -> dict:
    path = CLIP_DIR / "official_keys" / "architectures.json"
    return json.loads(path.read_text())["architectures"] if path.is_file() else {}


ARCHS = _architectures()


@pytest.mark.parametrize("arch", [a for a, v in ARCHS.items() if v.get("tsv")])
def test_key_table_equals_official(arch):
    spec = ARCHS[arch]
    with torch.device("meta"):
        model = CLIP(**spec["constructor_args"])
    with (CLIP_DIR / "official_keys" / spec["tsv"]).open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    state = model.state_dict()
    assert list(state) == [r["key"] for r in rows], "same keys in the same order"
    for row in rows:
        shape = () if row["shape"] == "scalar" else tuple(int(s) for s in row["shape"].split("x"))
        assert tuple(state[row["key"]].shape) == shape and state[row["key"]].numel() == int(row["numel"]), row["key"]
    fp16 = {r["key"] for r in rows if r["dtype_after_build_model"] == "float16"}
    assert set(official_fp16_keys(list(state))) == fp16
    assert len(state) == spec["n_state_dict_keys"]
    assert "attn_mask" not in state and [n for n, _ in model.named_buffers()] == ["attn_mask"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_counts(arch):
    spec = ARCHS[arch]
    with torch.device("meta"):
        model = CLIP(**spec["constructor_args"])
    params = spec["params"]
    for tower in ("vision", "text", "logit_scale"):
        assert count_parameters(model, tower) == params[tower], tower
    assert count_parameters(model) == params["total"]
    assert model.config.vision_heads == spec["derived"]["vision_heads"]
    assert model.visual.positional_embedding.shape[0] == spec["derived"]["vision_tokens"]


def test_architectures_present():
    require_clip_conformance()
    assert {"ViT-B-16", "ViT-L-14"} <= {a for a, v in ARCHS.items() if v.get("tsv")}


def test_tap_layers():
    assert CLIP.tap_layers(12) == [3, 6, 9, 12]
    assert CLIP.tap_layers(24) == [6, 12, 18, 24]
    assert CLIP.tap_layers(2) == [0, 1, 1, 2]  # 0 = the input of block 1 (hidden[0])
    with pytest.raises(ConfigError):
        CLIP.tap_layers(0)


@pytest.mark.parametrize("bad", [
    {"vision_width": 48}, {"vision_width": 96}, {"transformer_heads": 5}, {"vision_layers": (3, 4, 6, 3)},
    {"embed_dim": 0}, {"context_length": 2.0}, {"image_resolution": 2},
])
def test_bad_configs_are_one_line(bad):
    args = {**ARCHS.get("ViT-B-16", {}).get("constructor_args", {}), **bad} if ARCHS else None
    if args is None:
        pytest.skip("architectures.json not found")
    with pytest.raises(ConfigError) as info:
        CLIPConfig(**args)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        CLIPConfig.from_dict({**args, "quick_gelu": True})
