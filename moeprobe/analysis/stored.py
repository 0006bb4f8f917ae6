"""Passes over a format-2 trace's stored routing rows (one per (step, layer, token), its k choices side by side)
that give exactly what the same pass over the logical ``routing`` view gives, at a fraction of the cost: the view
turns each stored row into k rows (one UNION ALL branch per choice column), which a pass that counts tokens, or
that only asks whether something exists, never needed.

They apply only where the stored rows stand for the rows the analyses read: a format-2 trace, no filters (the
filtered view is then every logical row), and no row that breaks the routing contract (the analyses' source is
then the view itself, not the view less its invalid rows, see ``Context.sources``). Elsewhere they answer None
and the caller keeps its pass over the view. tests/unit/analysis/test_stored_passes.py holds them equal to the
view's passes on hostile traces.
"""

from __future__ import annotations

from .context import Context
from .filters import Filters
from .views import stored_routing_select


def rows(ctx: Context) -> str | None:
    """The stored routing rows (with ``rank``) as a table expression, where they stand for ``ctx``'s routing
    exactly (see the module's docstring); None elsewhere."""
    if ctx.mode != "tokens" or ctx.filters.key != Filters().key:
        return None
    select = stored_routing_select(ctx.trace.reader)
    if select is None or not ctx.routing_clean():
        return None
    return f"({select})"


def full_rank(ctx: Context) -> bool:
    """Whether every stored routing row uses all K choice columns in rank order (each segment's footer says so):
    then choice column i is the decision of rank i, for every token."""
    segments = ctx.trace.reader.segments("routing")
    return bool(segments) and all(segment.full_rank for segment in segments)


def sequences_sql(ctx: Context) -> str | None:
    """``Context.sequences_sql`` over the stored rows: a token's routing decisions in a layer are its row's
    ``choices`` (the reader refuses a segment with counts outside 1..K), so no decision needs to be unnested."""
    stored = rows(ctx)
    if stored is None or not ctx.layers:
        return None
    layer = next(iter(ctx.layers))
    return (
        f"SELECT rank, sequence, (sum(choices) * {len(ctx.layers)})::BIGINT AS n "
        f"FROM {stored} AS r WHERE layer = {layer} GROUP BY ALL"
    )


def has_no_drops(ctx: Context) -> bool:
    """True when no stored row of the snapshot is marked dropped: then no decision, filtered or not, valid or not,
    was dropped (a decision's flag is its token's), and the per-expert dropped counts are all zero without a
    pass over the view. Works with filters and invalid rows too; False (ask the view) for format 1."""
    select = stored_routing_select(ctx.trace.reader)
    if select is None:
        return False
    return int(ctx.run(f"SELECT count(*)::BIGINT AS n FROM ({select}) WHERE dropped")["n"][0]) == 0


def decisions_sql(ctx: Context, predicate: str) -> str | None:
    """The decisions (rank, sequence, layer, token_id, k, expert) of the kept sequences (``predicate``, over rank
    and sequence) from the stored rows, one scan instead of the view's K: for the count tables (tags) of a sample
    that is not copied. Only where every row uses all K choice columns in rank order (choice i is rank i)."""
    rows_sql = rows(ctx)
    if rows_sql is None or not full_rank(ctx):
        return None
    width = ctx.trace.reader.routing_encoding.top_k  # type: ignore[union-attr]  # rows() checked: format 2
    ranks = ", ".join(str(i) for i in range(width))
    experts = ", ".join(f"expert_{i}" for i in range(width))
    return (
        f"(SELECT rank, sequence, layer, token_id, unnest([{ranks}])::TINYINT AS k, "
        f"CAST(unnest([{experts}]) AS SMALLINT) AS expert FROM {rows_sql} AS r WHERE {predicate})"
    )


def first_choices_sql(ctx: Context, predicate: str) -> str | None:
    """``decisions_sql`` cut to the first choices (k = 0), which the vocabulary table reads: one column of K."""
    rows_sql = rows(ctx)
    if rows_sql is None or not full_rank(ctx):
        return None
    return (
        f"(SELECT rank, sequence, layer, token_id, CAST(0 AS TINYINT) AS k, CAST(expert_0 AS SMALLINT) AS expert "
        f"FROM {rows_sql} AS r WHERE {predicate})"
    )
