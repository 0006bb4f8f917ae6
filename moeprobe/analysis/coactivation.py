"""Co-activation (OLMoE): for experts i and j, N(i and j chosen for the same token) / N(i chosen), per layer.
Random routing gives (k - 1) / (E - 1) everywhere off the diagonal. Runs on the sampled sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import choices as choices_mod
from . import stats
from .context import Context
from .sampling import Sample, copied


@dataclass(frozen=True)
class CoactivationLayer:
    layer: int
    matrix: np.ndarray  # E x E, row i: P(j chosen | i chosen); the diagonal is 0
    chosen: np.ndarray  # N(i chosen) per expert
    random: float

    def top_pairs(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The n strongest (i, j, P(j | i)) pairs, among experts chosen at least once."""
        flat = np.argsort(self.matrix, axis=None)[::-1][:n]
        rows, cols = np.unravel_index(flat, self.matrix.shape)
        return [(int(i), int(j), float(self.matrix[i, j])) for i, j in zip(rows, cols, strict=True) if self.matrix[i, j] > 0]


def compute(ctx: Context, sample: Sample) -> list[CoactivationLayer]:
    found = choices_mod.choices(ctx, sample)
    counted = _side_by_side(ctx, found) if found is not None and found.regular else _row_level(ctx, sample)
    out: list[CoactivationLayer] = []
    for layer in sorted(ctx.layers):
        if layer not in counted:
            continue
        counts, joint = counted[layer]
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = np.where(counts[:, None] > 0, joint / counts[:, None], 0.0)
        out.append(CoactivationLayer(layer, matrix, counts, stats.coactivation_baseline(counts.size, ctx.top_k(layer))))
    return out


def _row_level(ctx: Context, sample: Sample) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(N(i chosen), N(i and j chosen)) per layer that has rows, from the routing rows joined with themselves."""
    sample = copied(ctx, sample)
    pairs = ctx.query("coactivation", sample=sample.table)
    chosen = ctx.run(f"SELECT layer, expert, count(*) AS n FROM {sample.table} GROUP BY ALL")
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for layer in sorted(ctx.layers):
        E = ctx.experts(layer)
        sel = chosen["layer"] == layer
        if not sel.any():
            continue
        counts = np.zeros(E)
        ids = chosen["expert"][sel].astype(np.int64)
        ok = ids < E
        counts[ids[ok]] = chosen["n"][sel][ok]
        joint = np.zeros((E, E))
        psel = pairs["layer"] == layer
        i, j = pairs["i"][psel].astype(np.int64), pairs["j"][psel].astype(np.int64)
        ok = (i < E) & (j < E)
        joint[i[ok], j[ok]] = pairs["n"][psel][ok]
        out[layer] = (counts, joint)
    return out


_INT32_MAX = int(np.iinfo(np.int32).max)


def _side_by_side(ctx: Context, found: choices_mod.Choices) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The same counts from one row per token with its choices side by side (each rank at most once, checked):
    every pair of choice ranks a < b with different experts x, y is one co-activation (x, y) and one (y, x),
    as the row-level join counts them."""
    layers, experts = choices_mod.fetch(ctx, found)
    first, second = np.triu_indices(found.top_k, 1)  # every pair of ranks a < b
    # Each layer's rows are one slice of a stable sort by layer, not a comparison of every row per layer.
    order = np.argsort(layers, kind="stable")
    bounds = np.searchsorted(layers[order], [(layer, layer + 1) for layer in sorted(ctx.layers)])
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for layer, (lo, hi) in zip(sorted(ctx.layers), bounds, strict=True):
        if lo == hi:
            continue
        E = ctx.experts(layer)
        # One contiguous array per rank (the fetched rows hold the ranks side by side).
        ranks = np.ascontiguousarray(experts[order[lo:hi]].T)
        # -1 marks a missing choice; valid_routing already keeps 0 <= expert < E, never index past it regardless
        present = (ranks >= 0) & (ranks < E)
        complete = bool(present.all())  # the usual case: no choice missing
        counts = np.bincount(ranks.ravel() if complete else ranks[present], minlength=E).astype(np.float64)
        key_type = np.int32 if E * E + 1 <= _INT32_MAX else np.int64  # keys x * E + y stay below E * E
        # All pairs at once, a key x * E + y per token and pair. A pair with a missing choice goes to an extra bin,
        # one of two equal experts (x = y) to the diagonal, which is then cleared: as if both were left out.
        keys = ranks[first].astype(key_type)
        np.multiply(keys, E, out=keys)  # in place: a top-k of 62 has 1891 pairs per token
        np.add(keys, ranks[second], out=keys)
        if not complete:
            keys[~(present[first] & present[second])] = E * E
        upper = np.bincount(keys.ravel(), minlength=E * E + 1)[: E * E].reshape(E, E)
        np.fill_diagonal(upper, 0)
        out[layer] = (counts, (upper + upper.T).astype(np.float64))
    return out
