"""A sequence's tokens as text, each coloured by its first expert in one layer, with a movable cursor.

Layout is done here (not by Rich wrapping) so that a click can be mapped back to the token under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.events import Click
from textual.geometry import Size
from textual.message import Message
from textual.widget import Widget

from ..render import expert_style


@dataclass(frozen=True)
class TokenCell:
    text: str  # may end with "\n" (a newline token ends its line)
    expert: int | None


class TokenText(Widget, can_focus=True):
    DEFAULT_CSS = """
    TokenText { height: auto; width: 1fr; padding: 0 1; }
    """

    class CursorMoved(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._cells: list[TokenCell] = []
        self.cursor = 0
        self._places: list[tuple[int, int, int]] = []  # per token: line, first column, last column (exclusive)

    @property
    def cells(self) -> list[TokenCell]:
        return list(self._cells)

    def show(self, cells: Sequence[TokenCell], cursor: int) -> None:
        self._cells = list(cells)
        self.cursor = max(0, min(cursor, len(cells) - 1)) if cells else 0
        self.refresh(layout=True)

    def move_to(self, index: int) -> None:
        if not self._cells:
            return
        index = max(0, min(index, len(self._cells) - 1))
        if index != self.cursor:
            self.cursor = index
            self.refresh()
        self.post_message(self.CursorMoved(index))

    def _layout(self, width: int) -> list[list[tuple[int, str]]]:
        """Lines of (token index, visible text); tokens wrap whole when they fit on a line."""
        width = max(4, width)
        lines: list[list[tuple[int, str]]] = [[]]
        used = 0
        self._places = []
        for i, cell in enumerate(self._cells):
            breaks = cell.text.endswith("\n")
            visible = cell.text.rstrip("\n") or " "
            if used and used + len(visible) > width:
                lines.append([])
                used = 0
            self._places.append((len(lines) - 1, used, used + len(visible)))
            lines[-1].append((i, visible))
            used += len(visible)
            if breaks:
                lines.append([])
                used = 0
        return lines

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return max(1, len(self._layout(width)))

    def render(self) -> Text:
        if not self._cells:
            return Text("no tokens", style="dim")
        out = Text(no_wrap=True, overflow="crop")
        for n, line in enumerate(self._layout(self.content_size.width or 80)):
            if n:
                out.append("\n")
            for i, visible in line:
                style = expert_style(self._cells[i].expert)
                if i == self.cursor:
                    style += Style(reverse=True, bold=True, underline=True)
                out.append(visible, style=style)
        return out

    def cursor_line(self) -> int:
        return self._places[self.cursor][0] if self.cursor < len(self._places) else 0

    def on_click(self, event: Click) -> None:
        x, y = event.x - 1, event.y  # one column of padding on the left
        for i, (line, a, b) in enumerate(self._places):
            if line == y and a <= x < b:
                self.focus()
                self.move_to(i)
                return
