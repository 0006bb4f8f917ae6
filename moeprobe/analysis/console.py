"""A sandboxed DuckDB connection for SQL that a person types (the TUI's console).

Two independent locks, so that a hole in one is not a hole:

- statements: DuckDB's own parser splits the text and names each statement's type; exactly one ``SELECT``
  statement is accepted (``SELECT``, ``WITH``, ``FROM``, ``VALUES``, ``TABLE``, ``DESCRIBE``, ``SHOW`` and
  ``SUMMARIZE`` all parse as one). ``COPY``, ``ATTACH``, ``CREATE``, ``SET``, ``PRAGMA``, ``EXPLAIN`` (``EXPLAIN
  ANALYZE`` runs its statement) and everything else are refused before anything runs. No lexer of ours decides.
- the connection: its own in-memory database (never the one the analyses use, so nothing done here can change
  what the other screens show), whose views are created first; then spilling to a temp directory is turned off,
  file access is limited to exactly the segment files of the snapshot (``allowed_paths``), external access,
  extension install and autoload are turned off, and the configuration is locked. Even a statement the parser
  let through cannot read ``manifest.json``, another file, or write anywhere.

A refresh of the trace lists new segments, which the locked connection could not read: the console gets a new
connection for each snapshot (views only, cheap to build).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..traces.reader import TraceReader
from ..traces.schema import TABLES
from .quoting import sql_string_list
from .views import register_storage, view_select

if TYPE_CHECKING:
    import duckdb


class ConsoleRefused(ValueError):
    """The console refuses this text; the message says why in one line."""


def check_statement(text: str) -> str:
    """Return the one SELECT statement in ``text`` (without a trailing semicolon), or raise ``ConsoleRefused``."""
    import duckdb

    if not text.strip():
        raise ConsoleRefused("nothing to run")
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise ConsoleRefused(str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot parse the query") from exc
    if not statements:
        raise ConsoleRefused("nothing to run")
    if len(statements) > 1:
        raise ConsoleRefused("one statement at a time")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = str(statement.type.name) if hasattr(statement.type, "name") else str(statement.type)
        raise ConsoleRefused(
            f"read-only console: {kind} statements are not allowed; run a SELECT (or WITH, DESCRIBE, SHOW, SUMMARIZE) "
            "over the views routing, steps, latency, tags, scores, bias"
        )
    return statement.query.strip().rstrip(";").strip()


def sandboxed_connection(reader: TraceReader) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection with one view per table over ``reader``'s current segments, locked down."""
    import duckdb

    con = duckdb.connect(
        database=":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    try:
        register_storage(con, reader)  # an s3:// trace: its segments are read through the reader's filesystem
        files: list[str] = []
        for table in TABLES:
            con.execute(f"CREATE VIEW {table} AS {view_select(reader, table)}")
            files += [str(segment.path) for segment in reader.segments(table)]
        # Order matters: the temp directory must go before external access is turned off (DuckDB otherwise
        # allows the temp directory, by default ./.tmp in the working directory), and the lock comes last.
        # No progress bar: DuckDB draws it on stdout, over the console's (and the TUI's) output.
        con.execute("SET enable_progress_bar = false")
        con.execute("SET enable_progress_bar_print = false")
        con.execute("SET temp_directory = ''")
        con.execute("SET allowed_paths = " + sql_string_list(files))
        con.execute("SET allowed_directories = []")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con
