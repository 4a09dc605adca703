"""Our CLIP tokenizer against the official `clip.tokenize` ids (../shared/conformance/clip)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED

from pqk.errors import InputError
from pqk.models.clip import SimpleTokenizer, tokenize
from pqk.models.clip.tokenizer import VOCAB_FILE, clean_text, default_tokenizer

CLIP_DIR = SHARED / "conformance" / "clip"
CASES_FILE = CLIP_DIR / "tokenizer_cases.json"


def require_clip_conformance() -> Path:
    """The CLIP conformance folder; CI must have it (fail), a laptop without it skips."""
    if not CASES_FILE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CLIP conformance data not found at {CLIP_DIR} (set PQK_SHARED)")
        pytest.skip(f"CLIP conformance data not found at {CLIP_DIR}")
    return CLIP_DIR


def _cases() -> list[dict]:
    return json.loads(CASES_FILE.read_text())["cases"] if CASES_FILE.is_file() else []


CASES = _cases()


@pytest.fixture(scope="module")
def header() -> dict:
    require_clip_conformance()
    return json.loads(CASES_FILE.read_text())


def test_cases_present(header):
    assert len(CASES) >= 30
    assert header["context_length"] == 77 and header["ids_dtype_returned_by_official"] == "int32"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_exact(case):
    ids = tokenize(case["text"])
    assert ids.dtype == torch.int32 and ids.shape == (1, 77)
    assert ids[0].tolist() == case["ids"]
    assert clean_text(case["text"]) == case["cleaned_text"]
    pieces = default_tokenizer().pieces(case["text"])
    assert pieces == case["bpe_pieces"]
    assert len(pieces) + 2 == case["n_tokens_untruncated"]
    assert (len(pieces) + 2 > 77) == case["truncated"]
    assert int(ids[0].argmax()) == case["pool_index_argmax"]


def test_batch_equals_rows():
    require_clip_conformance()
    ids = tokenize([c["text"] for c in CASES])
    assert ids.dtype == torch.int32 and ids.shape == (len(CASES), 77)
    assert ids.tolist() == [c["ids"] for c in CASES]


def test_vocabulary(header):
    tok = default_tokenizer()
    assert tok.vocab_size == header["vocab_size"] == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (header["sot_id"], header["eot_id"])
    assert tok.decoder[0] == "!"  # padding reuses id 0, the symbol '!'
    assert tok.decoder[256] == "!</w>" and tok.decoder[512] == "in"  # bytes, bytes + </w>, merges
    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == header["vocab_file_sha256"]
    assert (VOCAB_FILE.with_name("bpe_simple_vocab_16e6.LICENSE.txt")).is_file()


def test_vocabulary_ships_with_the_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"models/clip/*.gz"' in pyproject and '"models/clip/*.txt"' in pyproject
    assert '"ftfy==6.3.1"' in pyproject and '"regex>=2024"' in pyproject
    assert VOCAB_FILE.parent == Path(__import__("pqk.models.clip", fromlist=["x"]).__file__).parent


def test_other_context_lengths():
    full = tokenize("a photo of a cat")[0].tolist()
    short = tokenize("a photo of a cat", context_length=16)
    assert short.dtype == torch.int32 and short.shape == (1, 16)
    assert short[0].tolist() == full[:16]
    cut = tokenize("a photo of a cat", context_length=4)[0].tolist()
    assert cut == full[:3] + [49407]  # truncated: first ids kept, the last overwritten with EOT
    assert tokenize(["", "x"], context_length=2).tolist() == [[49406, 49407], [49406, 49407]]


def test_truncation_boundary():
    require_clip_conformance()
    by_name = {c["name"]: c for c in CASES}
    exact = by_name["exactly_77_no_truncation"]
    assert tokenize(exact["text"], truncate=False)[0].tolist() == exact["ids"]  # 75 BPE tokens fit
    over = by_name["78_truncated_by_one"]
    assert tokenize(over["text"])[0].tolist() == over["ids"]
    assert over["ids"][-1] == 49407


def test_truncate_false_is_one_line():
    require_clip_conformance()
    long = next(c for c in CASES if c["name"] == "long_truncated")
    with pytest.raises(InputError) as info:
        tokenize(["short", long["text"]], truncate=False)
    message = str(info.value)
    assert "\n" not in message and "126 tokens" in message and "context length 77" in message
    assert long["text"][:20] in message and len(message) < 200


def test_bad_arguments_are_one_line():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError):
            tokenize("x", context_length=bad)
    with pytest.raises(InputError):
        tokenize(["ok", 3])


def test_literal_special_tokens_and_decode():
    tok = SimpleTokenizer()
    a, b = tok.encoder["a</w>"], tok.encoder["b</w>"]
    ids = tokenize("a<|endoftext|>b")[0].tolist()
    assert ids[:5] == [49406, a, 49407, b, 49407]  # the literal string is a real EOT
    assert tok.decode(tok.encode("Hello, wörld!")) == "hello , wörld ! "
    assert tok.decode(torch.tensor(tok.encode("日本"))) == "日本 "


def test_bpe_merges_every_occurrence():
    tok = default_tokenizer()
    pieces = tok.pieces("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    assert "".join(pieces).replace("</w>", "") == "a" * 36 and pieces[-1].endswith("</w>")
    assert tok.pieces("1234") == ["1</w>", "2</w>", "3</w>", "4</w>"]  # one token per digit
