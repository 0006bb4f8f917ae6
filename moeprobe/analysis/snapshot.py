"""What the analyses keep per snapshot of a trace's segments, owned by the ``Trace`` and dropped by ``refresh()``.

Analyses see it through ``Context`` (``materialize``, ``_has_invalid``) and never reach into the ``Trace``'s
fields: a new thing to remember per snapshot goes here, with its reset in ``clear``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb


class SnapshotCache:
    """Temporary tables built from this snapshot (per filters), and the count of its invalid routing rows."""

    def __init__(self) -> None:
        self._tables: set[str] = set()
        # Routing rows that break the table's contract (see Context.valid_routing); None until counted.
        self.invalid_total: int | None = None

    def table(self, name: str, create: Callable[[str], object]) -> str:
        """``name``, after ``create(name)`` has built it once for this snapshot."""
        if name not in self._tables:
            create(name)
            self._tables.add(name)
        return name

    @property
    def names(self) -> frozenset[str]:
        """The temporary tables built for this snapshot so far."""
        return frozenset(self._tables)

    def adopt(self, name: str) -> None:
        """Remember ``name``, a table built elsewhere for this snapshot (``Context.seed``), to drop it with the rest."""
        self._tables.add(name)

    def clear(self, con: duckdb.DuckDBPyConnection | None) -> None:
        """Forget this snapshot: drop its tables from ``con`` (when it is open) and the counts."""
        if con is not None:
            for name in self._tables:
                con.execute(f"DROP TABLE IF EXISTS {name}")
        self._tables.clear()
        self.invalid_total = None
