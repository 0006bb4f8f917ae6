"""The SQL console's side of DuckDB: a statement check and a bounded run on a sandboxed connection.

What may run is decided by DuckDB's own parser (exactly one SELECT statement) and enforced by the connection the
query runs on: ``Trace.console_connection``, its own in-memory database with views over the trace's segments
and no access to any other file, locked (see ``analysis.console`` and docs/security.md). A refused query never
reaches DuckDB; a query DuckDB rejects comes back as its one-line message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...analysis.console import ConsoleRefused
from ...analysis.session import Trace

MAX_ROWS = 1000

# The screen's name for a refusal; the check itself lives with the sandbox it guards.
ReadOnlyError = ConsoleRefused


def check_read_only(query: str) -> str:
    """Return the query's one SELECT statement without its trailing semicolon, or raise ``ReadOnlyError``."""
    from ...analysis.console import check_statement

    return check_statement(query)


@dataclass(frozen=True)
class SqlResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    truncated: bool
    seconds: float


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        text = ", ".join(_cell(v) for v in value[:8])
        return f"[{text}{', …' if len(value) > 8 else ''}]"
    return str(value)


def run_sql(trace: Trace, query: str, max_rows: int = MAX_ROWS) -> SqlResult:
    """Run a checked query and fetch at most ``max_rows`` rows (a SELECT over 10 M rows must not fill memory)."""
    text = check_read_only(query)
    from ...analysis.duckdb_errors import duckdb_errors

    started = time.perf_counter()
    with duckdb_errors(trace.reader, typed_by_person=True):
        relation = trace.console_connection.sql(text)
        if relation is None:
            return SqlResult((), (), False, time.perf_counter() - started)
        columns = tuple(relation.columns)
        rows = relation.limit(max_rows + 1).fetchall()
    truncated = len(rows) > max_rows
    return SqlResult(
        columns,
        tuple(tuple(_cell(v) for v in row) for row in rows[:max_rows]),
        truncated,
        time.perf_counter() - started,
    )
