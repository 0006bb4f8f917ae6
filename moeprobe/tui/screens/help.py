"""The ``?`` overlay: every key of the screen underneath (its own, hidden ones included) and the app's."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static


def key_rows(app_bindings: Iterable[BindingType], screen: Screen[object], display: object) -> list[tuple[str, str]]:
    """(keys, what they do) for ``screen``: its bindings, its ``HELP_KEYS`` (keys its widgets handle, e.g. Enter
    on a table), then the app's. ``display`` is the app's ``get_key_display``."""
    rows: list[tuple[str, str]] = []

    def add(bindings: Iterable[BindingType]) -> None:
        for binding in bindings:
            if not isinstance(binding, Binding):
                continue
            keys = binding.key_display or ", ".join(display(Binding(k.strip(), "")) for k in binding.key.split(","))  # type: ignore[operator]
            rows.append((keys, binding.description or binding.action))

    add(type(screen).BINDINGS)
    rows.extend(getattr(screen, "HELP_KEYS", ()))
    add(app_bindings)
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen #help-box { width: 76; max-width: 96%; height: auto; max-height: 90%; border: round $accent;
                           background: $panel; padding: 0 1; }
    HelpScreen #help-text { width: 100%; height: auto; }
    """

    def __init__(self, title: str, rows: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.rows = rows

    def compose(self) -> ComposeResult:
        width = max((len(keys) for keys, _ in self.rows), default=4) + 2
        text = Text(f"{self.title_text}: keys\n", style="bold")
        for keys, what in self.rows:
            text.append(f"{keys:<{width}}", style="bold cyan")
            text.append(f"{what}\n")
        text.append("Esc or ? closes this help", style="dim")
        with VerticalScroll(id="help-box"):
            yield Static(text, id="help-text")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
