"""The official CLIP tokenizer: lower-cased byte-level BPE, 49,408 ids.

Written from clip-facts.md section 5. The merges file `bpe_simple_vocab_16e6.txt.gz` ships
beside this module (OpenAI's file, unchanged; MIT licence in
bpe_simple_vocab_16e6.LICENSE.txt). The clean-up depends on ftfy (pinned to 6.3.1) and the
pre-tokenisation on the Unicode tables of the `regex` module: both decide exact ids.
"""

from __future__ import annotations

import gzip
import html
import itertools
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from pqk.errors import InputError

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # 48,894 merges used: file lines 2 .. 48,895 (line 1 is a version header)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Alternatives in order: the special strings, English contractions, a run of letters, ONE number
# character, a run of anything that is not space/letter/number. IGNORECASE as official (the text
# is lower-cased first, so it only matters for characters like 'ſ' that case-fold to ASCII).
PRE_TOKEN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")


def byte_symbols() -> dict[int, str]:
    """Byte -> printable symbol, in vocabulary order: the printable Latin-1 bytes map to
    themselves (listed first), the other 68 bytes to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """The official clean-up: ftfy, HTML-unescape twice, strip, collapse Unicode whitespace, lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return WHITESPACE.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """Byte-level BPE with the official vocabulary, ids and special tokens."""

    def __init__(self, bpe_path: str | Path = VOCAB_FILE):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {piece: i for i, piece in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(vocab)
        # Special strings skip BPE; the cache is keyed by the byte-symbol spelling of a pre-token.
        self._cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

    def bpe(self, token: str) -> tuple[str, ...]:
        """Vocabulary pieces of one pre-token already spelled in byte symbols."""
        if token in self._cache:
            return self._cache[token]
        word = (*token[:-1], token[-1] + END_OF_WORD)
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[token] = word
        return word

    def pieces(self, text: str) -> list[str]:
        """Vocabulary strings of `text` (cleaned, pre-tokenised, BPE), without SOT/EOT."""
        out: list[str] = []
        for token in PRE_TOKEN.findall(clean_text(text)):
            out.extend(self.bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT."""
        return [self.encoder[p] for p in self.pieces(text)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids; '</w>' becomes a space, bytes that are not UTF-8 become U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray()
        for part in regex.split(f"({regex.escape(SOT)}|{regex.escape(EOT)})", text):
            raw += part.encode() if part in (SOT, EOT) else bytes(self.byte_decoder[c] for c in part)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


@lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The tokenizer with the shipped vocabulary, built once (reading the file takes ~0.3 s)."""
    return SimpleTokenizer()


def _shortened(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = True) -> torch.IntTensor:
    """(len(texts), context_length) int32 ids: [SOT] + BPE ids + [EOT], zero-padded.

    Longer texts with truncate=True keep the first context_length ids and end with EOT (the last
    one is overwritten); with truncate=False they are a one-line InputError. 75 BPE tokens fit
    in 77."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise InputError(f"context_length must be a positive integer, got {context_length!r}")
    if not all(isinstance(t, str) for t in texts):
        raise InputError("tokenize takes a string or a list of strings")
    tok = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    for row, text in enumerate(texts):
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise InputError(f"text {_shortened(text)} is {len(ids)} tokens long, more than the context length "
                                 f"{context_length} (pass truncate=True to cut it)")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return result
