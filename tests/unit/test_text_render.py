"""The report's text tables drawn directly for a pipe or file equal what Rich draws, line for line."""

from __future__ import annotations

import io
import os
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from moeprobe.analysis.tables import Table
from moeprobe.cli.render import text


def _rich(lines: list[str], tables: list[Table], width: int | None) -> str:
    """The Rich path of write_tables, whatever the output (the plain path is taken only for non-terminals)."""
    plain, columns = text._plain_text, os.environ.get("COLUMNS")
    try:
        text._plain_text = lambda *args: None  # type: ignore[assignment]  # force the Rich drawing for the reference
        if width is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = str(width)  # a pipe's width (write_tables reads it there)
        buffer = io.StringIO()
        text.write_tables(lines, tables, buffer)
        return buffer.getvalue()
    finally:
        text._plain_text = plain  # type: ignore[assignment]
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


cells = st.text(alphabet=string.ascii_letters + string.digits + " .%-()@/:,[]" + "é中😀\x1b\n\u202e", min_size=1, max_size=12)


@st.composite
def tables(draw: st.DrawFn) -> Table:
    columns = draw(st.lists(cells, min_size=1, max_size=6))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=len(columns)), max_size=5))
    return Table(draw(cells), columns, rows, draw(st.sampled_from(["", "a note: see :fire: [b]x[/b]"])))


@settings(max_examples=200, deadline=None)
@given(st.lists(cells, max_size=3), st.lists(tables(), min_size=1, max_size=3), st.sampled_from([None, 40, 80, 200]))
def test_plain_drawing_equals_rich(lines: list[str], found: list[Table], width: int | None) -> None:
    plain = text._plain_text(lines, found, width)
    if plain is not None:
        assert plain == _rich(lines, found, width)


@given(cells)
def test_cell_widths_are_richs(cell: str) -> None:
    from rich.cells import cell_len

    from moeprobe.safe_text import printable

    assert text._cell_len(printable(cell)) == cell_len(printable(cell))
    assert text._cell_len(string.printable[:-5]) == cell_len(string.printable[:-5])  # every printable ASCII character


def test_plain_drawing_is_taken_for_ordinary_tables() -> None:
    table = Table("Load", ["metric", "mean"], [["MaxVio", "2.152"], ["CV", "0.601"]], "random: uniform")
    assert text._plain_text(["trace t: complete"], [table], None) == _rich(["trace t: complete"], [table], None)
    assert text._plain_text(["trace t: complete"], [table], None) is not None


def test_a_whole_report_draws_the_same_both_ways(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.synthetic import build_trace
    from moeprobe.analysis.session import open_trace
    from moeprobe.analysis.tables import header, report_tables

    build_trace(tmp_path / "t", 20_000)
    report = open_trace(tmp_path / "t").report()
    lines, found = header(report), report_tables(report, limit=20)
    for width in (None, 60, 120):
        plain = text._plain_text(lines, found, width)
        assert plain is not None and plain == _rich(lines, found, width)
