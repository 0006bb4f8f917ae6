"""Expert capacity with token dropping (Switch Transformer; GShard for top-2).

Each batch (a step, or a sequence when the model groups per sequence) gives every expert
``capacity = ceil(tokens * k / E * capacity_factor)`` slots, or a fixed number of slots. Assignments past an
expert's capacity are dropped: the token skips that expert through the residual.

Priority among assignments to one expert in one batch:
- choice rank first (all first choices are served before any second choice, as GShard does), then
- ``order="position"``: earlier positions first (first come, first served; ties by sequence), which drops
  towards the end of sequences, the OpenMoE observation, or
- ``order="score"``: larger gate weight first (the lowest-probability assignments are dropped first).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ORDERS = ("position", "score")


def expert_capacity(tokens: int, num_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """Slots per expert for a batch of ``tokens`` tokens routed to ``top_k`` experts each."""
    # The epsilon keeps 100 * 1.1 / 10 (11.000000000000002 in binary) from becoming 12 slots.
    return max(0, math.ceil(tokens * top_k * capacity_factor / num_experts - 1e-9))


def apply_capacity(
    experts: np.ndarray,
    *,
    num_experts: int,
    groups: np.ndarray,
    capacity_factor: float | None = None,
    slots: int | None = None,
    order: str = "position",
    positions: np.ndarray | None = None,
    sequences: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Which assignments exceed capacity. Returns a (T, k) bool mask, True = dropped.

    ``experts`` (T, k) may hold -1 for missing choices (never dropped). ``groups`` (T,) is the batch each
    token belongs to; the capacity of a batch comes from its token count and ``capacity_factor``, or is
    ``slots`` for every batch. ``eligible`` (T, k), when given, says which assignments compete at all
    (GShard's randomly skipped second choices do not take a slot).
    """
    experts = np.asarray(experts)
    tokens, k = experts.shape
    if (capacity_factor is None) == (slots is None):
        raise ValueError("give exactly one of capacity_factor and slots")
    if order not in ORDERS:
        raise ValueError(f"unknown drop order {order!r}; expected one of {', '.join(ORDERS)}")
    groups = np.asarray(groups)
    group_ids, group_of_token, group_tokens = np.unique(groups, return_inverse=True, return_counts=True)
    if slots is not None:
        capacity = np.full(len(group_ids), int(slots), dtype=np.int64)
    else:
        assert capacity_factor is not None
        # Vectorised expert_capacity (same epsilon), one value per batch.
        raw = group_tokens * k * capacity_factor / num_experts - 1e-9
        capacity = np.maximum(np.ceil(raw), 0).astype(np.int64)

    valid = experts >= 0
    if eligible is not None:
        valid &= np.asarray(eligible, dtype=bool)
    token, rank = np.nonzero(valid)
    expert = experts[token, rank].astype(np.int64)
    group = group_of_token[token]
    # Priority keys, least significant first (np.lexsort): the row index last breaks every remaining tie.
    if order == "position":
        pos = np.zeros(tokens, np.int64) if positions is None else np.asarray(positions, np.int64)
        seq = np.zeros(tokens, np.int64) if sequences is None else np.asarray(sequences, np.int64)
        keys: tuple[np.ndarray, ...] = (token, seq[token], pos[token])
    else:
        if weights is None:
            raise ValueError("order='score' needs the gate weights")
        keys = (token, -np.asarray(weights, np.float64)[token, rank])
    sort = np.lexsort((*keys, rank, expert, group))
    # Rank of each assignment within its (group, expert) queue.
    run_key = group[sort] * (num_experts + 1) + expert[sort]
    starts = np.flatnonzero(np.r_[True, run_key[1:] != run_key[:-1]])
    run_lengths = np.diff(np.r_[starts, len(sort)])
    slot = np.arange(len(sort)) - np.repeat(starts, run_lengths)
    over = slot >= capacity[group[sort]]
    dropped = np.zeros((tokens, k), dtype=bool)
    dropped[token[sort[over]], rank[sort[over]]] = True
    if eligible is not None:
        # A second choice GShard skipped does not reach its expert either.
        dropped |= (experts >= 0) & ~np.asarray(eligible, dtype=bool)
    return dropped


class GShardTop2(NamedTuple):
    weights: np.ndarray  # (T, 2) float32: g1/(g1+g2), g2/(g1+g2)
    dropped: np.ndarray  # (T, 2) bool: over capacity, or a second choice skipped by the random test


def gshard_top2(
    experts: np.ndarray,
    weights: np.ndarray,
    *,
    num_experts: int,
    groups: np.ndarray,
    capacity_factor: float,
    rng: np.random.Generator,
    positions: np.ndarray | None = None,
    sequences: np.ndarray | None = None,
) -> GShardTop2:
    """GShard top-2: the second expert (weight g2 / (g1 + g2)) is used only if 2 * g2 > U(0, 1) and it is
    under capacity; first choices fill capacity first, in position order."""
    experts = np.asarray(experts)
    if experts.shape[1] != 2:
        raise ValueError(f"GShard top-2 needs 2 choices per token, got {experts.shape[1]}")
    w = np.asarray(weights, dtype=np.float32)
    total = w.sum(axis=1, keepdims=True)
    norm = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    keep_second = 2.0 * norm[:, 1] > rng.random(len(norm))
    eligible = np.ones(experts.shape, dtype=bool)
    eligible[:, 1] = keep_second
    dropped = apply_capacity(
        experts,
        num_experts=num_experts,
        groups=groups,
        capacity_factor=capacity_factor,
        order="position",
        positions=positions,
        sequences=sequences,
        eligible=eligible,
    )
    return GShardTop2(norm, dropped)


class DropSummary(NamedTuple):
    routed_by_expert: np.ndarray  # (E,) assignments
    dropped_by_expert: np.ndarray  # (E,)
    routed_by_position: np.ndarray  # (P,) assignments at position p (P = max position + 1)
    dropped_by_position: np.ndarray  # (P,)


def drop_summary(experts: np.ndarray, dropped: np.ndarray, positions: np.ndarray, num_experts: int) -> DropSummary:
    """Counts of routed and dropped assignments per expert and per position in the sequence."""
    experts = np.asarray(experts)
    valid = experts >= 0
    hit = valid & np.asarray(dropped, dtype=bool)
    pos = np.broadcast_to(np.asarray(positions, np.int64)[:, None], experts.shape)
    size = int(pos.max()) + 1 if pos.size else 0
    return DropSummary(
        np.bincount(experts[valid], minlength=num_experts),
        np.bincount(experts[hit], minlength=num_experts),
        np.bincount(pos[valid], minlength=size),
        np.bincount(pos[hit], minlength=size),
    )
