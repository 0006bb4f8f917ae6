"""Overview: the layer x expert utilisation heat map and per-layer imbalance, sortable by the worst layer."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from ..queries.overview import Overview, overview, quick_overview
from ..render import count, number, sparkline
from ..widgets.heatmap import HeatMap, HeatRow
from .base import Refinements, TraceScreen

# Fixed columns take about this many cells; the MaxVio sparkline gets what is left, within these bounds.
_FIXED_COLUMNS = 61
_SPARK_MIN, _SPARK_MAX = 8, 48


class OverviewScreen(TraceScreen):
    BINDINGS = [Binding("s", "sort", "Sort"), Binding("v", "numbers", "Values")]
    HELP_KEYS = (("↑ ↓", "choose a layer in the table"), ("Enter", "open the chosen layer (Layer screen)"),
                 ("click", "a heat-map row opens its layer"))
    DEFAULT_CSS = """
    OverviewScreen #heat-box { height: auto; max-height: 55%; padding: 0 1; }
    OverviewScreen #table-title { padding: 0 1; color: $text-muted; text-wrap: nowrap; text-overflow: ellipsis; }
    OverviewScreen #layers { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.sort_worst = False
        self.data: Overview | None = None

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="heat-box"):
            yield HeatMap(id="heat")
        yield Static(id="table-title")
        yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#layers", DataTable)
        for label, key in (("layer", "layer"), ("MaxVio", "maxvio"), ("random", "random"), ("batch", "batch"),
                           ("CV", "cv"), ("dead", "dead"), ("tokens", "tokens"), ("MaxVio, recent steps", "recent")):
            table.add_column(label, key=key)
        self._title()
        # Enter opens the chosen layer right away: the table, not the heat map's scroll box, has the focus.
        table.focus()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.query_one("#layers", DataTable).focus()

    def fetch(self) -> Any:
        source = self.source
        if source.trace is None:
            return None
        # One GROUP BY paints the heat map and the whole-trace columns; the per-step pass fills in after.
        return Refinements((lambda: source.read(quick_overview), lambda: source.read(overview)))

    def show(self, data: Overview) -> None:
        self.data = data
        self._redraw()

    def _title(self) -> None:
        order = "worst MaxVio first" if self.sort_worst else "layer order"
        self.query_one("#table-title", Static).update(
            Text.assemble(
                ("MaxVio", "bold"), " (max−fair)/fair: whole trace, ", ("random", "bold"), " routing for comparison; ",
                ("batch", "bold"), ": mean per step · ", f"{order} (s) · Enter opens a layer · ? keys",
                no_wrap=True, overflow="ellipsis",
            )
        )

    def _redraw(self) -> None:
        data = self.data
        if data is None:
            return
        rows = data.worst_first() if self.sort_worst else list(data.layers)
        self.query_one("#heat", HeatMap).show([HeatRow(f"L{r.layer}", r.layer, r.utilisation) for r in rows])
        table = self.query_one("#layers", DataTable)
        keep = None
        if table.row_count:
            keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        spark_n = max(_SPARK_MIN, min(_SPARK_MAX, self.size.width - _FIXED_COLUMNS))
        # One scale for all layers, so that a tall bar means the same in every row.
        top = max((v for r in rows for v in r.recent[-spark_n:]), default=0.0)
        for r in rows:
            dead = Text(str(len(r.dead)), style="bold red" if r.dead else "dim")
            table.add_row(
                f"L{r.layer}",
                Text(number(r.maxvio), style="bold" if r.maxvio >= 1 else ""),
                Text(number(r.random_maxvio), style="dim"),
                number(r.maxvio_batch) if data.complete else Text("…", style="dim"),
                number(r.cv),
                dead,
                count(r.tokens),
                Text(sparkline(r.recent[-spark_n:], top), style="yellow"),
                key=str(r.layer),
            )
        if keep is not None and keep in table.rows:
            table.move_cursor(row=table.get_row_index(keep), animate=False)
        self._title()

    def action_numbers(self) -> None:
        self.query_one("#heat", HeatMap).toggle_numbers()

    def action_sort(self) -> None:
        self.sort_worst = not self.sort_worst
        self._redraw()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.moeprobe.open_layer(int(event.row_key.value))

    def on_heat_map_row_clicked(self, event: HeatMap.RowClicked) -> None:
        self.moeprobe.open_layer(event.key)
