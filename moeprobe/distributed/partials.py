"""What a worker computes from one shard, and how the driver merges it: exact by construction.

The report's full passes over the routing table are the ones that grow with the trace; each is split here into
the same DuckDB SQL run on one shard (``Filters`` narrowed to that rank) and a merge that gives, on the driver,
exactly the table the single-machine pass would have built:

* the load aggregate, counts per (step, layer, expert) (``load.aggregate_sql``): counts add, so the per-shard
  tables summed per key are the whole trace's (ranks run their step N together, as the single query assumes);
* the sequence sizes (``Context.sequences_sql``): one row per (rank, sequence), and a sequence lives in one
  rank's shard, so the union of the shards' tables is the whole table;
* the number of rows that break the routing contract (``Context.count_invalid``): counts add.

The driver installs the merged tables under the names the analyses look for (``Context.seed``), so every metric
derived from them (MaxVio, CV, entropy, Gini, windows, EP balancedness, the latency-vs-load fit, the sample
choice) is computed after the merge, from merged counts, by the same code as on one machine. What the driver
still reads itself is bounded and documented in docs/scale.md: the dropped-choice counts (one boolean column,
skipped by Parquet statistics when nothing was dropped), the latency table (one row per step and layer: its
percentiles are computed exactly over all of it), and the token-level sample of whole sequences (at most the
report's sample budgets, read with range predicates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from ..analysis.filters import Filters


@dataclass(frozen=True)
class ShardPartial:
    rank: int
    invalid: int  # contract-breaking routing rows of the whole shard (no filter), as _has_invalid counts them
    load: pa.Table | None  # (step, layer, expert, n) for the report's filters, this shard only
    sequences: pa.Table | None  # (rank, sequence, n), or None for a counts trace / no layers


def snapshot(reader: Any, rank: int) -> set[str]:
    """The segments of ``rank`` in the driver's snapshot: what the worker must read, no more, no less."""
    from ..traces.schema import TABLES

    return {str(s.path) for table in TABLES for s in reader.segments(table) if s.rank == rank}


def shard_partial(
    path: str, rank: int, segments: set[str], filters: Filters, duckdb_threads: int | None = None
) -> ShardPartial:
    """Run on a worker: open the trace where the worker is, narrowed to ``segments`` (this rank's part of the
    driver's snapshot), and compute this rank's partial aggregates."""
    from ..analysis.context import Context
    from ..analysis.load import aggregate_sql
    from ..analysis.session import open_trace

    with open_trace(path) as trace:
        trace.reader.keep_only(segments)  # before the first query: the views are built from this list
        # A worker's stdout is the driver's (a local cluster) or a log: DuckDB's progress bar for a long scan
        # would land in the middle of `report --json` output.
        trace.connection.execute("SET enable_progress_bar = false")
        if duckdb_threads:
            trace.connection.execute(f"SET threads = {int(duckdb_threads)}")
        whole_shard = Context(trace, Filters(ranks=(rank,)))
        invalid = whole_shard.count_invalid() if trace.mode == "tokens" else 0
        # Within this worker, "the trace" is this shard: the validity predicate is added exactly when this
        # shard has a bad row (it only removes rows that break the contract, so the merged result is the same).
        whole_shard.seed_invalid_total(invalid)
        if filters.ranks is not None and rank not in filters.ranks:
            return ShardPartial(rank, invalid, None, None)
        ctx = Context(trace, replace(filters, ranks=(rank,)))
        load = trace.connection.sql(aggregate_sql(ctx)).to_arrow_table()
        sequences = None
        if ctx.mode == "tokens" and ctx.layers:
            sequences = trace.connection.sql(ctx.sequences_sql()).to_arrow_table()
        return ShardPartial(rank, invalid, load, sequences)


def merge(ctx: Any, partials: list[ShardPartial]) -> None:
    """Install the merged partial aggregates on the driver's ``ctx`` (the report's filters)."""
    ctx.seed_invalid_total(sum(p.invalid for p in partials))
    loads = [p.load for p in partials if p.load is not None]
    if loads:
        con = ctx.con
        con.register("_mp_parts", pa.concat_tables(loads))
        try:
            # counts add per key; the column types stay the single query's (sum of BIGINT is HUGEINT in DuckDB)
            merged = con.sql(
                "SELECT step, layer, expert, sum(n)::BIGINT AS n FROM _mp_parts GROUP BY ALL"
            ).to_arrow_table()
        finally:
            con.unregister("_mp_parts")
        ctx.seed("load", merged)
    sequences = [p.sequences for p in partials if p.sequences is not None]
    if sequences:
        ctx.seed("sequences", pa.concat_tables(sequences))  # a sequence lives in one shard: a plain union
