"""Token ids -> text with the tokenizer the manifest names, from local files only.

The manifest's ``model.tokenizer`` is a directory (``save_pretrained`` output) or a Hugging Face repo id. Only
files already on this machine are read: the directory's ``tokenizer.json``, or the one in the local Hugging
Face cache (``try_to_load_from_cache`` looks at the cache and never at the network, the same guarantee as
``HF_HUB_OFFLINE=1``). Without ``tokenizers`` installed or without such a file, there is no decoder and the
Tokens screen shows bytes (byte-level models) or ``⟨id⟩``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

Decoder = Callable[[int], str]


def tokenizer_file(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local ``tokenizer.json`` for ``name`` (a directory or a cached repo id), or None."""
    if not name:
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        candidate = local / "tokenizer.json"
        return candidate if candidate.is_file() else None
    if local.is_file() and local.name.endswith(".json"):
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "tokenizer.json", cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception:  # noqa: BLE001 - a name that is not a valid repo id is simply not in the cache
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


@lru_cache(maxsize=8)
def load_decoder(name: str, cache_dir: str | None = None) -> Decoder | None:
    """A function decoding one token id, or None when the tokenizer cannot be loaded from local files."""
    path = tokenizer_file(name, cache_dir)
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - missing package or an unreadable file: fall back to ids, never crash
        return None
    size = tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(token_id: int) -> str:
        if token_id < 0 or token_id >= size:
            return f"⟨{token_id}⟩"
        piece = tokenizer.decode([token_id], skip_special_tokens=False)
        return piece if piece else (tokenizer.id_to_token(token_id) or f"⟨{token_id}⟩")

    return decode
