"""The object ``moeprobe.open_trace`` returns: a thin facade over the reader and a DuckDB connection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..traces.errors import CorruptSegmentError, TraceError
from ..traces.reader import TraceReader

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa


class QueryError(TraceError):
    """A SQL query over the trace failed (syntax, unknown column, ...)."""


class Trace:
    """A trace opened for reading and analysis.

    ``manifest``, ``routing()`` and the other tables come straight from the Parquet files (pyarrow);
    ``sql()`` runs DuckDB over views named after the tables (routing, steps, latency, tags, scores, bias).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.reader = TraceReader(path)
        self._con: duckdb.DuckDBPyConnection | None = None

    # -- metadata and tables (pyarrow) --------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.reader.manifest

    @property
    def status(self) -> str:
        return self.reader.status

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.reader.layers

    def routing(self) -> pa.Table:
        return self.reader.routing()

    def steps(self) -> pa.Table:
        return self.reader.steps()

    def latency(self) -> pa.Table:
        return self.reader.latency()

    def tags(self) -> pa.Table:
        return self.reader.tags()

    def scores(self) -> pa.Table:
        return self.reader.scores()

    def bias(self) -> pa.Table:
        return self.reader.bias()

    def refresh(self) -> None:
        """Pick up segments written since the trace was opened (or last refreshed)."""
        self.reader.refresh()
        if self._con is not None:
            from .views import create_views

            create_views(self._con, self.reader)

    # -- DuckDB -------------------------------------------------------------------------------------
    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            import duckdb

            from .views import create_views

            con = duckdb.connect(database=":memory:")
            create_views(con, self.reader)
            self._con = con
        return self._con

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run SQL over the trace's views and return the result as a pyarrow Table."""
        import duckdb

        try:
            return self.connection.sql(query, params=params).to_arrow_table()
        except duckdb.IOException as exc:
            raise CorruptSegmentError(f"{self.path}: {str(exc).splitlines()[0]}") from exc
        except duckdb.Error as exc:
            raise QueryError(str(exc).splitlines()[0]) from exc

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, status={self.status!r}, layers={len(self.layers)})"


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open a trace directory for reading. Raises a ``TraceError`` subclass if it is not usable."""
    return Trace(path)
