"""A sample's routing with one row per token and layer, its choices side by side: what repetition and
co-activation read instead of joining the routing rows with themselves.

Both analyses compare the choices of one token (co-activation) or of two consecutive tokens (repetition). On
the routing rows that is a self-join with k x k matches per token, the most expensive queries of a report
(co-activation about a third of a one-million-decision report). Grouped once per token, the same counts come
from a join of one row per token (repetition) or from the k columns of each row (co-activation, counted in
numpy), with exactly the same results.

The table is exact only where each token has each choice rank at most once (``regular``), and the grain
without the step only where no position of a sequence was routed twice (``positions_unique``, e.g. a
recomputed prompt): otherwise the analyses keep their row-level SQL, which counts duplicates as a join does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from . import stored
from .context import Context
from .sampling import Sample, copied

# Choice ranks are kept as bits of a BIGINT (to check that none repeats): beyond this top-k, the row-level SQL.
_MAX_TOP_K = 62


@dataclass(frozen=True)
class Choices:
    """``table``: (rank, step, sequence, layer, position, e0 .. e{K-1}), one row per token and layer of the sample,
    ``e{i}`` the expert of choice rank i (NULL when the token has no such choice)."""

    table: str
    top_k: int
    regular: bool  # no token has a choice rank twice
    positions_unique: bool  # no (rank, sequence, layer, position) in two steps
    # Copied from the stored rows (``_from_stored``): one row per stored token row with its ``token_id``, every
    # choice present, so that it also stands for the sample's decisions (``decisions_sql``).
    stored: bool = False

    def columns(self) -> list[str]:
        return [f"e{i}" for i in range(self.top_k)]


def choices(ctx: Context, sample: Sample) -> Choices | None:
    """The sample's choices side by side, built once per sample and filters; None when a layer's top-k is too
    large for the check (then every analysis uses the routing rows)."""
    top_k = max((ctx.top_k(i) for i in ctx.layers), default=0)
    if not 0 < top_k <= _MAX_TOP_K:
        return None
    direct = _from_stored(ctx, sample, top_k)
    if direct is not None:
        return direct
    sample = copied(ctx, sample)
    columns = ", ".join(f"min(expert) FILTER (WHERE k = {i}) AS e{i}" for i in range(top_k))
    table = ctx.materialize(
        f"choices_{zlib.crc32(sample.table.encode())}",
        f"SELECT rank, step, sequence, layer, position, count(*) AS n_rows, bit_or(1::BIGINT << k) AS ranks, "
        f"{columns} FROM {sample.table} AS s GROUP BY ALL",
    )
    # the checks, kept as a one-row table: repetition and co-activation both ask
    checked = ctx.materialize(
        f"{table.removeprefix('_mp_').removesuffix('_' + ctx.filters.key)}_checked",
        f"SELECT coalesce(count_if(n_rows <> bit_count(ranks)), 0) AS repeated, count(*) AS tokens, "
        f"count(DISTINCT (rank, sequence, layer, position)) AS positions FROM {table}",
    )
    got = ctx.run(f"SELECT * FROM {checked}")
    repeated, tokens, positions = (int(got[name][0]) for name in ("repeated", "tokens", "positions"))
    return Choices(table=table, top_k=top_k, regular=repeated == 0, positions_unique=tokens == positions)


def _from_stored(ctx: Context, sample: Sample, top_k: int) -> Choices | None:
    """The table ``choices`` builds, copied from a format-2 trace's stored rows instead of grouped from the
    sample's decisions (about four times cheaper at 1 M decisions: one row per token is read, none is unnested
    and grouped again).

    Equal where every stored row uses all K choice columns in rank order (``stored.full_rank``), the stored rows
    stand for the analyses' routing (``stored.rows``), and no two stored rows share (rank, step, sequence,
    layer, position): then each such group of the sample's decisions is one stored row, its choice of rank i
    in ``expert_i``, each rank once (``regular``). A duplicate makes it None: the grouped table, which counts
    both rows, is built instead. None also where the conditions do not hold."""
    rows = stored.rows(ctx)
    if rows is None or not stored.full_rank(ctx):
        return None
    width = ctx.trace.reader.routing_encoding.top_k  # type: ignore[union-attr]  # rows() checked: format 2
    # Choice ranks past the stored K (a manifest top-k larger than the rows hold) are absent: NULL, as grouped.
    experts = ", ".join(
        f"CAST(expert_{i} AS SMALLINT) AS e{i}" if i < width else f"CAST(NULL AS SMALLINT) AS e{i}" for i in range(top_k)
    )
    table = ctx.materialize(
        f"tokens_{zlib.crc32(sample.predicate.encode())}",
        f"SELECT rank, step, sequence, layer, position, token_id, {experts} FROM {rows} AS r WHERE {sample.predicate}",
    )
    # One grouping by position answers both checks when no position has two rows (the usual trace): then no
    # (rank, step, sequence, layer, position) has two either. Otherwise the rows per key are counted too.
    checked = ctx.materialize(
        f"{table.removeprefix('_mp_').removesuffix('_' + ctx.filters.key)}_checked",
        f"SELECT coalesce(sum(n), 0) AS tokens, count(*) AS positions, count_if(n > 1) AS shared "
        f"FROM (SELECT count(*) AS n FROM {table} GROUP BY rank, sequence, layer, position)",
    )
    got = ctx.run(f"SELECT * FROM {checked}")
    tokens, positions, shared = (int(got[name][0]) for name in ("tokens", "positions", "shared"))
    if shared:
        keys = ctx.run(f"SELECT count(DISTINCT (rank, step, sequence, layer, position)) AS n FROM {table}")
        if int(keys["n"][0]) != tokens:
            return None
    return Choices(table=table, top_k=top_k, regular=True, positions_unique=tokens == positions, stored=True)


def decisions_sql(found: Choices) -> str:
    """The sample's decisions (rank, sequence, layer, token_id, k, expert) from a table copied from the stored
    rows (``found.stored``), for the count tables (tags, vocabulary): every stored choice is one decision."""
    if not found.stored:
        raise ValueError("decisions_sql needs a table copied from the stored rows")
    ranks = ", ".join(str(i) for i in range(found.top_k))
    experts = ", ".join(found.columns())
    return (
        f"(SELECT * FROM (SELECT rank, sequence, layer, token_id, unnest([{ranks}])::TINYINT AS k, "
        f"unnest([{experts}]) AS expert FROM {found.table}) WHERE expert IS NOT NULL)"
    )


def first_choices_sql(found: Choices) -> str:
    """``decisions_sql`` cut to the first choices (k = 0), which the vocabulary table reads: no unnesting."""
    if not found.stored:
        raise ValueError("first_choices_sql needs a table copied from the stored rows")
    return (
        f"(SELECT rank, sequence, layer, token_id, CAST(0 AS TINYINT) AS k, e0 AS expert "
        f"FROM {found.table} WHERE e0 IS NOT NULL)"
    )


def fetch(ctx: Context, found: Choices) -> tuple[np.ndarray, np.ndarray]:
    """(layer per row, experts as rows x top_k with -1 where a choice is missing), int32 as DuckDB returns them,
    for counting in numpy."""
    cols = ", ".join(f"coalesce({c}, -1)::INTEGER AS {c}" for c in found.columns())
    got = ctx.run(f"SELECT layer::INTEGER AS layer, {cols} FROM {found.table}")
    layers = got["layer"]
    # One int32 array filled column by column: stacking int64 copies of the columns wrote four times the fresh
    # memory, and fresh pages are what costs here (40-50 ms of a 1 M-decision report on this machine's VM).
    experts = np.empty((len(layers), found.top_k), np.int32)
    for j, c in enumerate(found.columns()):
        experts[:, j] = got[c]
    return layers, experts
