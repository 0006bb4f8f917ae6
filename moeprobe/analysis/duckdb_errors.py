"""The one place a DuckDB error becomes a moeprobe error (every DuckDB call over a trace goes through it).

- ``duckdb.IOException``: a segment could not be read; ``CorruptSegmentError`` naming the trace.
- any other ``duckdb.Error``: ``QueryError`` with DuckDB's first line. A decoding error in a segment's column data
  reaches us as a bare ``duckdb.Error``, so unless the query itself was wrong (parser, binder, catalog errors)
  the reader looks for the corrupt segment first and raises ``CorruptSegmentError`` naming the file.
- SQL a person typed into the sandboxed console: always ``QueryError``. There an I/O error is a path the sandbox
  refused or a file the person named, not a fault in the trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..traces.errors import CorruptSegmentError, QueryError, TraceError

if TYPE_CHECKING:
    from ..traces.reader import TraceReader


def first_line(exc: BaseException) -> str:
    """DuckDB's messages carry a multi-line context block; the CLI shows one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def translate(exc: Exception, reader: TraceReader, *, typed_by_person: bool = False) -> TraceError:
    """The ``TraceError`` that stands for ``exc`` (a ``duckdb.Error``) raised while querying ``reader``'s trace."""
    import duckdb

    if typed_by_person:
        return QueryError(first_line(exc))
    if isinstance(exc, duckdb.IOException):
        return CorruptSegmentError(f"{reader.path}: {first_line(exc)}")
    # A query the user got wrong (syntax, unknown name) is not worth a full read of every segment.
    if not isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)):
        reader.find_corrupt_segment()  # raises CorruptSegmentError naming the file, if there is one
    return QueryError(first_line(exc))


@contextmanager
def duckdb_errors(reader: TraceReader, *, typed_by_person: bool = False) -> Iterator[None]:
    """``with duckdb_errors(reader): con.sql(...)``: DuckDB errors leave as ``translate`` says."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise translate(exc, reader, typed_by_person=typed_by_person) from exc
