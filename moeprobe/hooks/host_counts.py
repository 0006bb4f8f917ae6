"""Counts mode on the host, eagerly, with the work moved off the model's per-call path.

For a step whose stack call got no mask and no positions (every token real: the step needs only integers), the
stack's wrapper notes ``(batch, seq_len, new sequences)`` and each router's wrapper notes its indices tensor, by
reference; :meth:`DeferredCounts.flush` later writes the same state, step rows and counts the per-call host path
(:func:`.graph_ops.record_plain_step_host`, :func:`.graph_ops.count_host`) would have written, with one count
over all the noted calls instead of two torch ops per call. Measured inside the demo decode loop (caches cold
after the model's own work) a torch op costs several microseconds and a numpy element write about as much, so the
per-call path cost 2 to 3 % of a step; a note costs a list append.

At a drain the model's thread only hands what was noted to the writer thread with the drain's copies and moves
the step id on (:meth:`DeferredCounts.advance`); the writer writes the rows and counts into the copies
(:func:`apply`, called by :func:`.graph_capture.unpack`): a handful of torch and numpy ops that run cold after
the model's work cost 0.5 ms per drain on the model's thread, more than the notes save. The model's thread
writes them itself (:meth:`DeferredCounts.flush`) before a step that takes the per-call path, and at the next
step once the noted steps hold ``max_tokens`` tokens (a long prefill's router outputs are not kept alive for a
whole drain period). Counts are sums, so counting later changes nothing as long as the noted tensors keep
their values: each one's version counter is noted too, and a tensor written in place since its router returned
is counted as it is now and reported (``graph_counts_ids_changed``), never silently. (Inference tensors,
``torch.inference_mode``, carry no version counter and are not checked.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import graph_ops as ops

DEFAULT_MAX_TOKENS = 1 << 14  # tokens of noted steps kept before the next step flushes them (a long prefill)


@dataclass
class Noted:
    """What was noted since the last flush, and the buffers' shapes it is written against."""

    steps: list[tuple[int, int, bool]]  # batch, seq_len, new sequences
    calls: list[tuple[int, int, int, Tensor]]  # noted step (-1: the state's), layer, version (-1: none), indices
    k: int
    window: int  # steps of the counts window
    row: int  # layers x (experts + 1): one step's slot
    width: int  # experts + 1
    room: int  # tokens the padding mask can hold (count_host's mismatch rule)


class DeferredCounts:
    """The noted steps and router calls of one probe's counts mode (model thread only).

    The wrappers append to ``steps`` and ``calls`` themselves (the lists are never replaced: :meth:`take` copies
    and empties them), a method call less per call; :meth:`note_step` and :meth:`note_call` say what they do."""

    __slots__ = ("state", "step_ring", "counts", "valid_now", "k", "max_tokens", "active", "steps", "calls", "tokens")

    def __init__(self, state: Tensor, step_ring: Tensor, counts: Tensor, valid_now: Tensor, k: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.state, self.step_ring, self.counts, self.valid_now = state, step_ring, counts, valid_now
        self.k = k
        self.max_tokens = max_tokens
        # True while the step in flight is a noted one: router calls are noted, not counted. The per-call path
        # takes over (after a flush) at the first step that needs it.
        self.active = False
        self.steps: list[tuple[int, int, bool]] = []
        self.calls: list[tuple[int, int, int, Tensor]] = []
        self.tokens = 0  # tokens of the noted steps: what bounds the router outputs kept alive

    def note_step(self, batch: int, seq_len: int, new: bool) -> None:
        if self.tokens >= self.max_tokens:
            self.flush()  # keep at most max_tokens and one step's router outputs alive
        self.steps.append((batch, seq_len, new))
        self.tokens += batch * seq_len
        self.active = True

    def note_call(self, layer: int, indices: Tensor) -> None:
        """A router call of the step in flight (``indices``: any shape whose last dimension is k, on the host)."""
        try:
            version = indices._version
        except RuntimeError:
            # An inference tensor has no version counter (-1: not checked; hook capture keeps its host tensors by
            # reference until the writer converts them, unchecked, so the exposure is the same there).
            version = -1
        self.calls.append((len(self.steps) - 1, layer, version, indices))

    def take(self) -> Noted | None:
        """Hand over what was noted (None: nothing); the caller writes it with :func:`apply`."""
        if not self.steps and not self.calls:
            return None
        c = self.counts
        noted = Noted(self.steps[:], self.calls[:], self.k, c.shape[0] - 1, c.shape[1] * c.shape[2], c.shape[2], self.valid_now.shape[0])
        self.steps.clear()
        self.calls.clear()
        self.tokens = 0
        return noted

    def flush(self) -> None:
        """Write what was noted into the live state, step ring and counts, here on the model's thread."""
        noted = self.take()
        if noted is not None:
            apply(noted, ops._view(self.state), ops._view(self.step_ring), self.counts)

    def stop(self) -> None:
        """The next step takes the per-call path: write what was noted first, so the state is current."""
        self.flush()
        self.active = False

    def advance(self, noted: Noted) -> None:
        """Drain, model thread: the live state moves past the noted steps (step id, the step in flight) without
        writing their rows or counts, which :func:`apply` writes into the drain's copies on the writer thread."""
        if not noted.steps:
            return
        s = ops._view(self.state)
        batch, seq_len, _ = noted.steps[-1]
        step = int(s[ops.STEP]) + len(noted.steps)
        slot = step - int(s[ops.COUNTS_BASE])
        s[ops.STEP], s[ops.KEEP], s[ops.STEP_TOKENS], s[ops.STEP_PADDED] = step, 0, batch * seq_len, 0
        s[ops.COUNTS_OFFSET] = (slot if 0 <= slot < noted.window else noted.window) * noted.row


def apply(noted: Noted, s: np.ndarray, ring: np.ndarray, counts: Tensor) -> None:
    """Write noted steps and calls as the per-call host path would have: ``s`` the state (numpy, as it was when
    the first of them was noted), ``ring`` the step ring (numpy, its last row the trash row), ``counts`` the
    counts buffer of the same window. Vectorised over the calls (numpy on their step, layer and size; one cat,
    one bincount): a Python loop over a drain period's calls cost more than the per-call path it replaces."""
    offsets, step_tokens = _write_steps(noted, s, ring)
    if not noted.calls:
        return
    refs, layers, versions, tensors = zip(*noted.calls, strict=True)
    at = np.array(refs, dtype=np.int64) + 1
    n = np.array([t.numel() for t in tensors], dtype=np.int64)
    tokens = n // noted.k
    # count_host's rule: a layer that routes another number of tokens than its step is counted (no mask to apply:
    # noted steps have none) and reported; an empty call is neither counted nor a mismatch.
    mismatched = int(((n > 0) & ((tokens > noted.room) | (tokens != step_tokens[at]))).sum())
    changed = sum(1 for v, t in zip(versions, tensors, strict=True) if v >= 0 and t._version != v)
    if len(tensors) == 1:
        flat = tensors[0].reshape(-1)
    else:
        try:
            flat = torch.cat(tensors).reshape(-1)  # one op when the calls' shapes differ only in the first dimension
        except RuntimeError:
            flat = torch.cat([t.reshape(-1) for t in tensors])
    width = noted.width
    start = offsets[at] + np.array(layers, dtype=np.int64) * width
    # Ids the layer does not have go to its last column (count_host's rule): clamped to -1..experts, then -1 wraps
    # to the last column.
    flat = flat.clamp(-1, width - 1).remainder_(width) + torch.from_numpy(np.repeat(start, n))
    target = counts.view(-1)
    target.add_(torch.bincount(flat, minlength=target.shape[0]).to(target.dtype))
    if mismatched:
        s[ops.MASK_MISMATCH] += mismatched
    if changed:
        s[ops.COUNTS_IDS_CHANGED] += changed


def _write_steps(noted: Noted, s: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """record_plain_step_host for each noted step, in order, with one write into the step ring. Returns each
    step's counts offset and tokens, after those of the step the state described before (row 0)."""
    before = (int(s[ops.COUNTS_OFFSET]), int(s[ops.STEP_TOKENS]))
    steps = noted.steps
    if not steps:
        return np.array([before[0]]), np.array([before[1]])
    first = int(s[ops.STEP]) + 1
    shape = np.array(steps, dtype=np.int64).reshape(len(steps), 3)  # batch, seq_len, new
    number = first + np.arange(len(steps), dtype=np.int64)
    tokens = shape[:, 0] * shape[:, 1]
    cursor = int(s[ops.STEP_CURSOR])
    fit = max(0, min(len(steps), ring.shape[0] - 1 - cursor))
    if fit:
        ring[cursor : cursor + fit] = np.stack([number, shape[:, 0], shape[:, 1], shape[:, 2], tokens], axis=1)[:fit]
    slot = number - int(s[ops.COUNTS_BASE])
    outside = (slot < 0) | (slot >= noted.window)
    slot[outside] = noted.window  # the trash slot, counted (record_step's rule)
    offsets = slot * noted.row
    s[ops.STEP], s[ops.KEEP], s[ops.STEP_TOKENS], s[ops.STEP_PADDED] = number[-1], 0, tokens[-1], 0
    s[ops.STEP_CURSOR] = cursor + len(steps)
    s[ops.COUNTS_OFFSET] = offsets[-1]
    lost = int(outside.sum())
    if lost:
        s[ops.COUNTS_LOST] += lost
    return np.concatenate([[before[0]], offsets]), np.concatenate([[before[1]], tokens])
