"""A stack call's step decided on the host from Python integers, without building its token context.

Graph capture run eagerly on the host (and counts mode in particular) pays for every tensor op on the model's
thread, and inside a decode loop, with caches cold after the model's own work, each costs several microseconds.
For the calls where the general path (:func:`.graph_capture._positions_and_valid` and ``record_step``) would
reduce the step to integers, these functions decide it from the arguments directly: the same answer, from a
strict subset of the calls (anything else returns None and takes the general path).
"""

from __future__ import annotations

from typing import Any

import torch

from . import contracts
from .token_context import NEW, ContextReader, TokenContext, is_cache

def plain_context(ctx: TokenContext, past: Any) -> bool:
    """Does _positions_and_valid reduce to integers here: every token real, positions past + 0..seq_len-1 (an int
    cache length, or no cache and a new sequence)? Then a step starts new sequences exactly when past is 0."""
    if ctx.attention_mask is not None or ctx.mask_4d is not None or ctx.position_ids is not None:
        return False
    return isinstance(past, int) or (past is None and ctx.continuity == NEW)


def plain_call(reader: ContextReader, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, bool, int, torch.Tensor] | None:
    """(batch, seq_len, new sequences, cache length (0 without a cache), token ids) of a stack call given 2-D
    integer token ids, no mask, no positions, and no cache or one whose length is an int: the calls where
    ContextReader.read and plain_context would reduce the step to integers (positions past + 0..seq_len-1, every token
    real), decided without building the context (the per-step cost of counts mode and of graph capture on the
    host). None for every other call, which takes the general path (same result there: a strict subset of it)."""
    ids, mask, positions = _arguments(reader, args, kwargs)
    if mask is not None or positions is not None or ids is None:
        return None
    batch, seq_len = int(ids.shape[0]), int(ids.shape[1])
    found, past = reader._cache(args, kwargs)
    if not found:
        return batch, seq_len, True, 0, ids  # no cache: the call sees whole, new sequences
    if past is None:
        return None  # a device tensor (static caches): positions from it on the general path
    return batch, seq_len, past == 0, past, ids


def cache_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The KV cache's length as the model sees it: an int, a device tensor (static caches), or None (no cache)."""
    for value in (*kwargs.values(), *args):
        if is_cache(value):
            return value.get_seq_length()
    return None


def counts_call(reader: ContextReader, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, bool] | None:
    """(batch, seq_len, new sequences) of a stack call whose tokens are all real, for counts mode: what counting
    needs, decided as the general path decides it, with or without a 2-D attention mask and 2-D positions (what
    ``generate()`` passes). A mask with padding among the call's own tokens, a 4-D or per-type mask, 3-D positions,
    a cache whose length is a device tensor, or tensors off the host: None (the general path leaves padding out
    of the counts).

    New sequences, as ``record_step`` decides them (every row's first real position is 0), for an all-real call:
    from the positions when given; else, with a mask the general path turns into positions (no cache, or a mask
    covering the cache and the call), when no row has a real token before the call's; else from the cache
    length (0: new); without a cache, new."""
    ids, mask, positions = _arguments(reader, args, kwargs)
    if ids is None:
        return None
    batch, seq_len = int(ids.shape[0]), int(ids.shape[1])
    found, past = reader._cache(args, kwargs)
    if found and past is None:
        return None  # a cache whose length is not an int here: the general path reads it
    if mask is None and positions is None:
        return batch, seq_len, past == 0 if found else True  # plain_call's answer
    if batch == 0 or seq_len == 0:
        return None
    # Reads of a few values through tolist(), one torch op at most each: measured inside the decode loop (caches
    # cold after the model's own work), a numpy view and reduction of the same cost 70 to 90 us, these 20 to 25.
    if mask is not None:
        if (
            not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq_len
            or not mask.is_cpu or not (mask.dtype == torch.bool or mask.dtype in contracts.INTEGER_DTYPES)
        ):
            return None
        # Padding among this call's tokens: counted per token on the general path (0 == False, so bool masks too).
        if 0 in mask[:, -1].tolist() if seq_len == 1 else not bool(mask[:, -seq_len:].all()):
            return None
    if positions is not None:
        if (
            not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != seq_len
            or positions.shape[0] not in (batch, 1) or not positions.is_cpu or positions.dtype not in contracts.INTEGER_DTYPES
        ):
            return None
        values = positions.reshape(-1).tolist()
        if seq_len == 1:
            new = values.count(0) == len(values)  # every row's one position is 0
        else:
            new = all(min(values[row : row + seq_len]) == 0 for row in range(0, len(values), seq_len))
    elif mask is not None and (not found or mask.shape[1] == past + seq_len):  # type: ignore[operator]
        # Positions from the mask's running count: new when no row has a real token before this call's.
        new = mask.shape[1] == seq_len or not bool(mask[:, : mask.shape[1] - seq_len].any())
    else:
        new = past == 0 if found else True
    return batch, seq_len, new


def _arguments(reader: ContextReader, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, Any, Any]:
    """(2-D integer token ids or None, the attention mask, the positions) as the stack call was given them."""
    if args:
        mask, positions = reader._arg("attention_mask", args, kwargs), reader._arg("position_ids", args, kwargs)
        ids = reader._token_ids(args, kwargs)
    else:
        # Keywords only (a causal LM calls its stack so): _arg is kwargs.get, and _token_ids too unless the
        # token ids come from a user's selector.
        get = kwargs.get
        mask, positions = get("attention_mask"), get("position_ids")
        tokens = reader._tokens
        ids = get(tokens) if isinstance(tokens, str) else reader._token_ids(args, kwargs)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in contracts.INTEGER_DTYPES:
        ids = None
    return ids, mask, positions
