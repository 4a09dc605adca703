"""CLIP checkpoint layouts (TorchScript read as data, torch.save, open_clip, Hugging Face, pqk),
one-line errors for bad files and bad inputs, and the official image preprocessing."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_clip_conformance import (
    CLIP_DIR,
    assert_close,
    case_config,
    require_clip_conformance,
)

from pqk.errors import CheckpointError, InputError
from pqk.models.clip import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    from_hf_state_dict,
    load_checkpoint,
    preprocess_image,
    read_state_dict,
    save_model,
    to_hf_state_dict,
    to_unit_tensor,
)
from pqk.models.clip.checkpoint import read_torchscript_tensors
from pqk.models.clip.preprocess import crop_box, resized_size


def _case(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    require_clip_conformance()
    case = CLIP_DIR / name
    return case_config(case)["constructor_args"], load_file(str(case / "weights.safetensors")), \
        load_file(str(case / "io.safetensors"))


def _model(args: dict, weights: dict) -> CLIP:
    model = CLIP(**args).eval()
    model.load_state_dict(weights)
    return model


def _same_weights(model: CLIP, weights: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return set(state) == set(weights) and all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in weights.items())


def _one_line(exc_info: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400, message
    for part in parts:
        assert part in message, message
    return message


# --- TorchScript archives ------------------------------------------------------------------------


def test_torchscript_archive_read_as_data(tmp_path):
    args, weights, io = _case("tiny_vit_b")
    model = _model(args, weights)
    reference = model.state_dict()
    del model.context_length, model.vocab_size  # the released archives hold these as int tensors
    for name in ("input_resolution", "context_length", "vocab_size"):
        model.register_buffer(name, torch.tensor(args["image_resolution" if name == "input_resolution" else name]))
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        traced = torch.jit.trace(model, (io["image"], io["text"]))
        torch.jit.save(traced, str(path))

    tensors = read_torchscript_tensors(path)  # exactly what torch.jit.load(path).state_dict() gives
    scripted_state = traced.state_dict()
    assert list(tensors) == list(scripted_state)
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in scripted_state.items())

    state_dict, meta = read_state_dict(path)
    assert meta["layout"] == "torchscript" and meta["extras"] == {"input_resolution": 12, "context_length": 12,
                                                                  "vocab_size": 100}
    assert list(state_dict) == list(reference)  # extras and the causal mask dropped, order kept
    loaded = load_checkpoint(path)
    assert _same_weights(loaded, weights) and loaded.config.constructor_args() == args
    with torch.no_grad():
        assert_close(loaded(io["image"], io["text"])[0], io["logits_per_image"], "logits_per_image")


def test_torchscript_mixed_dtypes_and_plain_attributes(tmp_path):
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4).half())
            self.attn_mask = torch.triu(torch.ones(2, 2))  # a plain attribute, as official: not state
            self.register_buffer("n", torch.tensor(7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn_mask.sum() + self.w.float().sum()

    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), Inner())
    outer[0].weight.data = outer[0].weight.data.to(torch.bfloat16)
    path = tmp_path / "mixed.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; the released files are TorchScript
        scripted = torch.jit.script(outer)
        scripted.save(str(path))
    tensors = read_torchscript_tensors(path)
    assert list(tensors) == list(scripted.state_dict()) == ["0.weight", "0.bias", "1.w", "1.n"]
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in scripted.state_dict().items())


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchscript_archive_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Evil(str(marker)), protocol=2))
        archive.writestr("evil/code/__torch__/m.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _one_line(info, "refused", "system")
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil2.pt")
    _one_line(info, "refused", "weights_only=True")
    assert not marker.exists()


# --- torch.save, open_clip, Hugging Face, pqk -------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_torch_save(tmp_path, suffix):
    _, weights, _ = _case("tiny_vit_b")
    torch.save(weights, tmp_path / f"w{suffix}")
    model = load_checkpoint(tmp_path / f"w{suffix}")
    assert _same_weights(model, weights) and read_state_dict(tmp_path / f"w{suffix}")[1]["layout"] == "pytorch"


def test_open_clip_layouts(tmp_path):
    _, weights, _ = _case("tiny_vit_b")
    wrapped = {f"module.{k}": v for k, v in weights.items()}
    wrapped["module.logit_scale"] = weights["logit_scale"].reshape(1)
    torch.save({"epoch": 3, "state_dict": wrapped}, tmp_path / "open_clip_pytorch_model.bin")
    state_dict, meta = read_state_dict(tmp_path / "open_clip_pytorch_model.bin")
    assert meta["mapped"] == ["module. prefix", "1-d logit_scale"] and state_dict["logit_scale"].dim() == 0
    assert _same_weights(load_checkpoint(tmp_path / "open_clip_pytorch_model.bin"), weights)
    custom = {f"text.{k}" if not k.startswith(("visual.", "logit_scale")) else k: v for k, v in weights.items()}
    assert "text.text_projection" in custom and "text.transformer.resblocks.0.ln_1.weight" in custom
    save_file(custom, str(tmp_path / "open_clip_model.safetensors"))
    assert _same_weights(load_checkpoint(tmp_path), weights)  # a folder with open_clip's file name


def test_hugging_face_mapping_round_trip(tmp_path):
    args, weights, io = _case("tiny_vit_a")
    hf = to_hf_state_dict(weights)
    assert torch.equal(hf["visual_projection.weight"], weights["visual.proj"].t())
    assert torch.equal(hf["text_projection.weight"], weights["text_projection"].t())
    w = args["transformer_width"]
    q = hf["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q, weights["transformer.resblocks.1.attn.in_proj_weight"][:w])
    assert torch.equal(hf["text_model.encoder.layers.1.self_attn.v_proj.bias"],
                       weights["transformer.resblocks.1.attn.in_proj_bias"][2 * w:])
    assert "vision_model.pre_layrnorm.weight" in hf and "vision_model.encoder.layers.0.mlp.fc2.bias" in hf
    back = from_hf_state_dict({**hf, "text_model.embeddings.position_ids": torch.arange(16)[None]})
    assert set(back) == set(weights) and all(torch.equal(back[k], v) for k, v in weights.items())

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {
        "num_attention_heads": args["transformer_heads"], "hidden_act": "quick_gelu"},
        "vision_config": {"num_attention_heads": 1}}))
    model = load_checkpoint(folder)  # tiny_vit_a: its text heads (4) come from config.json
    assert model.config.constructor_args() == args and _same_weights(model, weights)
    with torch.no_grad():
        assert_close(model.encode_text(io["text"]), io["encode_text"], "encode_text via HF")
    (folder / "config.json").write_text(json.dumps({"text_config": {"hidden_act": "gelu"}}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    _one_line(info, "gelu", "quick_gelu")
    del hf["vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError) as info:
        from_hf_state_dict(hf)
    _one_line(info, "q/k/v")


def test_hugging_face_file_without_config(tmp_path):
    args, weights, _ = _case("tiny_vit_b")
    save_file(to_hf_state_dict(weights), str(tmp_path / "hf.safetensors"))
    model = load_checkpoint(tmp_path / "hf.safetensors")  # heads inferred: 64 // 64 = 1
    assert model.config.constructor_args() == args and _same_weights(model, weights)


def test_pqk_format_round_trip(tmp_path):
    args, weights, _ = _case("tiny_vit_a")  # text heads != width // 64: only the metadata knows
    model = _model(args, weights)
    path = save_model(model, tmp_path / "out" / "clip.safetensors", history=[{"method": "K", "step": 1}])
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.safetensors"]  # no temporary left
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["pqk_family"] == "clip" and json.loads(metadata["pqk_config"]) == args
    assert json.loads(metadata["pqk_history"]) == [{"method": "K", "step": 1}]
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and _same_weights(loaded, weights)
    assert loaded.pqk_history == [{"method": "K", "step": 1}]
    state_dict, meta = read_state_dict(path)
    assert meta["layout"] == "pqk" and meta["config"] == args and set(state_dict) == set(weights)
    with pytest.raises(InputError):
        save_model(model, tmp_path / "clip.pt")


# --- bad files: one line each -----------------------------------------------------------------------


def test_missing_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.pt")
    _one_line(info, "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "junk.pt")
    _one_line(info, "junk.pt is not a readable checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "junk.safetensors")
    _one_line(info, "not a readable safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "empty")
    _one_line(info, "model.safetensors")


def test_dust3r_checkpoint_is_named(tmp_path):
    dust3r = {"patch_embed.proj.weight": torch.zeros(4, 3, 16, 16), "enc_blocks.0.attn.qkv.weight": torch.zeros(12, 4)}
    torch.save({"args": argparse.Namespace(model="AsymmetricCroCo3DStereo()"), "model": dust3r}, tmp_path / "d.pth")
    save_file(dust3r, str(tmp_path / "d.safetensors"), metadata={"pqk_config": "{}"})
    for name in ("d.pth", "d.safetensors"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        _one_line(info, "looks like a DUSt3R checkpoint (family dust3r), not CLIP")


def test_key_mismatches_are_counted(tmp_path):
    _, weights, _ = _case("tiny_vit_b")
    save_file({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "other.safetensors")
    _one_line(info, "is not a CLIP checkpoint in any known layout: 6 keys missing (positional_embedding",
              "2 unexpected (", "foo.weight", "bar")
    partial = {k: v for k, v in weights.items() if k != "visual.ln_post.bias"} | {"extra.thing": torch.zeros(1)}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "partial.safetensors")
    _one_line(info, "1 key missing (visual.ln_post.bias), 1 unexpected (extra.thing)")
    save_file(weights | {"logit_scale": torch.tensor(float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nan.safetensors")
    _one_line(info, "logit_scale", "NaN")
    save_file(weights | {"ln_final.bias": torch.zeros(3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "shape.safetensors")
    _one_line(info, "ln_final.bias", "(3,)")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "lit.safetensors"), metadata={"pqk_kind": "lit-minilm"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "lit.safetensors")
    _one_line(info, "pqk lit-minilm file, not a CLIP")


# --- bad model inputs: one line each ----------------------------------------------------------------


def test_bad_inputs_are_one_line():
    args, weights, io = _case("tiny_vit_b")
    model = _model(args, weights)
    image, text = io["image"], io["text"]
    cases = [
        (lambda: model.encode_image(image[:, :, :8, :8]), "8x8 pixels; this CLIP takes 12x12"),
        (lambda: model.encode_image(image[:, :2]), "(N, 3, 12, 12)"),
        (lambda: model.encode_image(image[0]), "(N, 3, 12, 12)"),
        (lambda: model.encode_image((image * 255).to(torch.uint8)), "uint8"),
        (lambda: model.encode_image([1, 2]), "got list"),
        (lambda: model.encode_text(text[:, :10]), "10 positions; this CLIP takes exactly 12"),
        (lambda: model.encode_text(text[0]), "(N, 12) integer tensor"),
        (lambda: model.encode_text(text.float()), "(N, 12) integer tensor"),
        (lambda: model.encode_text(text + 100), "outside the vocabulary [0, 100)"),
        (lambda: model(image, text[:, :5]), "takes exactly 12"),
    ]
    for call, part in cases:
        with pytest.raises(InputError) as info:
            call()
        _one_line(info, part)


# --- image preprocessing --------------------------------------------------------------------------


def test_preprocessing_constants_are_official():
    require_clip_conformance()
    spec = json.loads((CLIP_DIR / "official_keys" / "preprocessing.json").read_text())
    normalize = next(s for s in spec["steps"] if s["op"] == "normalize")
    assert list(CLIP_MEAN) == normalize["mean"] and list(CLIP_STD) == normalize["std"]


def test_resize_and_crop_arithmetic():
    assert resized_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = int(298.67): truncated
    assert resized_size(480, 640, 224) == (224, 298)
    assert resized_size(300, 300, 224) == (224, 224)
    assert crop_box(10, 13, 10) == (0, 2, 10, 12)  # round(1.5) = 2
    assert crop_box(10, 15, 10)[1] == 2  # round(2.5) = 2: half to even, not 3
    assert crop_box(10, 17, 10)[1] == 4  # round(3.5) = 4


@pytest.mark.parametrize("height,top", [(13, 2), (15, 2), (17, 4)])
def test_crop_offset_in_pixels(height, top):
    rows = np.repeat(np.arange(height, dtype=np.uint8)[:, None] * 10, 10, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, axis=-1))  # 10 wide: no resize, only the crop
    unit = to_unit_tensor(image, 10)
    assert unit.shape == (3, 10, 10) and unit.dtype == torch.float32
    assert round(float(unit[0, 0, 0]) * 255) == top * 10


def test_alpha_is_dropped_not_composited():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing would change every pixel
    unit = to_unit_tensor(Image.fromarray(rgba, "RGBA"), 16)
    assert torch.equal(unit, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255)


def test_preprocess_matches_pil_pipeline():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    expected = image.resize((28, 20), Image.Resampling.BICUBIC).crop((4, 0, 24, 20))
    unit = to_unit_tensor(image, 20)
    assert torch.equal(unit, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255)
    normed = preprocess_image(image.convert("L"), 20)
    assert normed.shape == (3, 20, 20)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(preprocess_image(image, 20), (unit - mean) / std)
    with pytest.raises(InputError):
        preprocess_image(np.zeros((4, 4, 3)), 20)
