"""The SQL console's side of DuckDB: a read-only guard and a bounded run.

The guard is lexical and conservative: it strips comments and quoted text, allows one statement that starts with
a reading keyword, and refuses any word that writes, loads code, changes settings or reaches files other than the
trace's. A refused query never reaches DuckDB; a query DuckDB rejects comes back as its one-line message. Behind the
guard, ``Trace.restrict_to_trace()`` confines the connection itself (DuckDB reads quoted file names as tables in
more places than a lexer can list).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ...analysis.session import Trace

MAX_ROWS = 1000

ALLOWED_FIRST = ("SELECT", "WITH", "DESCRIBE", "SHOW", "EXPLAIN", "SUMMARIZE", "FROM", "VALUES", "TABLE")
FORBIDDEN = (
    "ALTER", "ATTACH", "CALL", "CHECKPOINT", "COPY", "CREATE", "DELETE", "DETACH", "DROP", "EXPORT", "IMPORT",
    "INSERT", "INSTALL", "LOAD", "MERGE", "PRAGMA", "RESET", "SET", "TRUNCATE", "UPDATE", "USE", "VACUUM",
)
# Table functions and settings that would read outside the trace's views or change the session.
FORBIDDEN_CALLS = re.compile(
    r"\b(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|getenv|current_setting|duckdb_secrets|query_table|query)\s*\(",
    re.IGNORECASE,
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$\$.*?\$\$", re.DOTALL)
_WORD = re.compile(r"[A-Za-z_]+")
# DuckDB reads a quoted file name in FROM as a table (a "replacement scan"): FROM '/etc/passwd' would read it.
# Checked after each literal is replaced by a placeholder, so that words inside literals do not count.
_FILE_AS_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+[\"']|,\s*[\"']F[\"']", re.IGNORECASE)
_FILE_NAME = re.compile(r"\.(?:csv|tsv|txt|json|jsonl|ndjson|parquet|gz|zst)\W?$", re.IGNORECASE)


def _placeholder(match: re.Match[str]) -> str:
    quote = match.group(0)[0]
    return f"{quote}{'F' if _FILE_NAME.search(match.group(0)) else 'Q'}{quote}"


class ReadOnlyError(ValueError):
    """The console refuses this statement; the message says why."""


def check_read_only(query: str) -> str:
    """Return the query without its trailing semicolon, or raise ``ReadOnlyError``."""
    bare = _QUOTED.sub(_placeholder, _COMMENTS.sub(" ", query)).strip()
    if _FILE_AS_TABLE.search(bare):
        raise ReadOnlyError("read-only console: file names are not tables here; query the views routing, steps, "
                            "latency, tags, scores, bias")
    bare = bare.rstrip(";").strip()
    if not bare:
        raise ReadOnlyError("nothing to run")
    if ";" in bare:
        raise ReadOnlyError("one statement at a time")
    words = [w.upper() for w in _WORD.findall(bare)]
    if not words or words[0] not in ALLOWED_FIRST:
        raise ReadOnlyError(f"read-only console: start with {', '.join(ALLOWED_FIRST[:5])}")
    bad = sorted(set(words) & set(FORBIDDEN))
    if bad:
        raise ReadOnlyError(f"read-only console: {bad[0]} is not allowed")
    call = FORBIDDEN_CALLS.search(bare)
    if call:
        raise ReadOnlyError(f"read-only console: {call.group(1)}() is not allowed; query the views "
                            "routing, steps, latency, tags, scores, bias")
    return query.strip().rstrip(";").strip()


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
    import duckdb

    from ...analysis.session import QueryError

    started = time.perf_counter()
    # The lexical guard refuses the obvious; the connection itself is then confined to the trace's files, with
    # extension loading off and its settings locked, so whatever the guard misses still cannot reach out.
    trace.restrict_to_trace()
    try:
        relation = trace.connection.sql(text)
        if relation is None:
            return SqlResult((), (), False, time.perf_counter() - started)
        columns = tuple(relation.columns)
        rows = relation.limit(max_rows + 1).fetchall()
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from exc
    truncated = len(rows) > max_rows
    return SqlResult(
        columns,
        tuple(tuple(_cell(v) for v in row) for row in rows[:max_rows]),
        truncated,
        time.perf_counter() - started,
    )
