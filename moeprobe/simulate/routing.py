"""Routing functions: turn captured router logits back into expert choices and gate weights.

Each scoring mode mirrors one transformers router (v5), in float32 like the models, so that replaying the
recorded logits with the recorded bias gives the choices the model made:

- ``softmax``       Mixtral / Qwen-MoE / OLMoE: p = softmax(logits), top-k of p, weights p (renormalised
                    when ``norm_topk_prob``).
- ``softmax_top1``  Switch: the same with k = 1 and the raw probability as weight.
- ``sigmoid``       DeepSeek-V3 ``DeepseekV3TopkRouter``: s = sigmoid(logits); choose with s + bias,
                    group-limited (a group scores the sum of its two best biased scores, keep ``topk_group``
                    groups); weights are the unbiased s, normalised, times ``routed_scaling_factor``.
- ``softmax_topk``  GPT-OSS: top-k of the logits, softmax over the k chosen logits.
- ``sigmoid_topk``  Llama 4: top-k of the logits, sigmoid of the chosen logits.

A ``bias`` is only ever used for choosing (added to what the router ranks: p, s or the logits), never for
weights, as in DeepSeek-V3 and the aux-loss-free paper.

Ties: choices are ordered by the ranking score, descending; equal scores prefer the lower expert index.
torch does not document its tie order (DeepSeek-V3 even calls ``topk(sorted=False)``), so the order of
``k`` ranks and exact ties are the only places where a replay can legitimately differ from a capture.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

SCORINGS = ("softmax", "softmax_top1", "sigmoid", "softmax_topk", "sigmoid_topk")

# Rows per chunk: big enough that numpy's per-call overhead vanishes, small enough (32k x 256 float32 =
# 32 MiB) that temporaries stay bounded whatever the number of tokens.
CHUNK_ROWS = 32_768

_F32_ONE = np.float32(1.0)


class Routed(NamedTuple):
    """Choices per token: ``experts`` (T, k) int32 in choice order, ``weights`` (T, k) float32."""

    experts: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``reroute`` needs to know about one MoE layer's router."""

    top_k: int
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_layer(cls, meta: dict[str, Any], **overrides: Any) -> RouterConfig:
        """Build from a manifest ``layers[i]`` entry; keys the manifest lacks take the model family's default."""
        scoring = str(meta.get("scoring", "softmax"))
        values: dict[str, Any] = {
            "top_k": int(meta["top_k"]),
            "scoring": scoring,
            "n_group": int(meta.get("n_group") or 1),
            "topk_group": int(meta.get("topk_group") or meta.get("n_group") or 1),
            # Switch uses the raw top-1 probability; the others renormalise unless told otherwise.
            "norm_topk_prob": bool(meta.get("norm_topk_prob", scoring != "softmax_top1")),
            "routed_scaling_factor": float(meta.get("routed_scaling_factor") or 1.0),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def route(self, logits: np.ndarray, bias: np.ndarray | None = None) -> Routed:
        return reroute(
            logits,
            top_k=self.top_k,
            scoring=self.scoring,
            bias=bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )


# -- elementwise pieces, float32 like the models ------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in float32 (the formula torch's CPU kernel uses)."""
    # In place on one buffer (same operations, same float32 rounding): temporaries dominate at 1 M x 256.
    out = np.negative(np.asarray(x, dtype=np.float32))
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: sigmoid is then 0, correctly
        np.exp(out, out=out)
    out += _F32_ONE
    return np.divide(_F32_ONE, out, out=out)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32, shifted by the row max for stability."""
    x = np.asarray(x, dtype=np.float32)
    e = np.subtract(x, x.max(axis=-1, keepdims=True))
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return np.asarray(e)


# -- top-k --------------------------------------------------------------------------------------------
def topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, largest first, lower index first among equals.

    Fast path: the k-th largest value from ``np.partition`` (SIMD-accelerated, unlike ``argpartition``),
    then the entries at or above it. Rows where ties make that more than k entries fall back to a stable
    argsort, so the tie rule holds everywhere.
    """
    values = np.asarray(values)
    rows, n = values.shape
    if k >= n or n <= 32:
        order = np.argsort(-values, axis=1, kind="stable")
        return np.ascontiguousarray(order[:, :k])
    kth = np.partition(values, n - k, axis=1)[:, n - k]
    mask = values >= kth[:, None]
    counts = mask.sum(axis=1)
    idx = np.empty((rows, k), dtype=np.intp)
    exact = counts == k
    if exact.all():
        idx[:] = (np.flatnonzero(mask) % n).reshape(rows, k)
    else:
        idx[exact] = (np.flatnonzero(mask[exact]) % n).reshape(-1, k)
        tied = ~exact
        idx[tied] = np.argsort(-values[tied], axis=1, kind="stable")[:, :k]
    # Order the k winners by value, descending; they come out of flatnonzero in index order, so a stable
    # sort keeps the lower index first among equal values.
    picked = np.take_along_axis(values, idx, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


# -- one router per scoring mode ----------------------------------------------------------------------
def _check_bias(bias: np.ndarray | None, num_experts: int) -> np.ndarray | None:
    if bias is None:
        return None
    bias = np.asarray(bias, dtype=np.float32)
    if bias.shape != (num_experts,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({num_experts},)")
    return bias


def _normalise(weights: np.ndarray, eps: float = 0.0) -> np.ndarray:
    return np.asarray(weights / (weights.sum(axis=1, keepdims=True) + np.float32(eps)))


def softmax_topk(
    logits: np.ndarray, top_k: int, *, bias: np.ndarray | None = None, norm_topk_prob: bool = True
) -> Routed:
    """Mixtral / Qwen-MoE / OLMoE (and Switch with k = 1, ``norm_topk_prob=False``)."""
    probs = softmax(logits)
    bias = _check_bias(bias, probs.shape[1])
    chosen = topk(probs if bias is None else probs + bias, top_k)
    weights = np.take_along_axis(probs, chosen, axis=1)
    if norm_topk_prob:
        weights = _normalise(weights)
    return Routed(chosen.astype(np.int32), weights.astype(np.float32))


def sigmoid_group_topk(
    logits: np.ndarray,
    top_k: int,
    *,
    bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Routed:
    """DeepSeek-V3's ``DeepseekV3TopkRouter`` step for step, on logits instead of hidden states."""
    scores = sigmoid(logits)
    tokens, num_experts = scores.shape
    bias = _check_bias(bias, num_experts)
    choice = scores if bias is None else scores + bias
    if num_experts % n_group:
        raise ValueError(f"{num_experts} experts do not split into {n_group} groups")
    group_size = num_experts // n_group
    if top_k > min(topk_group, n_group) * group_size:
        raise ValueError(f"top_k={top_k} exceeds the {min(topk_group, n_group) * group_size} experts in the kept groups")
    if topk_group >= n_group:
        # Every group is kept: group selection cannot change anything, skip it.
        local = topk(choice, top_k)
    else:
        if group_size < 2:
            raise ValueError("group-limited routing needs at least 2 experts per group (it sums the top 2)")
        grouped = choice.reshape(tokens, n_group, group_size)
        best2 = np.partition(grouped, group_size - 2, axis=2)[:, :, group_size - 2 :]
        group_scores = best2[:, :, 0] + best2[:, :, 1]
        # Keep groups in index order so that candidates stay in expert-index order (the tie rule).
        kept = np.sort(topk(group_scores, topk_group), axis=1)
        # Only the kept groups compete: cheaper than masking the others with -inf, same winners.
        cand_scores = np.take_along_axis(grouped, kept[:, :, None], axis=1).reshape(tokens, -1)
        picked = topk(cand_scores, top_k)  # position among the candidates: kept group, then offset
        local = np.take_along_axis(kept, picked // group_size, axis=1) * group_size + picked % group_size
    weights = np.take_along_axis(scores, local, axis=1)
    if norm_topk_prob:
        weights = _normalise(weights, eps=1e-20)
    weights = weights * np.float32(routed_scaling_factor)
    return Routed(local.astype(np.int32), weights.astype(np.float32))


def logits_topk(logits: np.ndarray, top_k: int, *, then: str, bias: np.ndarray | None = None) -> Routed:
    """GPT-OSS (``then='softmax'``) and Llama 4 (``then='sigmoid'``): top-k on the logits first."""
    logits = np.asarray(logits, dtype=np.float32)
    bias = _check_bias(bias, logits.shape[1])
    chosen = topk(logits if bias is None else logits + bias, top_k)
    picked = np.take_along_axis(logits, chosen, axis=1)
    weights = softmax(picked) if then == "softmax" else sigmoid(picked)
    return Routed(chosen.astype(np.int32), weights.astype(np.float32))


def _route_chunk(
    logits: np.ndarray,
    top_k: int,
    scoring: str,
    bias: np.ndarray | None,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> Routed:
    if scoring in ("softmax", "softmax_top1"):
        return softmax_topk(logits, top_k, bias=bias, norm_topk_prob=norm_topk_prob)
    if scoring == "sigmoid":
        return sigmoid_group_topk(
            logits,
            top_k,
            bias=bias,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=routed_scaling_factor,
        )
    if scoring == "softmax_topk":
        return logits_topk(logits, top_k, then="softmax", bias=bias)
    if scoring == "sigmoid_topk":
        return logits_topk(logits, top_k, then="sigmoid", bias=bias)
    raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")


def reroute(
    logits: np.ndarray,
    *,
    top_k: int,
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    threads: int | None = None,
) -> Routed:
    """Route tokens from raw router logits (T, E) the way the given router would.

    Work is split into row chunks (bounded memory) run on up to ``threads`` threads: numpy releases the
    GIL in the heavy calls, so chunks really run in parallel.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits should be (tokens, experts), got shape {logits.shape}")
    tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is not between 1 and the {num_experts} experts")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    args = (top_k, scoring, bias, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    if tokens <= CHUNK_ROWS:
        return _route_chunk(logits, *args)
    experts = np.empty((tokens, top_k), dtype=np.int32)
    weights = np.empty((tokens, top_k), dtype=np.float32)

    def run(start: int) -> None:
        part = _route_chunk(logits[start : start + CHUNK_ROWS], *args)
        experts[start : start + CHUNK_ROWS] = part.experts
        weights[start : start + CHUNK_ROWS] = part.weights

    starts = range(0, tokens, CHUNK_ROWS)
    workers = threads if threads is not None else min(os.cpu_count() or 1, 8)
    if workers <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, starts))
    return Routed(experts, weights)
