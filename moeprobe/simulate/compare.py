"""Side-by-side load metrics of the recorded routing and of each strategy's routing, layer by layer.

Aggregates over layers: MaxVio, MaxVio per batch, CV and balancedness are means of the per-layer values
(the convention of the aux-loss-free paper and SGLang); dropped share, changed share and weight mass lost
are shares over all (token, layer) pairs.

Two balances: ``balancedness`` is mean / max load over experts (it equals 1 / (1 + MaxVio)), always, so that it
means the same with and without a placement; ``ep_balancedness`` is mean / max load over GPUs with the experts
placed contiguously (expert-parallel ranks), None when the experts do not divide over the GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import metrics
from .capacity import drop_summary
from .data import LayerData, SimRouting
from .placement import balancedness, contiguous_placement, gpu_load

SUMMARY_KEYS = ("max_vio", "max_vio_batch", "balancedness", "ep_balancedness", "cv", "dropped_share", "changed_share",
                "mass_lost")


def layer_metrics(layer: LayerData, sim: SimRouting, gpus: int | None = None) -> dict[str, Any]:
    """Metrics of one layer's routing ``sim`` (which may be the recorded one) against the recording."""
    num_experts = layer.num_experts
    load = metrics.expert_load(sim.experts, num_experts, sim.dropped)
    steps, step_index = np.unique(layer.step, return_inverse=True)
    per_step = metrics.step_loads(sim.experts, step_index.reshape(-1), len(steps), num_experts, sim.dropped)
    ep_balance = None
    if gpus and num_experts % gpus == 0:
        ep_balance = float(balancedness(gpu_load(load[None, :], contiguous_placement(1, num_experts, gpus))[0]))
    changed = metrics.changed_tokens(layer.experts, sim.experts)
    lost = metrics.mass_lost(layer.experts, layer.weights, sim.experts, sim.dropped)
    return {
        "layer": layer.index,
        "tokens": layer.tokens,
        "max_vio": float(metrics.max_vio(load)),
        "max_vio_batch": float(metrics.max_vio(per_step).mean()) if len(steps) else 0.0,
        "balancedness": float(balancedness(load)),
        "ep_balancedness": ep_balance,
        "cv": float(metrics.cv(load)),
        "dropped_share": metrics.dropped_share(sim.experts, sim.dropped),
        "changed_share": float(changed.mean()) if layer.tokens else 0.0,
        "mass_lost": float(lost.mean()) if layer.tokens else 0.0,
        "load": load.tolist(),
    }


def summarize(per_layer: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate per-layer metrics (see the module docstring for which are means and which are shares)."""
    if not per_layer:
        return {key: 0.0 for key in SUMMARY_KEYS}
    tokens = np.array([row["tokens"] for row in per_layer], dtype=np.float64)
    weight = tokens / tokens.sum() if tokens.sum() else np.full(len(tokens), 1.0 / len(tokens))
    out: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        values = np.array([np.nan if row[key] is None else row[key] for row in per_layer], dtype=np.float64)
        if np.isnan(values).all():
            out[key] = float("nan")  # ep_balancedness when the experts do not divide over the GPUs
            continue
        # dropped_share is per assignment; layers have the same k in practice, so token weights suffice.
        out[key] = float((values * weight).sum()) if key.endswith(("_share", "_lost")) else float(values.mean())
    return out


def drop_report(layers: list[LayerData], sims: list[SimRouting]) -> dict[str, Any] | None:
    """Dropped assignments per layer, per expert and by position; None when nothing was dropped."""
    if not any(bool(sim.dropped.any()) for sim in sims):
        return None
    by_layer = []
    by_expert = []
    routed_pos: np.ndarray = np.zeros(0, np.int64)
    dropped_pos: np.ndarray = np.zeros(0, np.int64)
    for layer, sim in zip(layers, sims, strict=True):
        summary = drop_summary(sim.experts, sim.dropped, layer.position, layer.num_experts)
        by_layer.append({"layer": layer.index, "dropped": int(summary.dropped_by_expert.sum()),
                         "routed": int(summary.routed_by_expert.sum())})
        by_expert.append({"layer": layer.index, "dropped": summary.dropped_by_expert.tolist(),
                          "routed": summary.routed_by_expert.tolist()})
        size = max(len(routed_pos), len(summary.routed_by_position))
        routed_pos = np.pad(routed_pos, (0, size - len(routed_pos))) + np.pad(
            summary.routed_by_position, (0, size - len(summary.routed_by_position)))
        dropped_pos = np.pad(dropped_pos, (0, size - len(dropped_pos))) + np.pad(
            summary.dropped_by_position, (0, size - len(summary.dropped_by_position)))
    return {
        "by_layer": by_layer,
        "by_expert": by_expert,
        "by_position": {"routed": routed_pos.tolist(), "dropped": dropped_pos.tolist()},
    }


def position_buckets(by_position: dict[str, list[int]], buckets: int = 10) -> list[tuple[int, int, float]]:
    """Dropped share in ``buckets`` equal ranges of positions: (first position, last position, share)."""
    routed = np.asarray(by_position["routed"], dtype=np.float64)
    dropped = np.asarray(by_position["dropped"], dtype=np.float64)
    edges = np.unique(np.linspace(0, len(routed), buckets + 1).astype(int))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        total = routed[lo:hi].sum()
        out.append((int(lo), int(hi - 1), float(dropped[lo:hi].sum() / total) if total else 0.0))
    return out
