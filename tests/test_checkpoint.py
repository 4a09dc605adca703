"""Loading the three checkpoint layouts, strictly and safely."""

from __future__ import annotations

import argparse
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_KWARGS, conformance_cases, decompress_case_weights, read_case_config, require_conformance
from pqk.errors import CheckpointError, ConfigError
from pqk.models.dust3r import build_model, load_checkpoint, parse_constructor_string, save_model
from pqk.models.dust3r.config import config_from_kwargs


def _dpt_case():
    require_conformance()
    for case in conformance_cases():
        if read_case_config(case)["constructor_kwargs"].get("head_type") == "dpt":
            return case
    pytest.skip("no DPT conformance case")


def _official_string(kwargs: dict) -> str:
    """The README training-command form: ManyAR patch embed, no landscape_only, Python literals."""
    kw = {k: v for k, v in kwargs.items() if k != "landscape_only"}
    kw["patch_embed_cls"] = "ManyAR_PatchEmbed"
    def lit(v):
        if isinstance(v, list):
            return "(" + ", ".join(lit(x) for x in v) + ")"
        if v in ("inf", "-inf"):
            return v
        return repr(v)
    return "AsymmetricCroCo3DStereo(" + ", ".join(f"{k}={lit(v)}" for k, v in kw.items()) + ")"


@pytest.fixture(scope="module")
def dpt_case_files(tmp_path_factory):
    case = _dpt_case()
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = read_case_config(case)
    weights = load_file(str(decompress_case_weights(case, folder)))
    io = load_file(str(case / next(iter(cfg["io_cases"].values()))["file"]))
    return case, cfg, weights, io, folder


def _run(model, io):
    v1 = {"img": io["view1.img"], "true_shape": io["view1.true_shape"]}
    v2 = {"img": io["view2.img"], "true_shape": io["view2.true_shape"]}
    with torch.no_grad():
        r1, r2 = model(v1, v2)
    return r1["pts3d"], r2["pts3d_in_other_view"], r1["conf"], r2["conf"]


def _assert_reproduces(model, io):
    ours = _run(model, io)
    refs = (io["pred1.pts3d"], io["pred2.pts3d_in_other_view"], io["pred1.conf"], io["pred2.conf"])
    for a, b in zip(ours, refs):
        assert a.shape == b.shape
        assert float((a - b).norm() / b.norm()) <= 1e-4


def test_official_pth_layout_loads(dpt_case_files):
    case, cfg, weights, io, folder = dpt_case_files
    path = folder / "official.pth"
    torch.save({"args": argparse.Namespace(model=_official_string(cfg["constructor_kwargs"])), "model": weights}, path)
    model = load_checkpoint(path)
    assert model.config.patch_embed_cls == "PatchEmbedDust3R"  # the official loader's rewrite
    assert model.config.landscape_only is False
    _assert_reproduces(model, io)


def test_hugging_face_layout_loads_without_alias_keys(dpt_case_files):
    case, cfg, weights, io, folder = dpt_case_files
    hf = folder / "hf"
    hf.mkdir()
    kwargs = {k: (float(v) if v in ("inf", "-inf") else v) for k, v in cfg["constructor_kwargs"].items()}
    kwargs["depth_mode"] = ["exp", -math.inf, math.inf]
    kwargs["conf_mode"] = ["exp", 1, math.inf]
    (hf / "config.json").write_text(json.dumps(kwargs))  # writes Infinity, as the HF mixin does
    assert "Infinity" in (hf / "config.json").read_text()
    deduped = {k: v for k, v in weights.items() if ".scratch.layer_rn." not in k}
    assert len(deduped) == len(weights) - 8
    save_file(deduped, str(hf / "model.safetensors"))
    for path in (hf, hf / "config.json", hf / "model.safetensors"):
        _assert_reproduces(load_checkpoint(path), io)


def test_conflicting_alias_values_are_refused(dpt_case_files, tmp_path):
    case, cfg, weights, io, folder = dpt_case_files
    bad = dict(weights)
    key = next(k for k in bad if ".scratch.layer_rn.0." in k)
    bad[key] = bad[key] + 1
    path = tmp_path / "bad.pth"
    torch.save({"args": argparse.Namespace(model=_official_string(cfg["constructor_kwargs"])), "model": bad}, path)
    with pytest.raises(CheckpointError, match="different values"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pqk_save_and_reload_is_exact(tiny_model, tmp_path, suffix):
    path = save_model(tiny_model, tmp_path / f"m{suffix}", history=[{"step": "none"}])
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config
    assert loaded.pqk_history == [{"step": "none"}]
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not list(tmp_path.glob(".*tmp")), "atomic write leaves no temp file"


def test_pqk_pth_is_readable_by_the_official_loader_shape(tiny_model, tmp_path):
    # The official loader reads args.model and model; check both are there and parse.
    path = save_model(tiny_model, tmp_path / "m.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, weights_only=True)
    kwargs = parse_constructor_string(ckpt["args"].model)
    assert config_from_kwargs(**kwargs) == tiny_model.config


def test_wrong_architecture_fails_with_one_line(tiny_model, tmp_path):
    other = build_model(**{**TINY_KWARGS, "enc_depth": 3})
    path = tmp_path / "wrong.pth"
    torch.save({"args": argparse.Namespace(model=_official_string({**TINY_KWARGS, "img_size": [64, 96]})),
                "model": other.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and "unexpected keys: enc_blocks.2." in msg


def test_shape_mismatch_names_the_key(tmp_path):
    small = build_model(**TINY_KWARGS)
    sd = small.state_dict()
    sd["decoder_embed.bias"] = torch.zeros(7)
    path = tmp_path / "shape.pth"
    torch.save({"args": argparse.Namespace(model=_official_string({**TINY_KWARGS, "img_size": [64, 96]})), "model": sd}, path)
    with pytest.raises(CheckpointError, match=r"decoder_embed.bias has shape \(7,\)"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": {}, "args": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("CroCoNet(enc_depth=2)", "not a DUSt3R"),
        ("AsymmetricCroCo3DStereo(enc_depth=__import__('os').getpid())", "not a literal"),
        ("AsymmetricCroCo3DStereo(enc_depth=", "syntax"),
        ("AsymmetricCroCo3DStereo(2)", "positional"),
    ],
)
def test_constructor_string_is_parsed_as_data(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_constructor_string(text)


def test_constructor_string_literals():
    kw = parse_constructor_string(
        "AsymmetricCroCo3DStereo(pos_embed='RoPE100', img_size=(512, 512), depth_mode=('exp', -inf, inf), "
        "conf_mode=('exp', 1, inf), landscape_only=False)"
    )
    assert kw["depth_mode"] == ("exp", -math.inf, math.inf) and kw["img_size"] == (512, 512)
    assert kw["landscape_only"] is False


def test_non_checkpoint_files_fail_cleanly(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a zip")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    (tmp_path / "dict.pth").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pth")
    for name, match in [("missing.pth", "does not exist"), ("notes.txt", "unknown format"),
                        ("junk.pth", "not a readable|refused"), ("junk.safetensors", "not a readable"),
                        ("dict.pth", "not a DUSt3R"), (".", "config.json")]:
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / name)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"enc_embed_dim": 60, "enc_num_heads": 4}, "divisible by 4"),
        ({"head_type": "dpt", "dec_depth": 8}, "dec_depth > 9"),
        ({"pos_embed": "cosine"}, "RoPE"),
        ({"depth_mode": ("exp", 0, "inf")}, "depth_mode"),
        ({"bogus": 1}, "unknown DUSt3R constructor argument 'bogus'"),
        ({"block_widths": {"enc_heads": [4]}}, "entries"),
    ],
)
def test_build_model_rejects_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(**{**TINY_KWARGS, **kwargs})


def test_inf_strings_are_accepted():
    model = build_model(**{**TINY_KWARGS, "depth_mode": ["exp", "-inf", "inf"], "conf_mode": ["exp", 1, "inf"]})
    assert model.config.conf_mode == ("exp", 1, math.inf)
