"""Compare: two traces' overviews side by side (given as ``moeprobe tui A B``), with B − A per layer."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable

from ..queries.overview import Overview, overview
from ..render import number
from ..widgets.header import RunHeader
from ..widgets.heatmap import HeatMap, HeatRow
from .base import TraceScreen


def _delta(a: float, b: float) -> Text:
    if math.isnan(a) or math.isnan(b):
        return Text("-", style="dim")
    d = b - a
    # Lower imbalance is better: a drop reads green, a rise red.
    return Text(f"{d:+.2f}", style="green" if d < -0.005 else ("red" if d > 0.005 else "dim"))


class CompareScreen(TraceScreen):
    SOURCES = (0, 1)
    DEFAULT_CSS = """
    CompareScreen #sides { height: auto; max-height: 55%; }
    CompareScreen #sides > VerticalScroll { height: auto; width: 1fr; padding: 0 1; }
    /* Both run headers take the same height, however each one wraps, so that the heat maps' rows line up. */
    CompareScreen #sides RunHeader { height: 4; }
    CompareScreen #diff { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: tuple[Overview | None, Overview | None] | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="sides"):
            with VerticalScroll(id="side-a"):
                yield RunHeader(id="head-a")
                yield HeatMap(id="heat-a")
            with VerticalScroll(id="side-b"):
                yield RunHeader(id="head-b")
                yield HeatMap(id="heat-b")
        yield DataTable(id="diff", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        table = self.query_one("#diff", DataTable)
        for label in ("layer", "MaxVio A", "MaxVio B", "B−A", "CV A", "CV B", "B−A", "dead A", "dead B"):
            table.add_column(label)

    def refresh_header(self) -> None:
        super().refresh_header()
        sources = self.moeprobe.sources
        if len(sources) > 1:
            self.query_one("#head-a", RunHeader).show(sources[0].snapshot, "A")
            self.query_one("#head-b", RunHeader).show(sources[1].snapshot, "B")

    def fetch(self) -> Any:
        sources = self.moeprobe.sources
        if len(sources) < 2:
            return None
        return (sources[0].read(overview), sources[1].read(overview))

    def show(self, data: tuple[Overview | None, Overview | None]) -> None:
        self.data = data
        a, b = data
        for side, item in (("a", a), ("b", b)):
            rows = [HeatRow(f"L{r.layer}", r.layer, r.utilisation) for r in item.layers] if item else []
            self.query_one(f"#heat-{side}", HeatMap).show(rows)
        table = self.query_one("#diff", DataTable)
        table.clear()
        rows_a = {r.layer: r for r in a.layers} if a else {}
        rows_b = {r.layer: r for r in b.layers} if b else {}
        for layer in sorted(set(rows_a) | set(rows_b)):
            ra, rb = rows_a.get(layer), rows_b.get(layer)
            va = (ra.maxvio, ra.cv) if ra else (math.nan, math.nan)
            vb = (rb.maxvio, rb.cv) if rb else (math.nan, math.nan)
            table.add_row(
                f"L{layer}",
                number(va[0]), number(vb[0]), _delta(va[0], vb[0]),
                number(va[1]), number(vb[1]), _delta(va[1], vb[1]),
                str(len(ra.dead)) if ra else "-", str(len(rb.dead)) if rb else "-",
            )
