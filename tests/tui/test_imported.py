"""The TUI on traces imported from each engine: overview and layer screens from routing rows or, for a counts
trace, from the loads table; the specialization screen says what a counts trace cannot show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeprobe import open_trace
from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.layer import LayerScreen
from moeprobe.tui.screens.overview import OverviewScreen
from moeprobe.tui.screens.specialization import SpecializationScreen
from moeprobe.tui.widgets.heatmap import HeatMap
from tests.engine_formats import imported_traces
from tests.tui.helpers import loaded, open_screen, text_of, wait_for

SIZE = (120, 40)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return imported_traces(tmp_path_factory.mktemp("imported_tui"))


def _utilisation(trace: Path) -> np.ndarray:
    with open_trace(trace) as t:
        sql = ("SELECT layer, expert, sum(tokens) AS n FROM loads GROUP BY ALL" if t.mode == "counts"
               else "SELECT layer, expert, count(*) AS n FROM routing GROUP BY ALL")
        got = t.sql(sql).to_pydict()
        counts = np.zeros((len(t.layers), int(t.layers[0]["num_experts"])))
    counts[got["layer"], got["expert"]] = got["n"]
    return counts * counts.shape[1] / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["vllm", "sglang_stat", "sglang_per_pass", "megatron"])
async def test_overview_and_layer_screens(name: str, traces: dict[str, Path]) -> None:
    app = MoeprobeApp([traces[name]])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        heat = app.screen.query_one(HeatMap)
        want = _utilisation(traces[name])
        for row, expected in zip(heat.rows, want, strict=True):
            np.testing.assert_allclose(row.values, expected)
        screen = await open_screen(pilot, "2", LayerScreen)
        assert screen.data is not None and screen.data.counts.sum() > 0
        assert screen.data.over_time.shape[1] >= 1  # load over time from the steps the trace holds
        note = text_of(screen.query_one("#coact-note"))
        if name.startswith("sglang_"):
            assert screen.data.counts_only and "needs per-token routing" in note
        else:
            assert not screen.data.counts_only


async def test_specialization_screen_on_a_counts_trace(traces: dict[str, Path]) -> None:
    app = MoeprobeApp([traces["sglang_stat"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "3", SpecializationScreen)
        await wait_for(pilot, lambda: screen.data is not None, what="specialization data")
        assert "need per-token routing" in text_of(screen.query_one("#tag-note"))
