"""Token offsets of ASCII text under byte-level BPE tokenizers, from the token ids alone.

Why this file exists: the SFT loss mask needs each token's character range (``encode.py``).
Asking the Rust tokenizer for offsets (``encode_batch``) makes it track them, and reading them
back builds a Python tuple per token and a numpy array per row: about a fifth of a chunk's
encoding time on English rows. For a byte-level BPE tokenizer whose pipeline neither rewrites
nor trims the text (no normaliser, no prefix space, no offset trimming, no stripping added
tokens), the tokens of a text are consecutive pieces of its UTF-8 bytes in order, so a token's
byte range is the running sum of its vocabulary entry's byte length. On ASCII text a byte is a
character, so these ranges ARE the character offsets the tokenizer would report: the ids from
``encode_batch_fast`` (no offsets tracked) and one table lookup give the same mask.

Non-ASCII texts keep the tokenizer's own offsets (its character offsets of a token that splits
a multi-byte character follow rules of their own). Every row checks that its tokens' bytes add
up to the text's length; a row that does not (an id outside the table, or a pipeline that added
or removed bytes after all) falls back to the tokenizer's offsets too.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np

# Pre-tokenizers that only split (never add, drop or rewrite characters), and ByteLevel itself.
_SPLITTERS = {"Split", "Digits", "Punctuation"}
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parts(node: dict | None, key: str) -> list[dict]:
    """The components of a (possibly ``Sequence``) pipeline stage."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [p for sub in node[key] for p in _parts(sub, key)]
    return [node]


def _eligible(cfg: dict) -> bool:
    model = cfg.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix"):
        return False
    if model.get("end_of_word_suffix") or cfg.get("normalizer") is not None:
        return False
    pre = _parts(cfg.get("pre_tokenizer"), "pretokenizers")
    levels = [p for p in pre if p["type"] == "ByteLevel"]
    if not levels or any(p.get("add_prefix_space") for p in levels):
        return False
    for p in pre:
        if p["type"] != "ByteLevel" and (
            p["type"] not in _SPLITTERS or p.get("behavior") == "Removed"
        ):
            return False
    for p in _parts(cfg.get("post_processor"), "processors"):
        # TemplateProcessing adds nothing without special tokens (we encode without them).
        if p["type"] == "ByteLevel" and p.get("trim_offsets"):
            return False
        if p["type"] not in ("ByteLevel", "TemplateProcessing"):
            return False
    return not any(t.get("lstrip") or t.get("rstrip") for t in cfg.get("added_tokens") or [])


def byte_length_table(tokenizer: Any, backend: Any) -> np.ndarray | None:
    """[V] int64 UTF-8 byte length of every token id (-1: unknown), or None when the tokenizer
    is not a plain byte-level BPE. Built once per tokenizer object (vocabulary size checked)."""
    hit = _TABLES.get(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    if hit is not None and hit[0] == size:
        return hit[1]
    table = None
    if _eligible(json.loads(backend.to_str())):
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = set(ByteLevel.alphabet())  # one character per byte
        vocab = backend.get_vocab(with_added_tokens=False)
        table = np.full(max([size, *vocab.values()]) + 1, -1, np.int64)
        for tok, i in vocab.items():
            if all(c in alphabet for c in tok):
                table[i] = len(tok)
        for i, added in backend.get_added_tokens_decoder().items():
            table[i] = len(added.content.encode("utf-8"))  # matched in the raw text
    _TABLES[tokenizer] = (size, table)
    return table


def ascii_offsets(table: np.ndarray, ids: np.ndarray, n_chars: int) -> np.ndarray | None:
    """[T, 2] character offsets of an ASCII text's tokens ``ids`` (int32 [T]), or None when the
    tokens' bytes do not add up to the text's ``n_chars``."""
    lens = table[ids]  # [T]
    if (lens < 0).any():
        return None
    ends = np.cumsum(lens)
    if (ends[-1] if len(ends) else 0) != n_chars:
        return None
    return np.stack([ends - lens, ends], axis=1)
