"""Terminal text: the report's header lines and box tables laid out for the output's width, or the simulator's
side-by-side table (``simulate_text``)."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from . import RenderOptions

if TYPE_CHECKING:
    from ...analysis.tables import Table
    from . import Document


def render(document: Document, file: IO[str], options: RenderOptions | None = None) -> None:
    found = report_lines_and_tables(document, (options or RenderOptions()).limit)
    if found is None:  # not a report: the simulator's (its modules are imported only for it)
        from ...simulate.report_model import SimulateReport
        from .simulate_text import write_simulate

        assert isinstance(document, SimulateReport)
        write_simulate(document, file)
        return
    lines, tables = found
    write_tables(lines, tables, file)


def report_lines_and_tables(document: Document, limit: int) -> tuple[list[str], list[Table]] | None:
    """The header lines and tables of a report or a comparison (text and Markdown show the same); None for
    other documents."""
    from ...analysis.report_model import Comparison, Report
    from ...analysis.tables import compare_tables, header, report_tables

    if isinstance(document, Report):
        return header(document), report_tables(document, limit=limit)
    if isinstance(document, Comparison):
        lines = [f"a: {line}" for line in header(document.a)[:3]] + [f"b: {line}" for line in header(document.b)[:3]]
        return lines, compare_tables(document, limit=limit)
    return None


def write_tables(lines: list[str], tables: list[Table], out: IO[str]) -> None:
    """Box tables laid out for the output's width: a table wider than it is split into column groups that each
    repeat the first column. A terminal's width is its own; a pipe or a file takes ``COLUMNS`` when set and
    otherwise every table's natural width. Nothing is padded with trailing spaces."""
    import io
    import textwrap

    from ...safe_text import printable

    width = _output_width(out)
    tty = out.isatty()
    if not tty:
        plain = _plain_text(lines, tables, width)
        if plain is not None:
            out.write(plain)
            return

    from rich.console import Console

    buffer = io.StringIO()
    # A wide virtual console renders each table at its natural width; the splitting below keeps it within `width`.
    # emoji=False: a tag value such as ":fire:" is data, shown as written.
    console = Console(file=buffer, width=100_000, highlight=False, emoji=False, force_terminal=tty, color_system="auto" if tty else None)

    def wrapped(text: str) -> None:
        text = printable(text)
        for line in textwrap.wrap(text, width=width, break_on_hyphens=False) if width and len(text) > width else [text]:
            console.print(line, markup=False, highlight=False, crop=False, overflow="ignore")

    for line in lines:
        wrapped(line)
    for table in tables:
        console.print()
        wrapped(table.title)
        for part in _column_groups(table, width):
            # With a limit, a group that is still too wide (one huge column) has its cells wrapped to fit.
            console.print(_rich_table(table, part), width=width, crop=False)
        if table.note.strip():
            wrapped(table.note.strip())
    for line in buffer.getvalue().splitlines():
        out.write(line.rstrip() + "\n")


# Rich's HEAVY_HEAD box, the one ``rich.table.Table`` draws by default: (left, middle, right, fill) per rule line.
_TOP = ("┏", "┳", "┓", "━")
_HEAD_RULE = ("┡", "╇", "┩", "━")
_BOTTOM = ("└", "┴", "┘", "─")
_HEAD_SIDES = ("┃", "┃", "┃")
_BODY_SIDES = ("│", "│", "│")


def _plain_text(lines: list[str], tables: list[Table], width: int | None) -> str | None:
    """What the Rich path writes for a pipe or a file, drawn directly: Rich's table layout costs about 0.2 s of a
    report that must finish in 1 s (issue 14). None when a table part is wider than ``width`` even on its own
    (Rich then folds its cells) or a column is empty; the caller draws those with Rich.
    Tested equal to the Rich path, line for line (tests/unit/test_text_render.py)."""
    import textwrap

    from ...safe_text import printable

    cell_len = _cell_len
    out: list[str] = []

    def wrapped(text: str) -> None:
        text = printable(text)
        out.extend(textwrap.wrap(text, width=width, break_on_hyphens=False) if width and len(text) > width else [text])

    for line in lines:
        wrapped(line)
    for table in tables:
        out.append("")
        wrapped(table.title)
        for part in _column_groups(table, width):
            header = [printable(table.columns[i]) for i in part]
            rows = [[printable(row[i]) if i < len(row) else "" for i in part] for row in table.rows]
            widths = [max([cell_len(header[j])] + [cell_len(row[j]) for row in rows]) for j in range(len(part))]
            if width is not None and sum(widths) + 3 * len(widths) + 1 > width:
                return None
            if min(widths, default=1) == 0:
                return None  # Rich gives an empty column a width of its own
            out.append(_rule(widths, _TOP))
            out.append(_cells(header, widths, part, _HEAD_SIDES, cell_len))
            out.append(_rule(widths, _HEAD_RULE))
            out.extend(_cells(row, widths, part, _BODY_SIDES, cell_len) for row in rows)
            out.append(_rule(widths, _BOTTOM))
        if table.note.strip():
            wrapped(table.note.strip())
    return "".join(line.rstrip() + "\n" for line in out)


def _rule(widths: list[int], box: tuple[str, str, str, str]) -> str:
    left, middle, right, fill = box
    return left + middle.join(fill * (w + 2) for w in widths) + right


def _cells(values: list[str], widths: list[int], part: list[int], sides: tuple[str, str, str], cell_len: Any) -> str:
    # The first column is left-aligned and the others right-aligned, as _rich_table sets them; Rich drops a
    # right-aligned cell's trailing spaces (Text.justify), the column keeps the width they measured.
    padded = []
    for value, w, i in zip(values, widths, part, strict=True):
        if i != 0:
            value = value.rstrip(" ")
            padded.append(" " + " " * (w - cell_len(value)) + value + " ")
        else:
            padded.append(" " + value + " " * (w - cell_len(value)) + " ")
    return sides[0] + sides[1].join(padded) + sides[2]


def _output_width(out: IO[str]) -> int | None:
    """The terminal's width; for a pipe or file, ``COLUMNS`` if set (None: no limit)."""
    import os
    import shutil

    if out.isatty():
        return max(20, shutil.get_terminal_size().columns)
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return None
    return max(20, columns) if columns > 0 else None


def _cell_len(text: str) -> int:
    """Terminal cells of ``text`` as Rich counts them: one per character of printable ASCII (nearly every cell of a
    report), else Rich's count of wide and zero-width characters, whose import (7 ms) is then paid."""
    if text.isascii() and text.isprintable():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def _column_widths(table: Table) -> list[int]:
    from ...safe_text import printable

    cell_len = _cell_len
    return [
        max([cell_len(printable(column))] + [cell_len(printable(row[i])) for row in table.rows if i < len(row)])
        for i, column in enumerate(table.columns)
    ]


def _column_groups(table: Table, width: int | None) -> list[list[int]]:
    """Column indices per printed part: all columns when they fit, else the first column and as many of the
    others as fit beside it, part after part (a cell is never cut)."""
    columns = list(range(len(table.columns)))
    if width is None or len(columns) < 2:
        return [columns]
    widths = _column_widths(table)
    cost = [w + 3 for w in widths]  # one space of padding each side and one border
    if sum(cost) + 1 <= width:
        return [columns]
    groups: list[list[int]] = []
    current = [0]
    used = cost[0] + 1
    for i in columns[1:]:
        if len(current) > 1 and used + cost[i] > width:
            groups.append(current)
            current, used = [0], cost[0] + 1
        current.append(i)
        used += cost[i]
    groups.append(current)
    return groups


def _rich_table(table: Table, part: list[int]) -> Any:
    from rich.table import Table as RichTable
    from rich.text import Text

    from ...safe_text import printable

    def text(value: str) -> Text:
        # Text, not str: a tag value such as "[/]" is shown as written instead of being parsed as markup.
        return Text(printable(value))

    rich_table = RichTable(expand=False)
    for i in part:
        rich_table.add_column(text(table.columns[i]), justify="left" if i == 0 else "right", overflow="fold")
    for row in table.rows:
        rich_table.add_row(*(text(row[i]) if i < len(row) else Text("") for i in part))
    return rich_table
