"""Stable Diffusion's prompt tokenisation, offline, from the BPE list open_clip ships.

Both SD generations use OpenAI CLIP's byte-level BPE (49,408 ids: 256 byte symbols, the
same with ``</w>``, 48,894 merges, then start 49406 and end 49407) and a 77-token context:
``[49406, *tokens[:75], 49407, pad...]``. They differ in padding and text cleaning:

- ``"sd1"`` follows ``FrozenCLIPEmbedder``: Hugging Face's ``CLIPTokenizer`` of
  ``openai/clip-vit-large-patch14`` called with ``padding="max_length", max_length=77,
  truncation=True``. Pads with the end token 49407. Cleaning as the tokenizer SD 1.x ran
  with (transformers 4.x, ftfy installed): ``ftfy.fix_text``, whitespace runs to one space,
  strip, lower-case. With ``fix_text=False`` it is NFC, whitespace, lower-case instead,
  which is what transformers >= 5's (Rust-backed) ``CLIPTokenizer`` does; the two differ
  only on text ftfy repairs (curly quotes, full-width letters, ligatures, mojibake, HTML
  entities). The literals ``<|startoftext|>`` / ``<|endoftext|>`` are the special ids.
- ``"sd2"`` follows ``FrozenOpenCLIPEmbedder``: ``open_clip.tokenize``. Pads with 0.
  Cleaning: ``ftfy.fix_text``, HTML unescaped twice, strip, whitespace, lower-case. The
  literals ``<start_of_text>`` / ``<end_of_text>`` are the special ids.

Prompt-weighting syntax such as ``(red:1.2)`` is not parsed: it is tokenised literally,
as both references do.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import ftfy
import regex
import torch

TokenizerKind = Literal["sd1", "sd2"]
CONTEXT_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_ID, END_ID = 49406, 49407
N_MERGES = 49152 - 256 - 2  # merges CLIP uses out of the file (first line is a header)
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Special-token literals each reference recognises inside a prompt (start, end).
_LITERALS: dict[str, tuple[str, str]] = {
    "sd1": ("<|startoftext|>", "<|endoftext|>"),
    "sd2": ("<start_of_text>", "<end_of_text>"),
}
_PAD_ID: dict[str, int] = {"sd1": END_ID, "sd2": 0}


def bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip.

    Raises ``FileNotFoundError`` when open_clip (``open-clip-torch``) is not installed.
    """
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / BPE_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{BPE_FILE} not found: install open-clip-torch, which ships it")
    return path


@lru_cache
def byte_symbols() -> dict[int, str]:
    """CLIP's reversible byte -> character map (GPT-2's ``bytes_to_unicode``).

    Printable bytes map to themselves, the others to U+0100 onwards; the dict's order
    (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


@lru_cache
def bpe_tables(path: str | None = None) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """``(vocabulary, merge ranks)`` of CLIP's BPE: token -> id and pair -> priority.

    The vocabulary is the 256 byte symbols, the same with ``</w>``, each merge joined, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 entries.
    """
    lines = gzip.open(path or bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


def _whitespace(text: str) -> str:
    """Runs of whitespace (Unicode ``White_Space``, as ``regex``'s ``\\s``) to one space."""
    return regex.sub(r"\s+", " ", text).strip()


class ClipTokenizer:
    """Prompts -> ``(B, context_length)`` int64 token ids, as SD 1.x or SD 2.x makes them.

    ``kind``: ``"sd1"`` (Hugging Face ``CLIPTokenizer``, end-token padding) or ``"sd2"``
    (``open_clip.tokenize``, zero padding); see the module docstring. ``fix_text`` (sd1
    only) picks ftfy cleaning (SD 1.x as released) or transformers >= 5's NFC. Raises
    ``ValueError`` for an unknown kind, a context shorter than 2, or ``fix_text=False``
    with sd2 (open_clip always applies ftfy).
    """

    def __init__(
        self,
        kind: TokenizerKind = "sd1",
        *,
        fix_text: bool = True,
        context_length: int = CONTEXT_LENGTH,
        bpe_file: str | Path | None = None,
    ) -> None:
        if kind not in _PAD_ID:
            raise ValueError(f"tokenizer kind must be 'sd1' or 'sd2', got {kind!r}")
        if kind == "sd2" and not fix_text:
            raise ValueError("sd2 tokenisation (open_clip) always applies ftfy: fix_text=True")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.kind, self.fix_text, self.context_length = kind, fix_text, context_length
        self.start_id, self.end_id, self.pad_id = START_ID, END_ID, _PAD_ID[kind]
        self.vocab, self.ranks = bpe_tables(str(bpe_file) if bpe_file else None)
        start, end = _LITERALS[kind]
        self.specials = {start: START_ID, end: END_ID}
        literals = "|".join(regex.escape(s) for s in self.specials)
        # Hugging Face takes the exact literals out of the raw text first (added tokens).
        # After cleaning, its Python tokenizer (ftfy mode) and open_clip still map a
        # lower-cased literal to its id; transformers >= 5 splits it as plain text.
        self.raw_split = regex.compile(f"({literals})") if kind == "sd1" else None
        self.literal_words = kind == "sd2" or fix_text
        words = literals + "|" + _WORDS if self.literal_words else _WORDS
        self.pattern = regex.compile(words, regex.IGNORECASE)
        self.cache: dict[str, list[int]] = {}

    def clean(self, text: str) -> str:
        """The text as the reference sees it before splitting into words."""
        if self.kind == "sd2":  # open_clip: basic_clean, whitespace_clean (str.split), lower
            text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
            return " ".join(text.split()).lower()
        if self.fix_text:
            text = ftfy.fix_text(text)
        else:
            text = unicodedata.normalize("NFC", text)
        return _whitespace(text).lower()

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-split word (its UTF-8 bytes as symbols, ``</w>`` on the last)."""
        if self.literal_words and word in self.specials:
            return [self.specials[word]]
        if word in self.cache:
            return self.cache[word]
        symbols = [byte_symbols()[b] for b in word.encode("utf-8")]
        parts = symbols[:-1] + [symbols[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts[:-1], parts[1:], strict=True)}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The prompt's token ids, without start, end, padding or truncation."""
        ids: list[int] = []
        for piece in self.raw_split.split(text) if self.raw_split else [text]:
            if self.raw_split and piece in self.specials:
                ids.append(self.specials[piece])
                continue
            ids += [i for word in self.pattern.findall(self.clean(piece)) for i in self.bpe(word)]
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, context_length)`` int64: start, at most ``context_length - 2`` tokens, end, pad.

        Longer prompts are cut, keeping the end token last (both references do so).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(prompts):
            ids = [self.start_id, *self.encode(text)[: self.context_length - 2], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out
