"""Specialization: which experts each tag value (domain) uses in the chosen layer, NMI per layer, repetition."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from ...safe_text import printable
from ..queries.specialization import SpecializationData, specialization
from ..render import number
from ..widgets.heatmap import HeatMap, HeatRow
from .base import TraceScreen

_NMI_BAR = 10


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


class SpecializationScreen(TraceScreen):
    BINDINGS = [Binding("left_square_bracket", "layer(-1)", "Prev layer", show=False),
                Binding("right_square_bracket", "layer(1)", "Layer", key_display="[ ]"),
                Binding("t", "next_key", "Tag key")]
    HELP_KEYS = (("↑ ↓ Enter", "choose a layer in the per-layer table"),)
    DEFAULT_CSS = """
    SpecializationScreen #spec-body { height: 1fr; padding: 0 1; }
    SpecializationScreen .section { text-style: bold; margin-top: 1; }
    SpecializationScreen .note { color: $text-muted; }
    SpecializationScreen #per-layer { height: auto; max-height: 20; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: SpecializationData | None = None
        self.key: str | None = None  # the tag key shown; None: the preferred one

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="spec-body"):
            yield Static(id="tag-title", classes="section")
            yield Static(id="tag-note", classes="note")
            yield HeatMap(id="tags")
            yield Static("per layer: NMI(expert; tag) and consecutive-token repetition vs random", classes="section")
            yield DataTable(id="per-layer", cursor_type="row", zebra_stripes=True)
            yield Static(id="spec-note", classes="note")

    def on_mount(self) -> None:
        table = self.query_one("#per-layer", DataTable)
        for label, key in (("layer", "layer"), ("NMI", "nmi"), ("", "bar"), ("same 1st", "first"),
                           ("random", "rfirst"), ("share any", "any"), ("random", "rany")):
            table.add_column(label, key=key)

    def fetch(self) -> Any:
        return self.source.read(specialization)

    def action_layer(self, delta: int) -> None:
        if self.moeprobe.step_layer(delta) is not None:
            self._redraw()

    def show(self, data: SpecializationData) -> None:
        self.data = data
        self._redraw()

    def action_next_key(self) -> None:
        data = self.data
        if data is None or len(data.tags) < 2:
            self.notify("no other tag key in this trace" if data and data.tags else "no tags in this trace",
                        severity="information")
            return
        keys = data.keys()
        at = keys.index(self.key) if self.key in keys else 0
        self.key = keys[(at + 1) % len(keys)]
        self._redraw()

    def _shown_tag(self, data: SpecializationData) -> Any:
        return next((t for t in data.tags if t.key == self.key), data.tag)

    def _redraw(self) -> None:
        data = self.data
        if data is None:
            return
        layer = self.moeprobe.current_layer()
        title = self.query_one("#tag-title", Static)
        note = self.query_one("#tag-note", Static)
        heat = self.query_one("#tags", HeatMap)
        tag = self._shown_tag(data)
        if data.counts_only:
            title.update(f"L{layer}: tag × expert")
            heat.show([], empty="counts trace")
            note.update(Text("counts trace (expert loads per step only): tags, NMI and repetition need per-token routing"))
        elif tag is None or layer not in tag.relative:
            title.update(f"L{layer}: tag × expert")
            skipped = f" ({printable(', '.join(data.skipped))} have too many values)" if data.skipped else ""
            why = "no tags in this trace" if tag is None else f"no tagged routing in L{layer}"
            heat.show([], empty=why)
            note.update(Text(f"{why}: label sequences with probe.tag(domain=...) or record --tag KEY=VALUE to split "
                             "load by tag" + skipped))
        else:
            title.update(Text.assemble(f"L{layer}: {printable(tag.key)} × expert   ", ("[ ] change layer", "dim")))
            other_keys = [k for k in data.keys() if k != tag.key]  # noqa: SIM118 (SpecializationData, not a dict)
            others = f"; other keys: {', '.join(other_keys)} (t switches)" if other_keys else ""
            # Text, not str: the tag key is trace data and must not be parsed as markup.
            note.update(Text(f"relative load c/c̄ within each {printable(tag.key)} (DeepSeek-V3 view; 1 = uniform)"
                             f"{printable(others)}"))
            matrix = tag.relative[layer]
            heat.show([HeatRow(printable(value), i, matrix[i]) for i, value in enumerate(tag.values)])
        self._table(data, layer)

    def _table(self, data: SpecializationData, current: int | None) -> None:
        table = self.query_one("#per-layer", DataTable)
        table.clear()
        shown = self._shown_tag(data)
        nmi = shown.nmi if shown else {}
        repetition = {r.layer: r for r in data.repetition}
        for layer in self.moeprobe.layer_indices():
            value = nmi.get(layer, math.nan)
            filled = 0 if math.isnan(value) else round(value * _NMI_BAR)
            rep = repetition.get(layer)
            label = Text(f"L{layer}", style="bold reverse" if layer == current else "")
            table.add_row(
                label,
                number(value, 3),
                Text("█" * filled + "·" * (_NMI_BAR - filled), style="magenta"),
                _pct(rep.first) if rep else "-",
                Text(_pct(rep.random_first), style="dim") if rep else "-",
                _pct(rep.any) if rep else "-",
                Text(_pct(rep.random_any), style="dim") if rep else "-",
                key=str(layer),
            )
        sampled = "" if data.sampled >= 1 else f" over a {100 * data.sampled:.0f}% sample of whole sequences"
        self.query_one("#spec-note", Static).update(
            "NMI: I(expert; tag) over all assignments, bias-corrected, ÷ H(tag), 0..1. Repetition (Mixtral §5): token t+1 has the same "
            f"first expert / shares any expert with token t{sampled}."
        )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.moeprobe.layer_index = int(event.row_key.value)
            self._redraw()
