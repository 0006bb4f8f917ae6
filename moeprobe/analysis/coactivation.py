"""Co-activation (OLMoE): for experts i and j, N(i and j chosen for the same token) / N(i chosen), per layer.
Random routing gives (k - 1) / (E - 1) everywhere off the diagonal. Runs on the sampled sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import stats
from .context import Context
from .sampling import Sample


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
    pairs = ctx.query("coactivation", sample=sample.table)
    chosen = ctx.run(f"SELECT layer, expert, count(*) AS n FROM {sample.table} GROUP BY ALL")
    out: list[CoactivationLayer] = []
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
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = np.where(counts[:, None] > 0, joint / counts[:, None], 0.0)
        out.append(CoactivationLayer(layer, matrix, counts, stats.coactivation_baseline(E, ctx.top_k(layer))))
    return out
