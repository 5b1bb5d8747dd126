"""Byte-level tokenizer: token id = UTF-8 byte value, vocabulary 256.

With this tokenizer every token is exactly one byte of the text, so the mean next-token loss in
nats divided by ln 2 is already bits per byte; no per-token byte table is needed (but
`token_byte_lengths` provides one so metrics code can stay tokenizer-agnostic).
"""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Text <-> UTF-8 bytes as integer ids 0..255."""

    name = "bytes"
    vocab_size = 256
    dtype = np.uint8  # storage dtype of token files: one byte per token

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of `text` as a uint8 array (a copy, writable)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        """Text of a sequence of ids; invalid UTF-8 (a sampled byte sequence can be) becomes
        U+FFFD instead of raising."""
        data = bytes(int(i) & 0xFF for i in _as_list(ids))
        return data.decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text per token id: all ones for the byte tokenizer."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size,
                "dtype": np.dtype(self.dtype).name}


def _as_list(ids) -> list:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return list(ids)


TOKENIZERS = {"bytes": ByteTokenizer}


def get_tokenizer(name: str = "bytes") -> ByteTokenizer:
    """Tokenizer by name; only 'bytes' exists."""
    if name not in TOKENIZERS:
        from resstream.errors import UserError

        raise UserError(f"tokenizer {name!r} is unknown; allowed: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
