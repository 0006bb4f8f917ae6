"""Aux-loss-free load balancing (Wang et al. 2024, Algorithm 1; DeepSeek-V3): a per-expert bias, updated
after every step by b_i <- b_i + u * sign(c_mean - c_i), steers the choice of experts towards balance.

``route_with_online_bias`` replays a trace step by step: each step's tokens are routed with the bias in
effect, their load updates the bias, and the next step sees the new one, exactly as during training.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .routing import RouterConfig, Routed

DEFAULT_RATE = 0.001  # u in the paper and in DeepSeek-V3


class OnlineBiasResult(NamedTuple):
    routed: Routed
    steps: np.ndarray  # (S,) the distinct steps, ascending
    bias: np.ndarray  # (S, E) float32: the bias in effect during steps[i] (before its update)
    final_bias: np.ndarray  # (E,) the bias after the last step


def update_bias(bias: np.ndarray, load: np.ndarray, rate: float = DEFAULT_RATE) -> np.ndarray:
    """One update: raise the bias of experts below the mean load, lower it for those above.

    ``load`` counts assignments per expert in the step; its mean is c_mean = tokens * k / E. Experts exactly
    at the mean keep their bias (sign 0).
    """
    load = np.asarray(load, dtype=np.float64)
    step = np.sign(load.mean() - load).astype(np.float32)
    return np.asarray((np.asarray(bias, dtype=np.float32) + np.float32(rate) * step).astype(np.float32))


def route_with_online_bias(
    logits: np.ndarray,
    steps: np.ndarray,
    config: RouterConfig,
    *,
    rate: float = DEFAULT_RATE,
    initial_bias: np.ndarray | None = None,
) -> OnlineBiasResult:
    """Route ``logits`` (T, E) step by step, evolving the bias online.

    ``steps`` (T,) says which step each token belongs to; steps are replayed in ascending order and all
    tokens of one step (every rank of it: the update uses the global batch's load) share one bias.
    """
    logits = np.asarray(logits)
    tokens, num_experts = logits.shape
    steps = np.asarray(steps)
    if steps.shape != (tokens,):
        raise ValueError(f"steps has shape {steps.shape}, expected ({tokens},)")
    bias = np.zeros(num_experts, np.float32) if initial_bias is None else np.asarray(initial_bias, np.float32).copy()
    order = np.argsort(steps, kind="stable")
    distinct, starts = np.unique(steps[order], return_index=True)
    bounds = np.append(starts, tokens)
    experts = np.empty((tokens, config.top_k), dtype=np.int32)
    weights = np.empty((tokens, config.top_k), dtype=np.float32)
    history = np.empty((len(distinct), num_experts), dtype=np.float32)
    for i in range(len(distinct)):
        rows = order[bounds[i] : bounds[i + 1]]
        history[i] = bias
        routed = config.route(logits[rows], bias=bias)
        experts[rows] = routed.experts
        weights[rows] = routed.weights
        bias = update_bias(bias, np.bincount(routed.experts.ravel(), minlength=num_experts), rate)
    return OnlineBiasResult(Routed(experts, weights), distinct, history, bias)
