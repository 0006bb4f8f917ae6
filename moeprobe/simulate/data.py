"""In-memory routing of one MoE layer, as the strategies consume and produce it (numpy arrays only).

``replay`` fills ``LayerData`` from a trace; notebooks can build one by hand. Tokens are rows, in the order
(rank, step, sequence, position); choices are columns in rank order, -1 where a choice is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PHASES = ("prefill", "decode")


@dataclass
class BiasHistory:
    """Router bias in effect from ``steps[i]`` on, per rank: rows sorted by (rank, step)."""

    rank: np.ndarray  # (B,) int
    steps: np.ndarray  # (B,) int
    bias: np.ndarray  # (B, E) float32

    def for_tokens(self, rank: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, int]:
        """Row of the bias each token was routed with, and how many tokens came before any recorded bias.

        A rank without bias rows of its own uses the lowest rank's (the bias is the same on every rank).
        Tokens before a rank's first recorded bias use that first bias, and are counted so that the caller
        can say so.
        """
        rows = np.empty(len(step), dtype=np.int64)
        early = 0
        own = set(np.unique(self.rank).tolist())
        fallback = int(self.rank.min())
        for r in np.unique(rank):
            tokens = np.flatnonzero(rank == r)
            source = int(r) if int(r) in own else fallback
            mine = np.flatnonzero(self.rank == source)
            at = np.searchsorted(self.steps[mine], step[tokens], side="right") - 1
            early += int((at < 0).sum())
            rows[tokens] = mine[np.maximum(at, 0)]
        return rows, early


@dataclass
class LayerData:
    """One MoE layer's recorded routing over the selected steps."""

    index: int
    meta: dict[str, Any]
    step: np.ndarray  # (T,) int64
    sequence: np.ndarray  # (T,) int64
    position: np.ndarray  # (T,) int64
    rank: np.ndarray  # (T,) int64
    token_id: np.ndarray  # (T,) int64
    phase: np.ndarray  # (T,) int8, index into PHASES
    experts: np.ndarray  # (T, k) int32, -1 where missing
    weights: np.ndarray  # (T, k) float32
    dropped: np.ndarray  # (T, k) bool
    scores: np.ndarray | None = None  # (T, E) float32 raw router logits, when recorded
    bias: BiasHistory | None = None

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def tokens(self) -> int:
        return int(len(self.step))

    def subset(self, rows: np.ndarray) -> LayerData:
        """The same layer restricted to some tokens (a boolean mask or row indices)."""
        return LayerData(
            index=self.index,
            meta=self.meta,
            step=self.step[rows],
            sequence=self.sequence[rows],
            position=self.position[rows],
            rank=self.rank[rows],
            token_id=self.token_id[rows],
            phase=self.phase[rows],
            experts=self.experts[rows],
            weights=self.weights[rows],
            dropped=self.dropped[rows],
            scores=None if self.scores is None else self.scores[rows],
            bias=self.bias,
        )


@dataclass
class SimRouting:
    """A layer's routing after a strategy: same token rows as its ``LayerData``."""

    experts: np.ndarray  # (T, k) int32
    weights: np.ndarray  # (T, k) float32
    dropped: np.ndarray  # (T, k) bool
    bias_steps: np.ndarray | None = None  # (S,) when the strategy evolved a bias: steps it was in effect from
    bias: np.ndarray | None = None  # (S, E)
    notes: list[str] = field(default_factory=list)

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[1])
