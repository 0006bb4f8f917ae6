"""DuckDB views over a trace: one view per table, over the complete segments listed by the reader.

Views are created over an explicit list of files (a snapshot), so a query never sees a segment that
appears half-way through it; ``Trace.refresh()`` re-creates them with the newer list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..traces.compact import routing_select
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
