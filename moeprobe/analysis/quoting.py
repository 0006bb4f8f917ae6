"""The one way a string becomes SQL text: a single-quoted literal with its quotes doubled.

Filters, views and the console's configuration write values into SQL as literals (see ``filters`` for why);
every such value goes through here, so there is one escaping rule to check.
"""

from __future__ import annotations

from collections.abc import Iterable


def sql_literal(value: str) -> str:
    """``it's`` -> ``'it''s'``: a DuckDB string literal that reads back as ``value``."""
    return "'" + value.replace("'", "''") + "'"


def sql_string_list(values: Iterable[str]) -> str:
    """``['a', 'b']``: a DuckDB list of string literals."""
    return "[" + ", ".join(sql_literal(value) for value in values) + "]"
