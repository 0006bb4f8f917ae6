"""Layer: one MoE layer in depth. ``[`` and ``]`` change the layer; the choice is shared with the other screens."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import Resize
from textual.widgets import Static

from ...safe_text import printable
from ..queries.layer import LayerDetail, Timing, layer_detail
from ..render import number
from ..widgets.heatmap import HeatMap, HeatRow
from ..widgets.loadbars import LoadBars
from .base import TraceScreen

# Below this width the two columns stack.
_TWO_COLUMNS = 110


def _timing(label: str, t: Timing | None) -> str:
    if t is None:
        return f"{label:<7}  not recorded"
    return f"{label:<7}  p50 {t.p50:8.3f} ms   p99 {t.p99:8.3f} ms   n={t.n}"


class LayerScreen(TraceScreen):
    BINDINGS = [Binding("left_square_bracket", "layer(-1)", "Prev layer", show=False),
                Binding("right_square_bracket", "layer(1)", "Layer", key_display="[ ]")]
    DEFAULT_CSS = """
    LayerScreen #layer-title { padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    LayerScreen #layer-body { height: 1fr; }
    LayerScreen #split { height: auto; }
    LayerScreen #split > Vertical { height: auto; width: 1fr; padding: 0 1; }
    LayerScreen.-narrow #split { layout: vertical; }
    LayerScreen .section { text-style: bold; margin-top: 1; }
    LayerScreen .note { color: $text-muted; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: LayerDetail | None = None

    def compose_body(self) -> ComposeResult:
        yield Static(id="layer-title")
        with VerticalScroll(id="layer-body"):
            with Horizontal(id="split"):
                with Vertical(id="left"):
                    yield Static("load per expert (share of the fair load; │ marks 1.0)", classes="section")
                    yield LoadBars(id="bars")
                with Vertical(id="right"):
                    yield Static("latency", classes="section")
                    yield Static(id="latency")
                    yield Static("router bias", classes="section")
                    yield Static(id="bias")
                    yield Static("load over time", classes="section")
                    yield Static(id="time-note", classes="note")
                    yield HeatMap(id="time", column_name="window", show_legend=False)
                    yield Static("co-activation", classes="section")
                    yield Static(id="coact-note", classes="note")
                    yield HeatMap(id="coact", show_legend=False)

    def on_resize(self, event: Resize) -> None:
        self.set_class(event.size.width < _TWO_COLUMNS, "-narrow")

    def view_key(self) -> tuple[int, ...]:
        layer = self.moeprobe.current_layer()
        return () if layer is None else (layer,)

    def fetch(self) -> Any:
        layer = self.moeprobe.current_layer()
        if layer is None:
            return None
        return self.source.read(lambda trace: layer_detail(trace, layer))

    def action_layer(self, delta: int) -> None:
        if self.moeprobe.step_layer(delta) is not None:
            self._title_pending()
            self.reload()

    def _title_pending(self) -> None:
        self.query_one("#layer-title", Static).update(Text(f"layer {self.moeprobe.current_layer()} …", style="bold"))

    def show(self, data: LayerDetail) -> None:
        self.data = data
        # Metrics first: at 80 columns the module name is what gets cut.
        title = Text.assemble(
            (f"L{data.layer}", "bold"),
            "  MaxVio ", (number(data.maxvio), "bold"), (f" (random {number(data.random_maxvio)})", "dim"),
            "  CV ", (number(data.cv), "bold"), (f" (random {number(data.random_cv)})", "dim"),
            "  dead ", (str(len(data.dead)), "bold red" if data.dead else "bold"),
            # Name and scoring come from the trace: escaped, never sent to the terminal as they are.
            f"  · {data.experts} experts, top-{data.top_k} {printable(data.scoring)} · ", (printable(data.name), "dim"),
            no_wrap=True, overflow="ellipsis",
        )
        self.query_one("#layer-title", Static).update(title)
        self.query_one("#bars", LoadBars).show(data.counts)
        clock = f" ({data.clock})" if data.clock else ""
        self.query_one("#latency", Static).update(
            _timing("router", data.router) + "\n" + _timing("block", data.block) + clock
        )
        self.query_one("#bias", Static).update(self._bias_text(data))
        self._over_time(data)
        self._coactivation(data)

    @staticmethod
    def _bias_text(data: LayerDetail) -> Text:
        if data.bias is None:
            return Text("this router has no correction bias" if data.scoring != "sigmoid" else "no bias recorded",
                        style="dim")
        text = Text(f"as of step {data.bias_step}: ", style="dim")
        for expert, value in enumerate(data.bias):
            style = "red" if value > 0 else ("cyan" if value < 0 else "")
            text.append(f"{expert}:", style="dim")
            text.append(f"{value:+.3f}", style=style)
            text.append("  ")
        return text

    def _over_time(self, data: LayerDetail) -> None:
        grid = data.over_time
        rows = [HeatRow(f"e{e}", e, grid[e]) for e in range(grid.shape[0])] if grid.size else []
        self.query_one("#time", HeatMap).show(rows)
        if grid.size:
            note = (f"rows experts, columns windows of {data.window_steps} step(s) from step {data.first_step} "
                    f"to {data.last_step}; colour = utilisation in that window")
        else:
            note = "no steps yet"
        self.query_one("#time-note", Static).update(note)

    def _coactivation(self, data: LayerDetail) -> None:
        matrix = data.coactivation
        heat = self.query_one("#coact", HeatMap)
        note = self.query_one("#coact-note", Static)
        if matrix is None:
            heat.show([])
            if data.counts_only:
                note.update("counts trace: co-activation needs per-token routing")
            else:
                note.update("no routing decisions yet" if not data.counts.sum() else "needs top-k > 1")
            return
        base = data.coactivation_random
        if math.isnan(base) or base <= 0:
            heat.show([])
            note.update("top-1 routing: no pairs")
            return
        ratio = matrix / base
        np.fill_diagonal(ratio, np.nan)
        heat.show([HeatRow(f"e{i}", i, ratio[i]) for i in range(len(ratio))])
        i, j = np.unravel_index(np.nanargmax(np.where(np.isnan(ratio), -1, ratio)), ratio.shape)
        note.update(
            f"row i, column j: P(j chosen | i chosen) ÷ random ({base:.3f}); strongest e{i}→e{j} "
            f"{matrix[i, j]:.2f} ({ratio[i, j]:.1f}× random)"
        )
