"""SQL: a read-only DuckDB console over the trace's views; results in a table, at most 1000 rows."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Static

from ...safe_text import printable
from ..queries.sql import MAX_ROWS, ReadOnlyError, SqlResult, run_sql
from .base import TraceScreen

EXAMPLE = "SELECT layer, expert, count(*) AS n FROM routing GROUP BY ALL ORDER BY n DESC LIMIT 20"


class SqlScreen(TraceScreen):
    LIVE = False  # a console re-runs what the user typed only when asked
    BINDINGS = [
        Binding("escape", "leave", "Leave editor", show=False),
        Binding("slash", "edit", "Edit query"),
        Binding("up", "history(-1)", "Previous query", show=False),
        Binding("down", "history(1)", "Next query", show=False),
    ]
    HELP_KEYS = (("Enter", "run the query (empty: the example); the editor keeps the focus"),
                 ("Esc", "leave the editor, so that 1-6, q and ? work; / comes back"))
    DEFAULT_CSS = """
    SqlScreen #query { margin: 0 1; }
    SqlScreen #sql-status { padding: 0 1; color: $text-muted; }
    SqlScreen #result { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.query_text = ""
        self.result: SqlResult | None = None
        self.history: list[str] = []  # queries run, oldest first, no repeats in a row
        self._history_at: int | None = None  # index into history while browsing it with up/down

    def compose_body(self) -> ComposeResult:
        yield Input(placeholder=EXAMPLE, id="query")
        yield Static(id="sql-status")
        yield DataTable(id="result", zebra_stripes=True)

    def on_mount(self) -> None:
        self._status(Text.assemble(
            "views: routing, steps, latency, tags, scores, bias. ",
            ("Enter", "bold"), " runs (empty: the example), ", ("Esc", "bold"), " leaves the editor so 1-6 switch "
            "screens, ", ("/", "bold"), " comes back. Read-only: SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE.",
        ))
        self.query_one(Input).focus()

    def _status(self, text: Text | str) -> None:
        self.query_one("#sql-status", Static).update(text)

    def fetch(self) -> Any:
        query = self.query_text
        if not query:
            return None
        return self.source.read(lambda trace: run_sql(trace, query))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip() or EXAMPLE
        try:
            from ..queries.sql import check_read_only

            check_read_only(text)
        except ReadOnlyError as exc:
            self._status(Text(f"✗ {printable(exc)}", style="bold red"))
            return
        self.query_text = text
        if not self.history or self.history[-1] != text:
            self.history.append(text)
        self._history_at = None
        self._status("running …")
        self.reload()

    def show(self, data: SqlResult) -> None:
        self.result = data
        table = self.query_one("#result", DataTable)
        table.clear(columns=True)
        # Text cells, not str: DataTable parses a str as markup, and a tag value such as "[/]" would crash the
        # screen (or style itself); printable() shows control characters as escapes.
        table.add_columns(*(Text(printable(c)) for c in data.columns))
        table.add_rows([[Text(printable(c)) for c in row] for row in data.rows])
        more = f" (first {MAX_ROWS} shown)" if data.truncated else ""
        self._status(f"{len(data.rows)} row(s){more} in {data.seconds * 1000:.0f} ms · ↑ ↓ history · Esc leaves "
                     "the editor (then 1-6 switch screens)")
        # The focus stays where the user typed: a key typed next belongs to the query, never to the screen keys.

    def on_fetch_failed(self, message: Any) -> None:
        # A DuckDB error is the user's to fix: show it where they look, not in the trace's banner.
        message.prevent_default()
        message.stop()
        self._busy = False
        self._status(Text(f"✗ {printable(message.message)}", style="bold red"))

    def action_history(self, delta: int) -> None:
        """Up/down in the editor walk through the queries run so far (the result table keeps its own keys)."""
        editor = self.query_one(Input)
        if not editor.has_focus or not self.history:
            return
        at = len(self.history) if self._history_at is None else self._history_at
        at = max(0, min(len(self.history), at + delta))
        self._history_at = at
        editor.value = self.history[at] if at < len(self.history) else ""
        editor.cursor_position = len(editor.value)

    def action_leave(self) -> None:
        self.query_one("#result", DataTable).focus()

    def action_edit(self) -> None:
        self.query_one(Input).focus()
