"""Per-expert load bars against the balance line (utilisation 1.0: the load under perfect balance)."""

from __future__ import annotations

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.geometry import Size
from textual.widget import Widget

from ..render import count, utilisation_color


class LoadBars(Widget):
    DEFAULT_CSS = """
    LoadBars { height: auto; width: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._counts = np.zeros(0, np.int64)

    def show(self, counts: np.ndarray) -> None:
        self._counts = np.asarray(counts)
        self.refresh(layout=True)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return max(1, len(self._counts)) + 1

    def render(self) -> Text:
        counts = self._counts
        total = float(counts.sum()) if len(counts) else 0.0
        if total <= 0:
            return Text("no routing decisions in this layer yet", style="dim")
        util = counts * len(counts) / total
        width = self.size.width or 60
        number_w = max(len(count(int(c))) for c in counts)
        bar_w = max(8, width - 4 - 7 - number_w - 1)
        top = max(float(util.max()), 1.25)  # leave room to the right of the balance line
        fair = min(bar_w - 1, int(round(bar_w / top)))
        out = Text(no_wrap=True, overflow="crop")
        out.append(" " * 4 + " " * fair + "│ fair share (1.0)", style="dim")
        for expert, (c, u) in enumerate(zip(counts, util, strict=True)):
            out.append(f"\n{expert:>3} ")
            filled = int(round(bar_w * u / top))
            color = utilisation_color(float(u))
            for x in range(bar_w):
                if x == fair:
                    # the balance line stays visible through the bar: drawn over it in the contrasting colour
                    out.append("┃" if x < filled else "│", style=Style(color="white", bold=True))
                elif x < filled:
                    out.append("█", style=Style(color=color))
                else:
                    out.append(" ")
            label = "dead" if c == 0 else f"{u:.2f}"
            out.append(f" {label:>5} ", style="bold red" if c == 0 else ("bold" if u >= 1.5 else ""))
            out.append(count(int(c)).rjust(number_w), style="dim")
        return out

