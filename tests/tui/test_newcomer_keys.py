"""Pilot tests for the keys a first-time user reached for: ? help, Enter on the Overview, the SQL editor keeping
the focus and its history, jumping to a sequence, numbers in the heat map, switching the tag key, key 6 with one
trace, a trace without tags, Compare aligned and every footer within 80 columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from textual.widgets import DataTable, Input

from moeprobe.traces.schema import TABLES
from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.compare import CompareScreen
from moeprobe.tui.screens.help import HelpScreen
from moeprobe.tui.screens.layer import LayerScreen
from moeprobe.tui.screens.overview import OverviewScreen
from moeprobe.tui.screens.specialization import SpecializationScreen
from moeprobe.tui.screens.sql import SqlScreen
from moeprobe.tui.screens.tokens import TokensScreen, parse_sequence_ref
from moeprobe.tui.widgets.heatmap import HeatMap
from moeprobe.tui.widgets.tokentext import TokenText
from tests.tui.helpers import (
    LAYER0,
    LAYER1,
    STEPS,
    TEXT,
    append_sequence,
    loaded,
    open_screen,
    open_writer,
    sequence_tables,
    text_of,
    wait_for,
)

SIZE = (120, 40)


def _notifications(app: MoeprobeApp) -> str:
    return " | ".join(str(n.message) for n in app._notifications)


async def test_question_mark_lists_every_key_of_the_screen(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        keys = dict(app.screen.rows)
        assert keys["s"] == "Sort" and keys["v"] == "Values" and "Enter" in keys and keys["q"] == "Quit"
        assert "Overview: keys" in text_of(app.screen.query_one("#help-text"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, OverviewScreen), what="help closed")
        await open_screen(pilot, "4", TokensScreen)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="tokens help")
        keys = dict(app.screen.rows)
        # hidden keys are listed too: the arrows, Home/End, p, [, g
        for description in ("◀", "▶", "Start", "End", "Prev seq", "Seq", "Prev layer", "Follow", "Go to seq"):
            assert description in keys.values(), description


async def test_enter_on_the_overview_opens_the_selected_layer(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        assert app.focused is app.screen.query_one("#layers", DataTable)  # no Tab needed first
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: loaded(app, LayerScreen), what="layer")
        assert app.layer_index == 1


async def test_sql_editor_keeps_the_focus_and_has_a_history(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        await pilot.press("5")
        await wait_for(pilot, lambda: isinstance(app.screen, SqlScreen), what="sql")
        screen = app.screen
        box = screen.query_one(Input)
        first, second = "SELECT count(*) AS a FROM routing", "SELECT max(expert) AS b FROM routing"
        for query in (first, second):
            box.value = query
            await pilot.press("enter")
            await wait_for(pilot, lambda q=query: screen.result is not None and list(screen.result.columns) == [q[-14]],
                           what=query)
        assert app.focused is box
        await pilot.press("end", "space", "2")  # typed into the query, not a switch to the Layer screen
        assert isinstance(app.screen, SqlScreen) and box.value == second + " 2"
        box.value = ""
        await pilot.press("up")
        assert box.value == second
        await pilot.press("up")
        assert box.value == first
        await pilot.press("down", "down")
        assert box.value == ""


async def _two_sequences(path: Path, keys: dict[str, list[str]] | None = None) -> Path:
    writer = open_writer(path)
    append_sequence(writer, sequence_tables(TEXT, LAYER0, LAYER1, STEPS, 0))
    more = sequence_tables(b"abc", LAYER0[:3], LAYER1[:3], [3, 4, 5], 7)
    append_sequence(writer, more)
    if keys:
        for key, values in keys.items():
            tags = pa.table({"sequence": [0, 7], "key": [key, key], "value": values}, schema=TABLES["tags"])
            writer.append("tags", tags)
        writer.flush()
    writer.close()
    return path


async def test_jump_to_a_sequence_by_id(tmp_path: Path) -> None:
    assert parse_sequence_ref("7") == (None, 7) and parse_sequence_ref("0:7") == (0, 7)
    assert parse_sequence_ref("x") is None
    path = await _two_sequences(tmp_path / "two")
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "4", TokensScreen)
        text = screen.query_one(TokenText)
        assert "".join(c.text for c in text.cells) == "abc"  # follows the newest
        await pilot.press("g")
        box = screen.query_one("#goto", Input)
        assert app.focused is box
        box.value = "0"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "".join(c.text for c in text.cells) == "hello wo", what="sequence 0")
        assert not screen.follow and "id 0" in text_of(screen.query_one("#seq-title"))
        await pilot.press("g")
        box.value = "99"
        await pilot.press("enter")
        await pilot.pause(0.05)
        assert "no sequence 99 in this trace (ids 0..7)" in _notifications(app)


async def test_heat_map_numbers_toggle(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        heat = app.screen.query_one(HeatMap)
        assert "1.5" not in text_of(heat)
        await pilot.press("v")
        assert heat.numbers
        lines = text_of(heat).splitlines()
        assert lines[1].split() == ["L0", "1.5", "1.0", "1.5", "·"]  # utilisation 1.5, 1.0, 1.5, dead
        assert lines[2].split() == ["L1", "1.0", "1.0", "1.0", "1.0"]
        await pilot.press("v")
        assert not heat.numbers


async def test_tag_key_switches_with_t(tmp_path: Path) -> None:
    path = await _two_sequences(tmp_path / "tags", {"lang": ["en", "fr"]})  # plus domain=code on sequence 0
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "3", SpecializationScreen)
        assert "domain × expert" in text_of(screen.query_one("#tag-title"))
        assert "other keys: lang (t switches)" in text_of(screen.query_one("#tag-note"))
        await pilot.press("t")
        assert "lang × expert" in text_of(screen.query_one("#tag-title"))
        assert [r.label for r in screen.query_one("#tags", HeatMap).rows] == ["en", "fr"]
        assert "other keys: domain (t switches)" in text_of(screen.query_one("#tag-note"))


async def test_a_trace_without_tags_says_so(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "untagged")
    tables = sequence_tables(TEXT, LAYER0, LAYER1, STEPS, 0)
    del tables["tags"]
    append_sequence(writer, tables)
    writer.close()
    app = MoeprobeApp([tmp_path / "untagged"])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "3", SpecializationScreen)
        assert text_of(screen.query_one("#tags", HeatMap)) == "no tags in this trace"
        assert "record --tag KEY=VALUE" in text_of(screen.query_one("#tag-note"))


async def test_key_6_with_one_trace_says_how_to_open_a_second(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        await pilot.press("6")
        await pilot.pause(0.05)
        assert isinstance(app.screen, OverviewScreen)
        assert f"moeprobe tui {known_trace} OTHER_TRACE" in _notifications(app)


async def test_compare_lines_up_at_80x24(known_trace: Path, tmp_path: Path) -> None:
    # A long name on one side only: its header wraps onto more lines than the other's.
    other = tmp_path / ("a-much-longer-trace-directory-name-" * 2)
    writer = open_writer(other)
    append_sequence(writer, sequence_tables(TEXT, LAYER0, LAYER0, STEPS, 0))
    writer.close()
    app = MoeprobeApp([known_trace, other])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(pilot, "6", CompareScreen)
        a, b = screen.query_one("#heat-a", HeatMap), screen.query_one("#heat-b", HeatMap)
        assert a.region.y == b.region.y and a.region.height == b.region.height


async def test_every_footer_fits_80_columns(known_trace: Path) -> None:
    app = MoeprobeApp([known_trace, known_trace])
    async with app.run_test(size=(80, 24)) as pilot:
        for key, screen_type in (("1", OverviewScreen), ("2", LayerScreen), ("3", SpecializationScreen),
                                 ("4", TokensScreen), ("6", CompareScreen)):
            await open_screen(pilot, key, screen_type)
            shown = [active.binding for active in app.active_bindings.values() if active.binding.show]
            width = sum(len(app.get_key_display(b)) + len(b.description) + 2 for b in shown)
            assert width <= 80, (screen_type.__name__, width)
            assert any(b.key == "question_mark" for b in shown)
