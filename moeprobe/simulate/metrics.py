"""Load metrics of one layer's routing, recorded or simulated (definitions in docs/metrics.md).

A routing here is ``experts`` (T, k) int with -1 for a missing choice, and ``dropped`` (T, k) bool. The load
c_e of an expert counts the assignments it processes (dropped ones excluded), so a capacity limit shows up
as a lower MaxVio and as dropped share. MaxVio uses the mean load Σc / E as c̄, which equals T·k / E when
nothing is dropped.

Comparisons with the recorded routing (``changed_share``, ``mass_lost``) are per token and relative to what
was recorded.
"""

from __future__ import annotations

import numpy as np

from ..analysis.stats import cv_rows, maxvio_rows


def expert_load(experts: np.ndarray, num_experts: int, dropped: np.ndarray | None = None) -> np.ndarray:
    """(E,) assignments processed by each expert."""
    experts = np.asarray(experts)
    keep = experts >= 0
    if dropped is not None:
        keep &= ~np.asarray(dropped, dtype=bool)
    return np.bincount(experts[keep], minlength=num_experts)


def step_loads(
    experts: np.ndarray, step_index: np.ndarray, num_steps: int, num_experts: int, dropped: np.ndarray | None = None
) -> np.ndarray:
    """(S, E) load per step; ``step_index`` (T,) maps each token to 0..S-1."""
    experts = np.asarray(experts)
    keep = experts >= 0
    if dropped is not None:
        keep &= ~np.asarray(dropped, dtype=bool)
    rows = np.broadcast_to(np.asarray(step_index, np.int64)[:, None], experts.shape)[keep]
    flat = rows * num_experts + experts[keep]
    return np.bincount(flat, minlength=num_steps * num_experts).reshape(num_steps, num_experts)


def max_vio(load: np.ndarray) -> np.ndarray:
    """(max c − c̄) / c̄ over the last axis (Wang et al. 2024, eq. 4); 0 where there is no load."""
    return maxvio_rows(load, empty=0.0)


def cv(load: np.ndarray) -> np.ndarray:
    """std / mean over the last axis; 0 where there is no load."""
    return cv_rows(load, empty=0.0)


def dropped_share(experts: np.ndarray, dropped: np.ndarray) -> float:
    """Dropped assignments over all assignments."""
    valid = np.asarray(experts) >= 0
    total = int(valid.sum())
    return float((valid & np.asarray(dropped, dtype=bool)).sum() / total) if total else 0.0


def _as_sets(experts: np.ndarray, width: int) -> np.ndarray:
    """Each row's experts sorted, padded with -1 to ``width`` columns, so rows compare as sets."""
    rows = np.sort(np.asarray(experts, dtype=np.int64), axis=1)
    if rows.shape[1] < width:
        rows = np.hstack([np.full((rows.shape[0], width - rows.shape[1]), -1, np.int64), rows])
    return rows


def changed_tokens(recorded: np.ndarray, simulated: np.ndarray) -> np.ndarray:
    """(T,) bool: the token's set of chosen experts differs from the recorded one."""
    width = max(recorded.shape[1], simulated.shape[1])
    return np.asarray((_as_sets(recorded, width) != _as_sets(simulated, width)).any(axis=1))


def mass_lost(
    recorded: np.ndarray, recorded_weights: np.ndarray, simulated: np.ndarray, simulated_dropped: np.ndarray
) -> np.ndarray:
    """(T,) share of each token's recorded gate weight that no longer reaches the same expert.

    An expert the token was recorded with counts as lost when the simulated routing does not choose it, or
    chooses it but drops it (capacity). Applied to the recorded routing itself (simulated = recorded, with
    its own drop flags) this is the weight its own capacity dropped.
    """
    recorded = np.asarray(recorded)
    weights = np.where(recorded >= 0, np.asarray(recorded_weights, dtype=np.float64), 0.0)
    reached = np.where(np.asarray(simulated_dropped, dtype=bool), -2, np.asarray(simulated))
    kept = (recorded[:, :, None] == reached[:, None, :]).any(axis=2) & (recorded >= 0)
    total = weights.sum(axis=1)
    lost = np.where(kept, 0.0, weights).sum(axis=1)
    return np.asarray(np.divide(lost, total, out=np.zeros_like(total), where=total > 0))
