"""Graph capture on the host, eagerly: routing and token rows of sampled steps written by the writer thread.

The router wrapper advances the routing ring's cursor exactly as :func:`.graph_ops.record_routing_impl` does (so
the rows that fit, the overflow and the incomplete steps are the same), and notes where the call's rows go with
its indices and gate weights, by reference. The drain hands the notes to the writer with its copy of the ring;
the writer fills the rows into the copy (:func:`fill`) before reading it. Building the rows on the model's thread
cost 40 to 130 µs per router call in the demo decode loop (numpy on cold caches), most of graph capture's cost.
A plain step's token rows (no mask, no positions: :func:`.graph_ops.record_plain_tokens_host`) are noted the
same way: where they go, the token ids by reference, the cache length. Each tensor's version counter is noted
too: one written in place before the writer read it is read as it is then and reported
(``graph_rows_changed``), never silently. (Inference tensors carry no version counter.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import graph_ops as ops

# (ring row, rows that fit, step, layer, indices, weights or None, their versions (-1: none))
Note = tuple[int, int, int, int, Tensor, Tensor | None, int, int]
# (ring row, rows that fit, step, token ids, cache length, the ids' version)
TokenNote = tuple[int, int, int, Tensor, int, int]


def _version(t: Tensor | None) -> int:
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter
        return -1


class RoutingNotes:
    """The noted router calls of one probe's sampled steps (model thread; taken at each drain)."""

    __slots__ = ("capacity", "k", "notes", "tokens")

    def __init__(self, ring: Tensor, k: int) -> None:
        self.capacity = ring.shape[0] - 1  # the last row is the trash row
        self.k = k
        self.notes: list[Note] = []
        self.tokens: list[TokenNote] = []

    def note_tokens(self, row: int, fit: int, step: int, ids: Tensor, past: int) -> None:
        """record_plain_tokens_host's ``note_tokens``: a plain step's token rows, left to :func:`fill_tokens`."""
        self.tokens.append((row, fit, step, ids, past, _version(ids)))

    def note(self, s: np.ndarray, layer: int, indices: Tensor, weights: Tensor | None) -> None:
        """record_routing_impl's host path for one call (``s``: the state's numpy view), the rows left to :func:`fill`."""
        if not s[ops.KEEP]:
            return
        tokens = indices.numel() // self.k
        if not tokens:
            return
        cursor = int(s[ops.ROUTING_CURSOR])
        fit = max(0, min(tokens, self.capacity - cursor))
        if fit:
            self.notes.append((cursor, fit, int(s[ops.STEP]), layer, indices, weights, _version(indices), _version(weights)))
        s[ops.ROUTING_CURSOR] = cursor + tokens

    def take(self) -> tuple[list[Note], list[TokenNote]]:
        notes, tokens, self.notes, self.tokens = self.notes, self.tokens, [], []
        return notes, tokens


def fill_tokens(notes: list[TokenNote], ring: np.ndarray) -> int:
    """Writer thread: the noted token rows into ``ring`` (the drain's copy of the token ring), as
    record_plain_tokens_host writes them. Returns how many steps' token ids changed since they were noted."""
    changed = 0
    for row, fit, step, ids, past, version in notes:
        fit = min(fit, max(0, len(ring) - 1 - row))  # never past the copy's rows (the last one: the trash row)
        if fit:
            ops.write_plain_tokens(ring[row : row + fit], step, ids, past)
        if version >= 0 and ids._version != version:
            changed += 1
    return changed


def fill(notes: list[Note], ring: np.ndarray, k: int) -> int:
    """Writer thread: the noted rows into ``ring`` (the drain's copy, rows at the positions they were noted at),
    as record_routing_impl writes them. Returns how many calls' tensors changed since they were noted."""
    changed = 0
    for row, fit, step, layer, indices, weights, indices_version, weights_version in notes:
        if row + fit > len(ring) - 1:
            fit = max(0, len(ring) - 1 - row)  # never past the copy's rows (the last one stands for the trash row)
        if not fit:
            continue
        tokens = indices.numel() // k
        rows = ring[row : row + fit]
        rows[:, 0] = step
        rows[:, 1] = layer
        rows[:, 2] = np.arange(fit, dtype=np.int32)
        rows[:, ops.ROUTING_FIXED : ops.ROUTING_FIXED + k] = indices.reshape(tokens, k).numpy()[:fit]
        if weights is None:
            rows[:, ops.ROUTING_FIXED + k :] = np.full((fit, k), np.nan, dtype=np.float32).view(np.int32)
        else:
            w = weights.detach().reshape(tokens, k)
            if w.dtype != torch.float32:
                w = w.to(torch.float32)
            rows[:, ops.ROUTING_FIXED + k :] = w.numpy()[:fit].view(np.int32)
        if (indices_version >= 0 and indices._version != indices_version) or (
            weights is not None and weights_version >= 0 and weights._version != weights_version
        ):
            changed += 1
    return changed
