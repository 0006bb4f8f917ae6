"""The run header every screen shows, and the banner line for waiting, stale and error states."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from ...safe_text import printable
from ..render import count
from ..source import Snapshot

_STATUS_STYLE = {
    "running": "bold black on green",
    "complete": "bold black on grey70",
    "aborted": "bold white on dark_orange3",
    "stale": "bold white on red",
}


class RunHeader(Static):
    DEFAULT_CSS = """
    RunHeader { height: auto; padding: 0 1; background: $boost; }
    """

    def show(self, snapshot: Snapshot, label: str = "") -> None:
        run = snapshot.run
        text = Text(no_wrap=False, overflow="ellipsis")
        if label:
            text.append(f"{label} ", style="bold")
        if run is None:
            # Names come from the trace and its path: printable() keeps terminal control codes out of the screen.
            text.append(printable(getattr(snapshot.path, "name", "") or str(snapshot.path)), style="bold")
            text.append("  no trace yet", style="dim")
            self.update(text)
            return
        text.append(f" {run.status} ", style=_STATUS_STYLE.get(run.status, "reverse"))
        text.append(f" {printable(run.name)}", style="bold")
        text.append(f" ({printable(run.family)})  ", style="dim")
        text.append(f"{run.layers} layers × {run.experts} experts, top-{run.top_k}  ")
        text.append(f"{count(run.tokens)} tokens  {count(run.steps)} steps  {count(run.decisions)} decisions")
        if run.dropped:
            text.append(f"  {count(run.dropped)} dropped", style="bold red")
        else:
            text.append("  0 dropped", style="dim")
        self.update(text)


class Banner(Static):
    """One line under the header; hidden while there is nothing to say."""

    DEFAULT_CSS = """
    Banner { height: auto; padding: 0 1; display: none; }
    Banner.-waiting { display: block; background: $primary-muted; }
    Banner.-error { display: block; background: $error-muted; color: $text; text-style: bold; }
    Banner.-stale { display: block; background: $warning-muted; }
    """

    def show(self, snapshot: Snapshot, note: str = "") -> None:
        self.set_classes("")
        message, kind = "", ""
        if snapshot.state == "waiting":
            message, kind = f"⏳ {snapshot.message}", "-waiting"
        elif snapshot.state == "error":
            message, kind = f"✗ {snapshot.message}", "-error"
        elif snapshot.run is not None and snapshot.run.status in ("stale", "aborted"):
            message, kind = f"⚠ {snapshot.run.status_note}; complete segments are shown", "-stale"
        elif note:
            message, kind = note, "-error" if note.startswith("✗") else "-waiting"
        # Text, not str: an error message quotes paths and file contents, which must not be parsed as markup.
        self.update(Text(printable(message)))
        if kind:
            self.add_class(kind)
