"""Pilot tests: press each screen's key on the hand-made trace and read what the widgets show."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from textual.widgets import DataTable, Input

from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.compare import CompareScreen
from moeprobe.tui.screens.layer import LayerScreen
from moeprobe.tui.screens.overview import OverviewScreen
from moeprobe.tui.screens.specialization import SpecializationScreen
from moeprobe.tui.screens.sql import SqlScreen
from moeprobe.tui.screens.tokens import TokensScreen
from moeprobe.tui.widgets.heatmap import HeatMap
from moeprobe.tui.widgets.loadbars import LoadBars
from moeprobe.tui.widgets.tokentext import TokenText
from tests.tui.helpers import loaded, open_screen, text_of, wait_for

SIZE = (120, 40)


def _column(table: DataTable, row: int) -> list[str]:
    return [str(getattr(cell, "plain", cell)) for cell in table.get_row_at(row)]


async def test_overview_shows_known_loads(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        header = text_of(app.screen.query_one("#run"))
        assert "complete" in header and "hand-made" in header
        assert "2 layers × 4 experts, top-2" in header and "8 tokens" in header and "0 dropped" in header
        heat = app.screen.query_one(HeatMap)
        assert [r.label for r in heat.rows] == ["L0", "L1"]
        np.testing.assert_allclose(heat.rows[0].values, [1.5, 1.0, 1.5, 0.0])
        np.testing.assert_allclose(heat.rows[1].values, [1.0, 1.0, 1.0, 1.0])
        assert "1 = fair share" in text_of(heat)
        table = app.screen.query_one("#layers", DataTable)
        # batch: step 0 loads 5,3,4,0 of 12 -> 0.667; steps 1 and 2 route one token -> 1.0 each; mean 0.889
        row0, row1 = _column(table, 0), _column(table, 1)
        assert row0[:2] + row0[3:7] == ["L0", "0.50", "0.89", "0.61", "1", "8"]
        assert row1[:2] + row1[3:6] == ["L1", "0.00", "0.67", "0.00", "0"]  # step 0 even, steps 1-2 at 1.0
        # beside MaxVio, the report's random-routing baseline for the same 8 tokens (4 experts, top-2)
        from moeprobe.analysis.load import random_baseline
        from moeprobe.tui.render import number

        assert row0[2] == row1[2] == number(random_baseline(4, 2, 8, 2).maxvio)
        # sort by worst: L0 (MaxVio 0.5) stays first; press twice to come back to layer order
        await pilot.press("s")
        assert [r.label for r in heat.rows] == ["L0", "L1"]
        assert "worst MaxVio first" in text_of(app.screen.query_one("#table-title"))


async def test_sort_puts_the_worst_layer_first(tmp_path: Path) -> None:
    from tests.tui.helpers import LAYER0, LAYER1, STEPS, TEXT, append_sequence, open_writer, sequence_tables

    writer = open_writer(tmp_path / "swapped")
    append_sequence(writer, sequence_tables(TEXT, LAYER1, LAYER0, STEPS, 0))  # the unbalanced layer is L1 now
    writer.close()
    app = MoeprobeApp([tmp_path / "swapped"])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        heat = app.screen.query_one(HeatMap)
        assert [r.label for r in heat.rows] == ["L0", "L1"]
        await pilot.press("s")
        assert [r.label for r in heat.rows] == ["L1", "L0"]
        assert _column(app.screen.query_one("#layers", DataTable), 0)[:2] == ["L1", "0.50"]


async def test_layer_screen(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        screen = await open_screen(pilot, "2", LayerScreen)
        assert isinstance(screen, LayerScreen) and screen.data is not None
        assert list(screen.data.counts) == [6, 4, 6, 0]
        assert "MaxVio 0.50" in text_of(screen.query_one("#layer-title"))
        from moeprobe.analysis.load import random_baseline
        from moeprobe.tui.render import number

        baseline = random_baseline(4, 2, 8, 2)  # the report's baseline for these 8 tokens
        assert f"(random {number(baseline.maxvio)})" in text_of(screen.query_one("#layer-title"))
        assert f"(random {number(baseline.cv)})" in text_of(screen.query_one("#layer-title"))
        bars = text_of(screen.query_one(LoadBars))
        assert "1.50" in bars and "dead" in bars and "fair share" in bars
        latency = text_of(screen.query_one("#latency"))
        assert "router" in latency and "p50" in latency and "n=3" in latency
        assert "no correction bias" in text_of(screen.query_one("#bias"))
        # co-activation: e0 is chosen 6 times, with e2 4 times -> P(e2 | e0) = 4/6; random is 1/3
        assert screen.data.coactivation is not None
        assert math.isclose(screen.data.coactivation[0, 2], 4 / 6)
        assert math.isclose(screen.data.coactivation_random, 1 / 3)
        # next layer: balanced, and the bias vector recorded for it
        await pilot.press("right_square_bracket")
        await wait_for(pilot, lambda: screen.data is not None and screen.data.layer == 1, what="layer 1")
        assert list(screen.data.counts) == [4, 4, 4, 4]
        bias = text_of(screen.query_one("#bias"))
        assert "0:+0.100" in bias and "1:-0.100" in bias and "3:+0.050" in bias


async def test_clicking_a_heat_map_row_opens_that_layer(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        heat = app.screen.query_one(HeatMap)
        await pilot.click(HeatMap, offset=(5, 2))  # line 0 is the axis, line 2 is L1
        await wait_for(pilot, lambda: loaded(app, LayerScreen), what="layer screen")
        assert app.screen.data.layer == 1
        assert heat is not None


async def test_specialization_screen(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "3", SpecializationScreen)
        assert "domain × expert" in text_of(screen.query_one("#tag-title"))
        heat = screen.query_one("#tags", HeatMap)
        assert [r.label for r in heat.rows] == ["code"]
        np.testing.assert_allclose(heat.rows[0].values, [1.5, 1.0, 1.5, 0.0])
        table = screen.query_one("#per-layer", DataTable)
        # one tag value: H(tag) = 0, so NMI is undefined; repetition of first choices in layer 0:
        # firsts 0,2,0,1,0,2,0,2 -> no consecutive pair equal; random baseline 1/4
        row = _column(table, 0)
        assert row[0] == "L0" and row[1] == "-" and row[3] == "0.0%" and row[4] == "25.0%"


async def test_tokens_screen_and_cursor(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "4", TokensScreen)
        text = screen.query_one(TokenText)
        assert "".join(c.text for c in text.cells) == "hello wo"
        assert [c.expert for c in text.cells] == [0, 2, 0, 1, 0, 2, 0, 2]  # first experts in layer 0
        assert "domain=code" in text_of(screen.query_one("#seq-title"))
        assert text.cursor == 7  # following: the newest token
        await pilot.press("home")
        detail = text_of(screen.query_one("#detail"))
        assert "'h'" in detail and "id 104" in detail
        assert "L0   e0 0.750 e1 0.250" in detail and "L1   e0 0.750 e1 0.250" in detail
        assert not screen.follow  # moving back pauses follow mode
        await pilot.press("right")
        assert "'e'" in text_of(screen.query_one("#detail"))
        await pilot.press("right_square_bracket")  # colour by layer 1
        assert [c.expert for c in text.cells] == [0, 2, 0, 2, 0, 1, 0, 1]
        await pilot.click(TokenText, offset=(1 + 4, 0))  # padding 1, then "hell" -> the 'o'
        assert text.cursor == 4 and "'o'" in text_of(screen.query_one("#detail"))


async def test_sql_console_runs_reads_and_refuses_writes(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await wait_for(pilot, lambda: isinstance(app.screen, SqlScreen), what="sql screen")
        screen = app.screen
        box = screen.query_one(Input)
        box.value = "SELECT expert, count(*) AS n FROM routing WHERE layer = 0 GROUP BY ALL ORDER BY expert"
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.result is not None, what="sql result")
        table = screen.query_one("#result", DataTable)
        assert [_column(table, i) for i in range(table.row_count)] == [["0", "6"], ["1", "4"], ["2", "6"]]
        assert "3 row(s)" in text_of(screen.query_one("#sql-status"))
        for bad in ("DROP VIEW routing", "ATTACH 'x.db'", "SELECT * FROM read_csv('/etc/passwd')",
                    "COPY routing TO 'x.csv'", "SET threads = 1", "SELECT 1; DELETE FROM routing"):
            box.focus()  # a successful run moved the focus to the result table
            box.value = bad
            await pilot.press("enter")
            assert "✗" in text_of(screen.query_one("#sql-status")), bad
        box.focus()
        box.value = "SELECT no_such_column FROM routing"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "✗" in text_of(screen.query_one("#sql-status")), what="duckdb error")
        assert "no_such_column" in text_of(screen.query_one("#sql-status"))
        # after an error the focus stays in the editor, where digits are text; Esc leaves it, then 1 switches
        await pilot.press("escape", "1")
        await wait_for(pilot, lambda: isinstance(app.screen, OverviewScreen), what="overview")


async def test_compare_needs_two_traces_and_shows_differences(known_trace: Path, tmp_path: Path) -> None:
    from tests.tui.helpers import LAYER0, STEPS, TEXT, append_sequence, open_writer, sequence_tables

    other = tmp_path / "other"
    writer = open_writer(other)
    append_sequence(writer, sequence_tables(TEXT, LAYER0, LAYER0, STEPS, 0))  # both layers unbalanced
    writer.close()
    single = MoeprobeApp([known_trace])
    async with single.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await pilot.pause(0.1)
        assert isinstance(single.screen, OverviewScreen)  # no second trace: the key does nothing
    app = MoeprobeApp([known_trace, other])
    async with app.run_test(size=SIZE) as pilot:
        await open_screen(pilot, "6", CompareScreen)
        table = app.screen.query_one("#diff", DataTable)
        assert _column(table, 0)[:4] == ["L0", "0.50", "0.50", "+0.00"]
        assert _column(table, 1)[:4] == ["L1", "0.00", "0.50", "+0.50"]
        assert "known" not in text_of(app.screen.query_one("#head-b"))  # B is the other trace
        assert "hand-made" in text_of(app.screen.query_one("#head-a"))


async def test_help_names_every_screen_key(known_trace: Path) -> None:
    # The footer keeps a screen's own keys, ? and q (it must fit 80 columns); ? lists the screen keys 1-6.
    from moeprobe.tui.screens.help import HelpScreen

    app = MoeprobeApp([known_trace, known_trace])
    async with app.run_test(size=(160, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        shown = {key: active.binding.description for key, active in app.active_bindings.items() if active.binding.show}
        assert shown.get("question_mark") == "Help, screens 1-6" and shown.get("q") == "Quit"
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        listed = dict(app.screen.rows)
        for key, name in (("1", "Overview screen"), ("2", "Layer screen"), ("3", "Specialization screen"),
                          ("4", "Tokens screen"), ("5", "SQL screen"), ("q", "Quit")):
            assert listed.get(key) == name


def _painted_within_80x24(app: MoeprobeApp, selector: str, *, titled: bool = False) -> None:
    """The widget has a non-empty place on the 80x24 screen (not squeezed to nothing, not pushed off it)."""
    widget = app.screen.query_one(selector)
    region = widget.region
    assert region.width > 0 and region.height > 0, f"{type(app.screen).__name__} {selector}: not painted ({region})"
    assert region.x >= 0 and region.right <= 80 and 0 <= region.y < 24, f"{selector} outside 80x24: {region}"
    if titled:
        assert text_of(widget).strip(), f"{type(app.screen).__name__} {selector}: empty"


async def test_every_screen_paints_at_80x24(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    # each screen's title line and its main data widget, as a newcomer on a small terminal first sees them
    shown = {
        LayerScreen: ("#layer-title", "#bars"),
        SpecializationScreen: ("#tag-title", "#tags"),
        TokensScreen: ("#seq-title", "#text"),
        OverviewScreen: ("#heat", "#layers"),
    }
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        for key, screen_type in (("2", LayerScreen), ("3", SpecializationScreen), ("4", TokensScreen)):
            await pilot.press(key)
            await wait_for(pilot, lambda screen_type=screen_type: loaded(app, screen_type), what=screen_type.__name__)
            title, body = shown[screen_type]
            _painted_within_80x24(app, title, titled=True)
            _painted_within_80x24(app, body)
            _painted_within_80x24(app, "#run", titled=True)  # the run header stays on every screen
        await pilot.press("5")
        await wait_for(pilot, lambda: isinstance(app.screen, SqlScreen), what="sql")
        _painted_within_80x24(app, "#query")
        _painted_within_80x24(app, "#result")
        await pilot.press("escape", "1")
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview again")
        for selector in shown[OverviewScreen]:
            _painted_within_80x24(app, selector)
