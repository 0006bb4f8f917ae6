"""What the captured router logits (the ``scores`` table) say: router confidence (entropy, top-k margin), the
ST-MoE z-loss, the Switch and DeepSeek-V3 sequence-wise balance losses as diagnostics, and for bias-balanced
routers the share of tokens whose biased and unbiased choices differ. Runs on the sampled sequences, or on a
smaller whole-sequence sample when those hold more logits than the logit budget (``choose_sample``).

Scoring functions (manifest ``scoring``): softmax, softmax_topk (GPT-OSS) and softmax_top1 (Switch) rank by
the softmax over all logits; sigmoid and sigmoid_topk (Llama 4) rank by the sigmoid score, whose normalised
form is the router distribution. For softmax_topk the distribution is the full softmax, not the renormalised
top-k, so entropy and margin describe the router's preference over every expert.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from .context import Context, render_sql, sql_text
from .sampling import Sample, sample as sample_routing

SIGMOID_SCORING = ("sigmoid", "sigmoid_topk")


@dataclass(frozen=True)
class RouterLayer:
    layer: int
    scoring: str
    tokens: int  # tokens with logits (in the sample)
    entropy_norm: float  # mean H(p) / ln E; 1 = no preference
    margin: float  # mean score gap between the k-th and (k+1)-th expert
    z_loss: float
    switch_loss: float  # E * sum f_i P_i; 1.0 when balanced
    deepseek_seq_loss: float  # mean over sequences of sum f_i P_i; 1.0 when balanced
    bias_flip: float | None  # share of tokens whose biased top-k differs from the unbiased; None without bias
    bias_tokens: int


def _meta(ctx: Context) -> str:
    rows = []
    for i, layer in ctx.layers.items():
        sigmoid = str(layer.get("scoring", "softmax")) in SIGMOID_SCORING
        groups = int(layer.get("n_group") or 1)
        keep = int(layer.get("topk_group") or groups)
        rows.append(f"({i}, {ctx.experts(i)}, {ctx.top_k(i)}, {str(sigmoid).lower()}, {groups}, {keep})")
    return f"(SELECT * FROM (VALUES {', '.join(rows)}) AS m(layer, experts, top_k, sigmoid, n_group, topk_group))"


def has_scores(ctx: Context) -> bool:
    return bool(ctx.trace.reader.segments("scores"))


def logits_per_decision(ctx: Context) -> float:
    """The most logits a routing decision brings along in the kept layers (E / k): a token and layer has E
    logits and k decisions."""
    return max((ctx.experts(i) / max(ctx.top_k(i), 1) for i in ctx.layers), default=1.0)


def choose_sample(ctx: Context, sample: Sample, logit_budget: int) -> Sample:
    """The sequences the router statistics read: ``sample`` itself when its tokens have at most ``logit_budget``
    logits (0: no limit), else a deterministic whole-sequence sample of about ``logit_budget`` logits (at least
    one sequence), chosen like every other sample. Not materialised: it is read once, by ``compute``."""
    ratio = logits_per_decision(ctx)
    if logit_budget <= 0 or not has_scores(ctx) or not ctx.layers or sample.decisions * ratio <= logit_budget:
        return sample
    return sample_routing(ctx, max(1, int(logit_budget / ratio)), materialize=False)


def compute(ctx: Context, sample: Sample) -> list[RouterLayer]:
    """Per-layer router diagnostics, or an empty list when the trace has no logits."""
    if not has_scores(ctx) or not ctx.layers:
        return []
    for statement in sql_text("router_macros").split(";"):
        if statement.strip():
            ctx.run(statement)
    meta = _meta(ctx)
    tokens = ctx.materialize(
        f"router_{zlib.crc32(sample.predicate.encode())}",
        render_sql(sql_text("router_tokens"), {**ctx.sources(), "meta": meta, "sampled": sample.predicate}),
    )
    extra = {"tokens": tokens, "sample": sample.table, "meta": meta}
    layers = ctx.query("router_layers", **extra)
    switch = ctx.query("router_switch", **extra)
    deepseek = ctx.query("router_deepseek", **extra)
    seq_loss = {int(k): float(v) for k, v in zip(deepseek["layer"], deepseek["loss"], strict=True)}
    flips: dict[int, tuple[int, int]] = {}
    if ctx.trace.reader.segments("bias"):
        got = ctx.query("router_bias", **extra)
        flips = {int(k): (int(n), int(f)) for k, n, f in zip(got["layer"], got["tokens"], got["flipped"], strict=True)}

    out: list[RouterLayer] = []
    for i, layer in enumerate(layers["layer"]):
        index = int(layer)
        E = ctx.experts(index)
        sel = switch["layer"] == index
        first = switch["first"][sel].astype(np.float64)
        probs = switch["p"][sel].astype(np.float64)
        f = first / first.sum() if first.sum() > 0 else np.full(len(first), math.nan)
        n_bias, flipped = flips.get(index, (0, 0))
        out.append(
            RouterLayer(
                layer=index,
                scoring=str(ctx.layers[index].get("scoring", "softmax")),
                tokens=int(layers["tokens"][i]),
                entropy_norm=float(layers["entropy"][i]),
                margin=float(layers["margin"][i]),
                z_loss=float(layers["z_loss"][i]),
                switch_loss=float(E * (f * probs).sum()) if len(f) == E else math.nan,
                deepseek_seq_loss=seq_loss.get(index, math.nan),
                bias_flip=flipped / n_bias if n_bias else None,
                bias_tokens=n_bias,
            )
        )
    return out
