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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .context import Context
from .duckdb_errors import duckdb_errors
from .sampling import Sample, copied, sample as sample_routing

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
    """Per-layer router diagnostics, or an empty list when the trace has no logits.

    The logits are streamed from DuckDB in batches and reduced in numpy (the same arithmetic as list lambdas in
    SQL took about ten times longer, most of a report with scores): per token the
    distribution, its entropy, the top-k margin and logsumexp; per layer and per sequence the sums the Switch
    and DeepSeek-V3 losses need. The choices they pair with (first choices, chosen experts) come from the
    sample's routing rows of the same tokens, in SQL.
    """
    if not has_scores(ctx) or not ctx.layers:
        return []
    acc = _Accumulator(ctx)
    meta = ", ".join(f"({i}, {ctx.experts(i)})" for i in ctx.layers)
    query = (
        f"SELECT sc.rank, sc.step, sc.sequence, sc.position, sc.layer, sc.scores "
        f"FROM {ctx.sources()['scores']} AS sc JOIN (VALUES {meta}) AS m(layer, experts) USING (layer) "
        f"WHERE {sample.predicate} AND len(sc.scores) = m.experts "
        # a token without its keys cannot be paired with its routing: left out (the schema declares them non-null)
        "AND sc.rank IS NOT NULL AND sc.step IS NOT NULL AND sc.sequence IS NOT NULL AND sc.position IS NOT NULL"
    )
    with duckdb_errors(ctx.trace.reader):  # a damaged scores segment is a TraceError, as in every other query
        for batch in ctx.con.sql(query).to_arrow_reader(_BATCH_ROWS):
            acc.add(batch)
    if not acc.tokens:
        return []
    chosen = _chosen(ctx, sample, acc.keys())
    flips = _bias_flips(ctx, acc) if ctx.trace.reader.segments("bias") else {}

    out: list[RouterLayer] = []
    for index in sorted(acc.tokens):
        E, k = ctx.experts(index), ctx.top_k(index)
        n = acc.tokens[index]
        first = np.zeros(E)
        mine = chosen["layer"] == index
        ids = chosen["expert"][mine].astype(np.int64)
        ok = (ids >= 0) & (ids < E)  # valid_routing keeps them in range; never index past it regardless
        np.add.at(first, ids[ok], chosen["first"][mine][ok].astype(np.float64))
        f = first / first.sum() if first.sum() > 0 else np.full(E, math.nan)
        probs = acc.p_sum[index] / n
        n_bias, flipped = flips.get(index, (0, 0))
        out.append(
            RouterLayer(
                layer=index,
                scoring=str(ctx.layers[index].get("scoring", "softmax")),
                tokens=n,
                entropy_norm=acc.entropy[index] / n,
                margin=acc.margin[index] / acc.margins[index] if acc.margins[index] else math.nan,
                z_loss=acc.z[index] / n,
                switch_loss=float(E * (f * probs).sum()),
                deepseek_seq_loss=_deepseek(acc, chosen, index, E, k),
                bias_flip=flipped / n_bias if n_bias else None,
                bias_tokens=n_bias,
            )
        )
    return out


# Rows of logits a batch: 8,192 x 256 experts is 16 MiB per float64 array.
_BATCH_ROWS = 8192


class _Accumulator:
    """Per layer: tokens, sums of entropy, margin and logsumexp squared, the sum of the distributions; per (rank,
    sequence, layer): tokens and the sum of the distributions; the keys of every token (for the routing join)
    and, where the trace has a bias, each token's ranking scores (for the flips)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.keep_scores = bool(ctx.trace.reader.segments("bias"))
        self.tokens: dict[int, int] = {}
        self.entropy: dict[int, float] = {}
        self.margin: dict[int, float] = {}
        self.margins: dict[int, int] = {}
        self.z: dict[int, float] = {}
        self.p_sum: dict[int, np.ndarray] = {}
        self.sequences: dict[tuple[int, int, int], list[Any]] = {}  # -> [tokens, sum of p]
        self._keys: list[pa.RecordBatch] = []
        self.ranked: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (layer, rank, step, q) for flips

    def add(self, batch: pa.RecordBatch) -> None:
        self._keys.append(batch.select(["rank", "step", "sequence", "position", "layer"]))
        layers = _numpy(batch.column("layer")).astype(np.int64)
        lists = batch.column("scores")
        values = _numpy(lists.values)
        offsets = _numpy(lists.offsets)
        start = 0
        for index in np.unique(layers):
            rows = np.flatnonzero(layers == index)
            E = self.ctx.experts(int(index))
            # every row of this layer has E logits (the query keeps only those): gather them as rows x E
            cols = (offsets[rows] - start)[:, None] + np.arange(E)[None, :]
            x = values[cols]
            self._layer(int(index), x, batch, rows)

    def _layer(self, index: int, x: np.ndarray, batch: pa.RecordBatch, rows: np.ndarray) -> None:
        layer = self.ctx.layers[index]
        E, k = self.ctx.experts(index), self.ctx.top_k(index)
        sigmoid = str(layer.get("scoring", "softmax")) in SIGMOID_SCORING
        mx = x.max(axis=1, keepdims=True)
        # as DuckDB computed it: the difference in float32 (the logits' type), then exp in float64
        ex = np.exp((x - mx).astype(np.float64))
        ex_sum = ex.sum(axis=1)
        lse = mx[:, 0].astype(np.float64) + np.log(ex_sum)
        if sigmoid:
            q = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
            p = q / q.sum(axis=1, keepdims=True)
        else:
            q = ex / ex_sum[:, None]
            p = q
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) / math.log(E)
        self.tokens[index] = self.tokens.get(index, 0) + len(x)
        self.entropy[index] = self.entropy.get(index, 0.0) + float(entropy.sum())
        self.z[index] = self.z.get(index, 0.0) + float((lse * lse).sum())
        if k < E:
            top = -np.partition(-q, (k - 1, k), axis=1)
            self.margin[index] = self.margin.get(index, 0.0) + float((top[:, k - 1] - top[:, k]).sum())
            self.margins[index] = self.margins.get(index, 0) + len(x)
        else:
            self.margins.setdefault(index, 0)
        self.p_sum[index] = self.p_sum.get(index, np.zeros(E)) + p.sum(axis=0)
        rank = _numpy(batch.column("rank"))[rows].astype(np.int64)
        sequence = _numpy(batch.column("sequence"))[rows].astype(np.int64)
        groups, inverse = np.unique(np.stack([rank, sequence]), axis=1, return_inverse=True)
        inverse = inverse.reshape(-1)
        # per sequence sums in one pass (a batch of an engine import can hold thousands of short sequences)
        order = np.argsort(inverse, kind="stable")
        sizes = np.bincount(inverse, minlength=groups.shape[1])
        sums = np.add.reduceat(p[order], np.concatenate([[0], np.cumsum(sizes)[:-1]]), axis=0)
        for g in range(groups.shape[1]):
            entry = self.sequences.setdefault((int(groups[0, g]), int(groups[1, g]), index), [0, np.zeros(E)])
            entry[0] += int(sizes[g])
            entry[1] += sums[g]
        if self.keep_scores:
            self.ranked.append((index, rank, _numpy(batch.column("step"))[rows].astype(np.int64), q))

    def keys(self) -> pa.Table:
        return pa.Table.from_batches(self._keys)


_NUMPY_TYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}


def _numpy(array: pa.Array) -> np.ndarray:
    """A primitive Arrow array (no nulls: the query leaves rows with NULL keys out) as a numpy view of its data
    buffer: pyarrow's own ``to_numpy`` imports pandas on first use, 0.7 s of a report's second."""
    if array.null_count:  # a NULL logit inside a list: pyarrow's conversion, which makes it NaN
        return np.asarray(array.to_numpy(zero_copy_only=False))
    dtype = np.dtype(_NUMPY_TYPES.get(str(array.type), str(array.type)))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _chosen(ctx: Context, sample: Sample, keys: pa.Table) -> dict[str, np.ndarray]:
    """Per (rank, sequence, layer, expert): the sample's routing rows of tokens that have logits, and how many
    of them are first choices."""
    sample = copied(ctx, sample)  # a token-level sample is read from its copy, as the other joins read it
    ctx.con.register("_mp_router_keys", keys)
    try:
        return ctx.run(
            f"SELECT r.rank, r.sequence, r.layer, r.expert, count(*) AS chosen, count_if(r.k = 0) AS first "
            f"FROM {sample.table} AS r SEMI JOIN _mp_router_keys AS t "
            "ON t.rank = r.rank AND t.step = r.step AND t.sequence = r.sequence AND t.position = r.position "
            "AND t.layer = r.layer GROUP BY ALL"
        )
    finally:
        ctx.con.unregister("_mp_router_keys")


def _deepseek(acc: _Accumulator, chosen: dict[str, np.ndarray], index: int, E: int, k: int) -> float:
    """DeepSeek-V3's sequence-wise balance loss (alpha left out), averaged over sequences: per sequence
    sum_i f_i P_i, f_i = E / (k T) * #{t : i in TopK(t)}, P_i = mean over its T tokens of expert i's normalised
    score; TopK is what the router chose (the routing rows). Sequences with no chosen expert are left out."""
    mine = chosen["layer"] == index
    losses: dict[tuple[int, int], float] = {}
    for rank, sequence, expert, count in zip(
        chosen["rank"][mine], chosen["sequence"][mine], chosen["expert"][mine], chosen["chosen"][mine], strict=True
    ):
        entry = acc.sequences.get((int(rank), int(sequence), index))
        if entry is None or not 0 <= int(expert) < E:
            continue
        t, p_sum = entry
        key = (int(rank), int(sequence))
        losses[key] = losses.get(key, 0.0) + E / (k * t) * float(count) * (p_sum[int(expert)] / t)
    return float(np.mean(list(losses.values()))) if losses else math.nan


def _bias_flips(ctx: Context, acc: _Accumulator) -> dict[int, tuple[int, int]]:
    """Per layer: tokens with a bias in force (the latest recorded at or before the token's step, for its rank
    and layer, with one value per expert) and how many of them have a different top-k with the bias than
    without, both group-limited (``n_group`` groups, the best ``topk_group`` kept by the sum of their two best
    scores). Ties go to the lower expert or group index."""
    got = ctx.run("SELECT rank, layer, step, bias FROM bias ORDER BY rank, layer, step")
    biases: dict[tuple[int, int], tuple[np.ndarray, list[Any]]] = {}
    for rank, layer, step, bias in zip(got["rank"], got["layer"], got["step"], got["bias"], strict=True):
        steps, values = biases.setdefault((int(rank), int(layer)), (np.empty(0, np.int64), []))
        biases[(int(rank), int(layer))] = (np.append(steps, int(step)), [*values, np.asarray(bias, np.float64)])
    out: dict[int, tuple[int, int]] = {}
    for index, ranks, steps, q in acc.ranked:
        meta = ctx.layers[index]
        groups = int(meta.get("n_group") or 1)
        kept = int(meta.get("topk_group") or groups)
        k, E = ctx.top_k(index), ctx.experts(index)
        tokens, flipped = out.get(index, (0, 0))
        for rank in np.unique(ranks):
            known = biases.get((int(rank), index))
            if known is None:
                continue
            bias_steps, values = known
            mine = np.flatnonzero(ranks == rank)
            at = np.searchsorted(bias_steps, steps[mine], side="right") - 1
            for b in np.unique(at[at >= 0]):
                if len(values[b]) != E:
                    continue
                rows = mine[at == b]
                plain = _group_topk(q[rows], groups, kept, k)
                biased = _group_topk(q[rows] + values[b][None, :], groups, kept, k)
                tokens += len(rows)
                flipped += int((plain != biased).any(axis=1).sum())
        out[index] = (tokens, flipped)
    return {index: counts for index, counts in out.items() if counts[0]}


def _group_topk(v: np.ndarray, groups: int, kept: int, k: int) -> np.ndarray:
    """DeepSeek-V3's group-limited top-k as sorted expert indices per row: the experts in ``groups`` equal groups,
    a group scored by the sum of its two best scores, the best ``kept`` groups kept, then the top k inside."""
    n, E = v.shape
    size = E // groups if groups > 0 else E
    if size < 1 or groups <= 1:
        masked = v
    else:
        grouped = v[:, : groups * size].reshape(n, groups, size)
        best_two = -np.sort(-grouped, axis=2)[:, :, :2]
        score = best_two[:, :, 0] + (best_two[:, :, 1] if size > 1 else 0.0)
        keep = np.zeros((n, groups), bool)
        np.put_along_axis(keep, np.argsort(-score, axis=1, kind="stable")[:, :kept], True, axis=1)
        in_kept = np.zeros((n, E), bool)  # experts past groups * size belong to no group: never kept
        in_kept[:, : groups * size] = np.repeat(keep, size, axis=1)
        masked = np.where(in_kept, v, -1e30)
    return np.sort(np.argsort(-masked, axis=1, kind="stable")[:, :k], axis=1)
