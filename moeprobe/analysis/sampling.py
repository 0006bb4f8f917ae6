"""Deterministic samples of whole sequences for the analyses that are estimates (tags, vocabulary, repetition,
co-activation, router scores). Load metrics never sample: they always use every decision.

A sample's size is measured against the decisions the filters keep, which the load aggregate (built by every
report anyway) already counts; that is why sampling sits above ``load`` rather than inside ``Context``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..traces.errors import QueryError
from .context import Context
from .load import aggregate

# Analyses that are estimates look at about this many routing decisions at most (see ``sample``): count
# tables (per tag, per token id) and, much smaller, the token-level ones that join the routing with itself
# (repetition, co-activation, router scores). Load metrics always use every decision.
DEFAULT_COUNT_BUDGET = 8_000_000
DEFAULT_SAMPLE_BUDGET = 2_000_000
# Router statistics read E logits per token and layer where the routing has k decisions: E / k times the data
# (32 times for DeepSeek-V3). They use their own whole-sequence sample of at most this many logits, so that a
# report over a trace with scores costs at most about twice the same report without (issue 14).
DEFAULT_LOGIT_BUDGET = 4_000_000
# A sample is this many runs of consecutive sequences, one in the middle of each quarter of the trace. More runs
# spread it further but touch more Parquet row groups: at 100 M decisions, 16 runs cost three times the CPU.
_SAMPLE_RUNS = 4


@dataclass(frozen=True)
class Sample:
    """A deterministic subset of whole sequences that an estimate looked at (see ``sample``)."""

    table: str
    predicate: str  # SQL over columns rank and sequence that keeps the sampled sequences
    fraction: float
    decisions: int
    sequences: int
    budget: int
    materialized: bool = False  # ``table`` is a temporary table holding the rows, not a subquery over the trace
    # Asked for as a copy, not made yet: ``copied`` makes it for the analyses that join the rows with themselves.
    # Those that can read the stored token rows instead (``analysis.choices``) never pay for the copy.
    deferred: bool = False

    def reading(self, other: Sample) -> Sample:
        """This sample, read from ``other``'s temporary table when that holds the same sequences (same predicate):
        the same rows, without decoding the trace's segments again. Otherwise this sample unchanged."""
        if other.materialized and other.predicate == self.predicate and not self.materialized:
            return replace(self, table=other.table, materialized=True)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "decisions": self.decisions,
            "sequences": self.sequences,
            "budget": self.budget,
        }


def decisions(ctx: Context) -> int:
    """Routing decisions kept by the filters (from the load aggregate, which every report builds anyway)."""
    got = ctx.run(f"SELECT coalesce(sum(n), 0)::BIGINT AS n FROM {aggregate(ctx)}")
    return int(got["n"][0])


def sequences(ctx: Context) -> str:
    """(rank, sequence, decisions) of every kept sequence, created once. Sizes come from one layer times
    the number of kept layers (every MoE layer routes every token), which keeps this pass cheap."""
    return ctx.materialize("sequences", ctx.sequences_sql())


def sample(ctx: Context, budget: int, *, materialize: bool = True) -> Sample:
    """The filtered routing of a deterministic subset of whole sequences, about ``budget`` decisions.

    Whole sequences are kept so that consecutive tokens stay together, in runs spread evenly over the
    trace (see ``_choose``). ``budget <= 0`` means everything. With ``materialize`` the rows are to be copied
    into a temporary table (for analyses that join it with itself): ``copied`` makes the copy when one of them
    first needs it. ``table`` is, until then, a subquery over the Parquet files.
    """
    if ctx.mode == "counts":
        raise QueryError(
            f"{ctx.trace.path}: this analysis needs per-token routing; the trace holds only expert counts "
            "(the loads table): load, EP placement and simulate --eplb work on it"
        )
    total = decisions(ctx)
    predicate, kept, kept_sequences = "true", total, 0
    if ctx.layers:
        seqs = sequences(ctx)
        if budget <= 0 or total <= budget:
            kept_sequences = int(ctx.run(f"SELECT count(*) AS s FROM {seqs}")["s"][0])
        else:
            predicate, kept, kept_sequences = _choose(ctx, seqs, budget)
    return Sample(
        table=f"(SELECT * FROM {ctx.sources()['routing']} AS r WHERE {predicate})",
        predicate=predicate,
        fraction=kept / total if total else 1.0,
        decisions=kept,
        sequences=kept_sequences,
        budget=budget,
        deferred=materialize,
    )


def copied(ctx: Context, sample: Sample) -> Sample:
    """``sample`` read from its temporary copy, made now if it was deferred (once per filters and predicate);
    a sample not asked for as a copy is returned unchanged."""
    if not sample.deferred:
        return sample
    table = ctx.materialize(
        _copy_name(sample), f"SELECT rank, step, sequence, position, token_id, layer, k, expert FROM {sample.table} AS s"
    )
    return replace(sample, table=table, materialized=True, deferred=False)


def copy_if_made(ctx: Context, sample: Sample) -> Sample:
    """``sample`` read from its copy when some analysis already made it, else unchanged (no copy made)."""
    return copied(ctx, sample) if sample.deferred and ctx.has_table(_copy_name(sample)) else sample


def _copy_name(sample: Sample) -> str:
    return f"sample_{zlib.crc32(sample.predicate.encode())}"


def _choose(ctx: Context, seqs: str, budget: int) -> tuple[str, int, int]:
    """Evenly spaced runs of consecutive sequences (in (rank, sequence) order) worth ``budget`` decisions.

    Runs rather than scattered sequences: a range predicate lets the Parquet scan skip whole row groups
    (a capture writes a sequence's tokens close together) and costs two comparisons a row, where a long IN
    list is a hash probe for each of 100 M rows. Spreading the runs over the trace samples its whole
    duration, not its beginning.
    """
    got = ctx.run(f"SELECT rank, sequence, n FROM {seqs} ORDER BY rank, sequence")
    ranks, ids, sizes = got["rank"], got["sequence"], got["n"].astype(np.float64)
    cum = np.cumsum(sizes)
    # no more runs than sequences that fit, so that "at least one sequence a run" stays within budget
    runs = max(1, min(_SAMPLE_RUNS, int(budget * len(sizes) // cum[-1])))
    per_run = budget / runs
    keep = np.zeros(len(ids), dtype=bool)
    for stripe in range(runs):
        start = (stripe + 0.5) * cum[-1] / runs - per_run / 2
        first = min(int(np.searchsorted(cum, start, side="right")), len(cum) - 1)
        before = cum[first - 1] if first else 0.0
        last = int(np.searchsorted(cum, before + per_run, side="right")) - 1
        keep[first : max(first, last) + 1] = True
    parts: list[str] = []
    index = np.flatnonzero(keep)
    # consecutive kept positions of one rank form one run
    breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(ranks[index]) != 0)) + 1
    for run in np.split(index, breaks):
        if len(run):
            a, b = run[0], run[-1]
            parts.append(f"(rank = {int(ranks[a])} AND sequence BETWEEN {int(ids[a])} AND {int(ids[b])})")
    predicate = "(" + " OR ".join(parts) + ")" if parts else "false"
    return predicate, int(sizes[keep].sum()), int(keep.sum())
