"""A rows x columns heat map of ratios to a fair share (1.0 = fair), with an axis, a legend and clickable rows.

Columns are experts (or time windows). When they do not fit, neighbouring columns are merged and the cell shows
their maximum, so a hot expert never disappears in the merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.text import Text
from textual.events import Click
from textual.geometry import Size
from textual.message import Message
from textual.widget import Widget

from ..render import legend, number_cell, utilisation_cell

MAX_CELL = 3
NUMBER_CELL = 4  # "1.5 ": a value with one decimal and a gap


@dataclass(frozen=True)
class HeatRow:
    label: str
    key: int
    values: np.ndarray


class HeatMap(Widget):
    DEFAULT_CSS = """
    HeatMap { height: auto; width: 1fr; }
    """

    class RowClicked(Message):
        def __init__(self, heatmap: HeatMap, key: int) -> None:
            super().__init__()
            self.heatmap = heatmap
            self.key = key

        @property
        def control(self) -> HeatMap:
            return self.heatmap

    def __init__(self, *, column_name: str = "expert", show_legend: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.column_name = column_name
        self.show_legend = show_legend
        self._rows: list[HeatRow] = []
        self._note = ""
        self._empty = "no data yet"
        self.numbers = False  # cells show the value (one decimal) instead of a coloured block

    def show(self, rows: Sequence[HeatRow], note: str = "", *, empty: str = "no data yet") -> None:
        """``empty`` is what an empty map says (why there is nothing to show)."""
        self._rows = list(rows)
        self._note = note
        self._empty = empty
        self.refresh(layout=True)

    def toggle_numbers(self) -> None:
        self.numbers = not self.numbers
        self.refresh(layout=True)

    @property
    def rows(self) -> list[HeatRow]:
        return list(self._rows)

    def _geometry(self, width: int) -> tuple[int, int, int]:
        """(label width, cell width, columns merged per cell)."""
        columns = max((len(r.values) for r in self._rows), default=0)
        label = max((len(r.label) for r in self._rows), default=0) + 1
        room = max(1, width - label)
        if columns == 0:
            return label, 1, 1
        if self.numbers:
            per_cell = max(1, room // NUMBER_CELL)
            return label, NUMBER_CELL, math.ceil(columns / per_cell) if columns > per_cell else 1
        if columns <= room:
            return label, max(1, min(MAX_CELL, room // columns)), 1
        return label, 1, math.ceil(columns / room)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._rows) + 1 + (1 if self.show_legend else 0) + (1 if self._note else 0)

    def render(self) -> Text:
        if not self._rows:
            return Text(self._empty, style="dim")
        width = self.size.width or 80
        label_w, cell, merge = self._geometry(width)
        columns = max(len(r.values) for r in self._rows)
        cells = math.ceil(columns / merge)
        out = Text(no_wrap=True, overflow="crop")
        out.append(self._axis(label_w, cell, merge, cells), style="dim")
        for row in self._rows:
            out.append("\n")
            out.append(row.label.rjust(label_w - 1) + " ", style="bold")
            for c in range(cells):
                chunk = row.values[c * merge : (c + 1) * merge]
                finite = chunk[~np.isnan(chunk)] if len(chunk) else chunk
                value = float(finite.max()) if len(finite) else math.nan
                out.append_text(number_cell(value, cell) if self.numbers else utilisation_cell(value, cell))
        if self.show_legend:
            out.append("\n")
            out.append_text(legend())
            if self.numbers:
                out.append("  numbers: c/c̄", style="dim")
        if self._note or merge > 1:
            note = self._note
            if merge > 1:
                note = f"{merge} {self.column_name}s per cell (their max)" + (f"; {note}" if note else "")
            out.append("\n" + note, style="dim")
        return out

    def _axis(self, label_w: int, cell: int, merge: int, cells: int) -> str:
        # A tick every 8 cells (every 4 when cells are wide), labelled with the first column in that cell.
        every = 4 if cell >= 3 else 8
        line = [" "] * (label_w + cells * cell)
        # The column name goes in the label column only where it fits whole; a cut-off word reads as a typo.
        head = f"{self.column_name} "
        if len(head) <= label_w:
            line[label_w - len(head) : label_w] = list(head)
        for c in range(0, cells, every):
            tag = str(c * merge)
            start = label_w + c * cell
            if start + len(tag) <= len(line):
                line[start : start + len(tag)] = list(tag)
        return "".join(line)

    def on_click(self, event: Click) -> None:
        index = event.y - 1  # the axis takes the first line
        if 0 <= index < len(self._rows):
            self.post_message(self.RowClicked(self, self._rows[index].key))
