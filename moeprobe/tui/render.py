"""Colour scales and small text renderings shared by the widgets (pure functions over numbers, Rich only)."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
# Utilisation is shown on a log2 scale centred on 1.0 (a fair share): 1/4 and 4 are the ends.
SCALE_STOPS = 2.0
_UNDER = (44, 123, 182)  # blue: colder than a fair share
_FAIR = (96, 96, 96)  # grey: balanced
_OVER = (227, 74, 51)  # red: hotter
_DEAD = Style(color="grey50", bgcolor="grey7")
# 16 distinguishable colours for experts; beyond that, hues spaced by the golden angle.
_PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> Color:
    return Color.from_rgb(*(round(x + (y - x) * t) for x, y in zip(a, b, strict=True)))


def utilisation_color(value: float) -> Color | None:
    """The cell colour for a utilisation c_e / c_bar; None for no data."""
    if value is None or math.isnan(value):
        return None
    if value <= 0:
        return Color.from_rgb(18, 18, 18)
    t = max(-1.0, min(1.0, math.log2(value) / SCALE_STOPS))
    return _mix(_FAIR, _UNDER, -t) if t < 0 else _mix(_FAIR, _OVER, t)


def utilisation_cell(value: float, width: int = 1) -> Text:
    color = utilisation_color(value)
    if color is None:
        return Text(" " * width)
    if value <= 0:
        return Text("·".center(width), style=_DEAD)
    # Foreground blocks rather than a background: the map still reads in a plain-text capture or a
    # terminal without colour, and one-cell gaps between wide cells keep the experts apart.
    return Text("█" * width if width < 3 else "██ ", style=Style(color=color))


def number_cell(value: float, width: int) -> Text:
    """A heat-map cell as its number (one decimal, coloured like the block it replaces)."""
    color = utilisation_color(value)
    if color is None:
        return Text(" " * width)
    if value <= 0:
        return Text("·".rjust(width - 1) + " ", style=_DEAD)
    text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
    return Text(text.rjust(width - 1)[: width - 1] + " ", style=Style(color=color))


def legend() -> Text:
    """The heat map's key: log scale from 1/4 to 4, 1.0 is a fair share, a dot is a dead expert."""
    text = Text("utilisation ")
    text.append("· ", style=_DEAD)
    text.append("dead ")
    for label, lo, hi in (("¼", 0.25, 0.5), ("½", 0.5, 1.0), ("1", 1.0, 2.0), ("2", 2.0, 4.0)):
        text.append(label)
        for i in range(4):
            value = lo * (hi / lo) ** ((i + 0.5) / 4)
            text.append("█", style=Style(color=utilisation_color(value)))
    text.append("4+  (1 = fair share c/c̄)")
    return text


def sparkline(values: Sequence[float], top: float | None = None) -> str:
    """Block characters scaled from 0 to ``top`` (defaults to the series' max)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return ""
    top = top if top and top > 0 else max(max(finite), 1e-9)
    out = []
    for v in values:
        if math.isnan(v):
            out.append(" ")
            continue
        level = int(round(max(0.0, min(1.0, v / top)) * (len(SPARK) - 1)))
        out.append(SPARK[level])
    return "".join(out)


def expert_color(expert: int) -> Color:
    if expert < len(_PALETTE):
        return Color.parse(_PALETTE[expert])
    hue = (expert * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return Color.from_rgb(r * 255, g * 255, b * 255)


def expert_style(expert: int | None) -> Style:
    """Background in the expert's colour with a readable foreground."""
    if expert is None:
        return Style(color="grey50")
    color = expert_color(expert)
    r, g, b = color.get_truecolor()
    dark = 0.299 * r + 0.587 * g + 0.114 * b > 140
    return Style(bgcolor=color, color="black" if dark else "white")


def number(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def count(value: int) -> str:
    """1,234 below a million, then 1.2M, 12.3G: header fields stay narrow at 80 columns."""
    if value < 1_000_000:
        return f"{value:,}"
    if value < 1_000_000_000:
        return f"{value / 1e6:.1f}M"
    return f"{value / 1e9:.1f}G"
