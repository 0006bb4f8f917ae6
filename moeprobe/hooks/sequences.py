"""Deciding sequences, positions and padding from what a stack was called with (writer thread).

The hooks only keep references (:class:`.token_context.TokenContext`); here, on the writer thread that sees the steps
in order, they become per-token columns. Sources, in order of preference:

- positions: ``position_ids`` -> a 2-D mask that covers the whole sequence (cumulative sum) -> the cache length
  -> a 4-D mask row -> ``0..seq_len-1`` for a call that starts new sequences. Otherwise position is -1 and an
  anomaly is counted.
- padding: a 2-D mask -> a 4-D mask (a query is padding when it does not attend to its own cache slot) ->
  none.
- continuity: the cache says (empty = new sequences, filled = the same sequences as the stack's previous call);
  when it cannot say without a sync (static caches), the positions do: a row whose first real token is at
  position 0 starts a new sequence.

Anything that does not fit (a continuation with another batch size, a mask that contradicts the cache) is
counted as an anomaly in the manifest; the trace is never silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .token_context import CONTINUE, NEW, TokenContext

PHASE_PREFILL, PHASE_DECODE = "prefill", "decode"


@dataclass
class ResolvedTokens:
    """Per-token columns of one stack call, flattened row-major (batch, seq_len)."""

    phase: str
    sequence: np.ndarray  # int64
    position: np.ndarray  # int32, -1 where unknown
    token_id: np.ndarray  # int32, -1 where unknown or redacted
    valid: np.ndarray | None  # bool, False for padding; None when every token is real
    seq_base: int

    def count(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else len(self.sequence)


def unmatched_rows(tokens: int, phase: str, seq_base: int) -> ResolvedTokens:
    """Rows for a layer whose token count does not match its stack's inputs (counted as an anomaly)."""
    return ResolvedTokens(
        phase=phase,
        sequence=np.full(tokens, seq_base, np.int64),
        position=np.full(tokens, -1, np.int32),
        token_id=np.full(tokens, -1, np.int32),
        valid=None,
        seq_base=seq_base,
    )


def _attends(mask: np.ndarray) -> np.ndarray:
    """Boolean "attends" from a 4-D mask: bool as is, additive float masks where 0, integer where non-zero."""
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.floating):
        return np.asarray(mask == 0)
    return np.asarray(mask != 0)


def _from_mask_4d(mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(valid (batch, seq_len), positions (batch, seq_len)) from a 4-D mask, or None if it cannot tell.

    The last query of a generation batch is always a real token (batches are left-padded) and attends to its
    own cache slot last (causal), which locates every query's slot. A query is real when it attends to its own
    slot and is not a padding row that the SDPA path "unmasked" to attend everywhere.
    """
    attend = _attends(mask[:, 0])  # (batch, seq_len, kv)
    batch, _, kv = attend.shape
    last = attend[:, -1, :]
    if not last.any(axis=1).all():
        return None
    last_slot = kv - 1 - np.argmax(last[:, ::-1], axis=1)  # (batch,)
    slots = last_slot[:, None] - (seq_len - 1 - np.arange(seq_len))[None, :]
    if (slots < 0).any():
        return None
    rows = np.arange(batch)[:, None]
    own = attend[rows, np.arange(seq_len)[None, :], slots]
    unmasked_everywhere = attend.all(axis=2) & (slots < kv - 1)
    valid = own & ~unmasked_everywhere
    positions = np.take_along_axis(np.cumsum(last, axis=1), slots, axis=1) - 1
    return valid, positions


class SequenceTracker:
    """Assigns sequence ids and resolves token columns, one stack call after another, in step order.

    ``primary_stack`` is the stack whose calls start sequences (the decoder of a causal LM, the encoder of an
    encoder-decoder); another stack's new sequences continue the primary's latest ones when the batch matches
    (a decoder continuing its encoder's rows).
    """

    def __init__(
        self,
        to_numpy: Callable[[Any], np.ndarray | None],
        count_anomaly: Callable[[str], None],
        *,
        primary_stack: int | None = 0,
        redact_tokens: bool = False,
    ) -> None:
        self._np = to_numpy
        self._anomaly = count_anomaly
        self.primary_stack = primary_stack
        self.redact_tokens = redact_tokens
        self.next_sequence = 0
        self._previous: dict[int, tuple[int, int]] = {}  # stack id -> (seq_base, batch) of its latest call
        self._last_primary: tuple[int, int] | None = None

    def resolve(self, ctx: TokenContext) -> tuple[ResolvedTokens, list[tuple[int, str, str]]]:
        """Token columns for one stack call, and the (sequence, key, value) tag rows of the sequences it starts."""
        for problem in ctx.problems:
            self._anomaly(problem)
        batch, seq_len = ctx.batch, ctx.seq_len
        mask_2d = self._np(ctx.attention_mask)
        mask_4d = self._np(ctx.mask_4d)
        valid: np.ndarray | None = None
        from_4d: tuple[np.ndarray, np.ndarray] | None = None
        if mask_2d is not None:
            mask_2d = mask_2d != 0
            valid = mask_2d[:, -seq_len:]
        elif mask_4d is not None:
            from_4d = _from_mask_4d(mask_4d, seq_len)
            if from_4d is None:
                self._anomaly("context:mask_4d_unreadable")
            else:
                valid = from_4d[0]

        position = self._positions(ctx, mask_2d, from_4d)
        continuity = ctx.continuity
        if continuity not in (NEW, CONTINUE):  # the cache could not tell: the positions do
            if position is None:
                self._anomaly("context:continuity_unknown")
                continuity = NEW
            else:
                starts = np.where(valid, position, np.iinfo(np.int64).max) if valid is not None else position
                first = starts.min(axis=1)
                if (first == 0).all():
                    continuity = NEW
                elif (first > 0).all():
                    continuity = CONTINUE
                else:
                    self._anomaly("context:mixed_sequence_starts")
                    continuity = NEW
        if position is None:
            if continuity == NEW:
                position = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, seq_len))
            else:
                self._anomaly("context:position_unknown")
                position = np.full((batch, seq_len), -1, np.int64)

        seq_base, tags = self._sequences(ctx, continuity)
        phase = PHASE_PREFILL if (seq_len > 1 or continuity == NEW) else PHASE_DECODE
        flat_valid = None
        if valid is not None:
            flat_valid = np.ascontiguousarray(valid).reshape(-1)
            if flat_valid.all():
                flat_valid = None
        ids = None if self.redact_tokens else self._np(ctx.input_ids)
        token_id = np.full(batch * seq_len, -1, np.int32) if ids is None else ids.astype(np.int32, copy=False).reshape(-1)
        return (
            ResolvedTokens(
                phase=phase,
                sequence=np.repeat(seq_base + np.arange(batch, dtype=np.int64), seq_len),
                position=np.ascontiguousarray(position, dtype=np.int32).reshape(-1),
                token_id=token_id,
                valid=flat_valid,
                seq_base=seq_base,
            ),
            tags,
        )

    def _positions(
        self, ctx: TokenContext, mask_2d: np.ndarray | None, from_4d: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray | None:
        batch, seq_len = ctx.batch, ctx.seq_len
        position_ids = self._np(ctx.position_ids)
        if position_ids is not None:
            return np.broadcast_to(position_ids.astype(np.int64, copy=False), (batch, seq_len))
        if mask_2d is not None:
            if ctx.past_len is None or mask_2d.shape[1] == ctx.past_len + seq_len:
                return (np.cumsum(mask_2d, axis=1, dtype=np.int64) - 1)[:, -seq_len:]
            # The mask covers a window, not the whole sequence: only an unpadded batch can use the cache length.
            self._anomaly("context:mask_shorter_than_cache")
            if not mask_2d.all():
                return None
        if ctx.past_len is not None:
            return np.broadcast_to(ctx.past_len + np.arange(seq_len, dtype=np.int64), (batch, seq_len))
        if from_4d is not None:
            return from_4d[1]
        return None

    def _sequences(self, ctx: TokenContext, continuity: str) -> tuple[int, list[tuple[int, str, str]]]:
        primary = ctx.stack_id == self.primary_stack
        previous = self._previous.get(ctx.stack_id)
        tags: list[tuple[int, str, str]] = []
        if continuity == CONTINUE and previous is not None and previous[1] == ctx.batch:
            seq_base = previous[0]
        elif not primary and continuity == NEW and self._last_primary is not None and self._last_primary[1] == ctx.batch:
            # The decoder of an encoder-decoder continues the sequences its encoder started.
            seq_base = self._last_primary[0]
        else:
            if continuity == CONTINUE and previous is not None:
                self._anomaly("context:continuation_batch_changed")
            seq_base = self.next_sequence
            self.next_sequence += ctx.batch
            tags = _tag_rows(ctx, seq_base)
        self._previous[ctx.stack_id] = (seq_base, ctx.batch)
        if primary:
            self._last_primary = (seq_base, ctx.batch)
        return seq_base, tags


def _tag_rows(ctx: TokenContext, seq_base: int) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    for key, value in (ctx.tags or {}).items():
        if isinstance(value, (list, tuple)):
            rows.extend((seq_base + row, key, str(value[row])) for row in range(min(ctx.batch, len(value))))
        else:
            rows.extend((seq_base + row, key, str(value)) for row in range(ctx.batch))
    return rows
