"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then three specials.

No vocabulary file is needed, so the demo works from the package alone and any text (code, prose,
numbers, JSON) round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259


def encode(text: str, *, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS_ID, *ids] if bos else ids


def decode(ids: Iterable[int]) -> str:
    # Specials are dropped; a continuation cut mid-character decodes with a replacement mark.
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
