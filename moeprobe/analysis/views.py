"""DuckDB views over a trace: one view per table, over the complete segments listed by the reader.

Views are created over an explicit list of files (a snapshot), so a query never sees a segment that
appears half-way through it; ``Trace.refresh()`` re-creates them with the newer list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..traces.compact import RoutingEncoding, choice_sql, choice_used_sql, phase_sql, routing_select, stored_source
from ..traces.reader import TraceReader
from ..traces.schema import TABLES, with_rank
from .quoting import sql_literal

if TYPE_CHECKING:
    import duckdb


def _quote_path(path: str) -> str:
    return sql_literal(path)


def _empty_select(table: str) -> str:
    """A typed, empty SELECT for a table that has no segment yet, so queries still bind."""
    import pyarrow as pa

    type_names = {
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.string(): "VARCHAR",
        pa.bool_(): "BOOLEAN",
        pa.list_(pa.float32()): "FLOAT[]",
    }
    columns = ", ".join(
        f"CAST(NULL AS {type_names[field.type]}) AS {field.name}" for field in with_rank(TABLES[table])
    )
    return f"SELECT {columns} WHERE false"


def view_select(reader: TraceReader, table: str) -> str:
    """The SELECT behind one table's view: its complete segments, with ``rank`` from the reader's listing.

    The rank is a literal per shard, not DuckDB's Hive partitioning: that turns every ``key=value`` directory
    on the path into a column, so a trace stored under ``expert=0/`` or ``layer=1/`` would have its own
    columns overwritten by the directory's name (one expert, one layer). Only the trace's own ``rank=R``
    level is a column, and the reader already parsed it.
    """
    segments = reader.segments(table)
    if not segments:
        return _empty_select(table)
    columns = ", ".join(f.name for f in TABLES[table])
    by_rank: dict[int, list[str]] = {}
    for segment in segments:
        by_rank.setdefault(segment.rank, []).append(_quote_path(str(segment.path)))
    if table == "routing" and reader.routing_encoding is not None:
        # Format v2: one stored row per token, turned back into one row per decision; segments whose rows all
        # use every choice column in rank order (the footer says so) get the cheaper select.
        encoding = reader.routing_encoding
        groups: dict[tuple[int, bool], list[str]] = {}
        for segment in segments:
            groups.setdefault((segment.rank, segment.full_rank), []).append(_quote_path(str(segment.path)))
        return " UNION ALL ".join(
            routing_select(", ".join(files), encoding, rank, full_rank) for (rank, full_rank), files in sorted(groups.items())
        )
    return " UNION ALL ".join(
        f"SELECT {columns}, CAST({rank} AS INTEGER) AS rank "
        f"FROM read_parquet([{', '.join(files)}], hive_partitioning = false, union_by_name = false)"
        for rank, files in sorted(by_rank.items())
    )


def stored_routing_invalid_sql(reader: TraceReader, checks: Callable[[Callable[[str], str]], tuple[list[str], list[str]]]) -> str | None:
    """A count of the logical routing rows that break the contract, made once per STORED row of a format-2 trace
    (None for format 1): the per-token checks are evaluated once per token instead of once per choice, which the
    logical view's K branches cost (half of a 100 M-decision report's load pass). ``checks(column)`` gives the
    contract's (per-token, per-choice) conditions with ``column(name)`` as each logical column's SQL, the same
    conditions as ``Context.valid_routing``; a logical row is valid exactly when both are true (NULL is not)."""
    found = _stored_groups(reader, checks)
    if found is None:
        return None
    encoding, token, groups = found
    parts = []
    for full_rank, files in sorted(groups.items()):
        bad = []
        for i in range(encoding.top_k):
            rank_sql, expert_sql = choice_sql(i, full_rank)
            _, choice = checks(_columns({"k": rank_sql, "expert": expert_sql}))
            ok = " AND ".join(f"({c})" for c in choice) or "true"
            bad.append(f"CASE WHEN {choice_used_sql(i, full_rank)} AND (token_ok_ IS NOT TRUE OR ({ok}) IS NOT TRUE) THEN 1 ELSE 0 END")
        token_ok = " AND ".join(f"({c})" for c in token) or "true"
        parts.append(
            f"SELECT coalesce(sum({' + '.join(bad)}), 0)::BIGINT AS n "
            f"FROM (SELECT *, ({token_ok}) AS token_ok_ FROM {stored_source(', '.join(files))})"
        )
    return f"SELECT coalesce(sum(n), 0)::BIGINT AS n FROM ({' UNION ALL '.join(parts)})"


def stored_routing_select(reader: TraceReader) -> str | None:
    """Every stored row of a format-2 trace's routing segments (one per (step, layer, token), the choices side by
    side, see ``traces.compact``) with its shard's ``rank``, as a SELECT; None for format 1 or no segment yet.
    For the passes that count tokens rather than decisions (``analysis.stored``)."""
    segments = reader.segments("routing")
    if reader.routing_encoding is None or not segments:
        return None
    by_rank: dict[int, list[str]] = {}
    for segment in segments:
        by_rank.setdefault(segment.rank, []).append(_quote_path(str(segment.path)))
    return " UNION ALL ".join(
        f"SELECT *, CAST({rank} AS INTEGER) AS rank FROM {stored_source(', '.join(files))}"
        for rank, files in sorted(by_rank.items())
    )


def stored_routing_any_invalid_sql(
    reader: TraceReader, checks: Callable[[Callable[[str], str]], tuple[list[str], list[str]]]
) -> str | None:
    """How many STORED rows of a format-2 trace hold at least one logical routing row that breaks the contract
    (None for format 1): positive exactly when ``stored_routing_invalid_sql`` is, at about half its cost (one
    condition per row instead of a CASE per choice), so that a clean trace, the usual one, is known clean
    without the exact count. A row is bad when some choice it uses fails the per-choice checks or the token fails
    the per-token ones (NULL counts as failing, as there)."""
    found = _stored_groups(reader, checks)
    if found is None:
        return None
    encoding, token, groups = found
    parts = []
    for full_rank, files in sorted(groups.items()):
        ok = [f"({c})" for c in token]
        for i in range(encoding.top_k):
            rank_sql, expert_sql = choice_sql(i, full_rank)
            _, choice = checks(_columns({"k": rank_sql, "expert": expert_sql}))
            if choice:
                ok.append(f"(NOT {choice_used_sql(i, full_rank)} OR ({' AND '.join(f'({c})' for c in choice)}))")
        parts.append(
            f"SELECT count(*)::BIGINT AS n FROM {stored_source(', '.join(files))} "
            f"WHERE NOT coalesce({' AND '.join(ok) or 'true'}, false)"
        )
    return f"SELECT coalesce(sum(n), 0)::BIGINT AS n FROM ({' UNION ALL '.join(parts)})"


def _stored_groups(
    reader: TraceReader, checks: Callable[[Callable[[str], str]], tuple[list[str], list[str]]]
) -> tuple[RoutingEncoding, list[str], dict[bool, list[str]]] | None:
    """For the stored-row contract checks: (the routing encoding, the per-token conditions over a stored row, the
    quoted segment paths by whether the segment is full-rank); None for format 1 or no segment yet."""
    encoding = reader.routing_encoding
    segments = reader.segments("routing")
    if encoding is None or not segments:
        return None
    token, _ = checks(_columns({"phase": phase_sql()}))
    groups: dict[bool, list[str]] = {}
    for segment in segments:
        groups.setdefault(segment.full_rank, []).append(_quote_path(str(segment.path)))
    return encoding, token, groups


def _columns(exprs: dict[str, str]) -> Callable[[str], str]:
    """A routing column's SQL over a stored row: its expression where it has one, else the stored column."""
    return lambda name: exprs.get(name, name)


def register_storage(con: duckdb.DuckDBPyConnection, reader: TraceReader) -> None:
    """Let ``con`` read the segments of a trace in an object store through the reader's fsspec filesystem (no
    httpfs extension, nothing downloaded at run time); nothing to do for a local trace."""
    fs = reader.filesystem
    if fs is None:
        return
    protocol = fs.protocol
    name = protocol[0] if isinstance(protocol, (tuple, list)) else protocol  # what DuckDB registers it under
    if name not in con.list_filesystems():
        con.register_filesystem(fs)


def create_views(con: duckdb.DuckDBPyConnection, reader: TraceReader) -> None:
    """(Re)create one view per table on ``con``."""
    register_storage(con, reader)
    for table in TABLES:
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {view_select(reader, table)}")
