"""DuckDB views over a trace: one view per table, over the complete segments listed by the reader.

Views are created over an explicit list of files (a snapshot), so a query never sees a segment that
appears half-way through it; ``Trace.refresh()`` re-creates them with the newer list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..traces.reader import TraceReader
from ..traces.schema import TABLES, with_rank

if TYPE_CHECKING:
    import duckdb


def _quote_path(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


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


def create_views(con: duckdb.DuckDBPyConnection, reader: TraceReader) -> None:
    """(Re)create one view per table on ``con``."""
    for table in TABLES:
        segments = reader.segments(table)
        if not segments:
            select = _empty_select(table)
        else:
            files = ", ".join(_quote_path(str(s.path)) for s in segments)
            columns = ", ".join(f.name for f in TABLES[table])
            # The rank comes from the shard directory name (rank=R), Hive style.
            select = (
                f"SELECT {columns}, CAST(rank AS INTEGER) AS rank "
                f"FROM read_parquet([{files}], hive_partitioning = true, union_by_name = false)"
            )
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {select}")
