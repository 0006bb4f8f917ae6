"""``moeprobe report TRACE``: load imbalance, specialization and latency as terminal tables, JSON or Markdown;
``moeprobe report A B --compare`` puts two traces side by side."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from .args import Parser, add_selection_options, selection_filters

HELP = "load imbalance, specialization and latency of a trace (text, --json, --markdown, --compare)"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moeprobe report", description=HELP)
    parser.add_argument("traces", nargs="+", metavar="TRACE", help="trace directory (two with --compare)")
    parser.add_argument("--compare", action="store_true", help="compare two traces: a, b and b - a")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object (schema: docs/report-json.md)")
    fmt.add_argument("--markdown", action="store_true", help="Markdown tables, for an issue or a PR")
    sel = parser.add_argument_group("filters")
    add_selection_options(sel)
    sel.add_argument("--phase", choices=("prefill", "decode"))
    sel.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="sequences with this tag (repeatable)")
    sel.add_argument("--rank", action="append", default=[], metavar="R[,R...]", help="shard rank (repeatable)")
    opt = parser.add_argument_group("analysis")
    opt.add_argument("--ep-size", type=_positive, default=8, help="expert-parallel ranks, contiguous placement (8)")
    opt.add_argument("--window", type=_positive, metavar="STEPS", help="steps per window over time (default: 10 windows)")
    opt.add_argument("--top-n", type=_positive, help="N for top-N coverage (default: the layer's top-k)")
    opt.add_argument("--min-count", type=_positive, default=10, help="vocabulary specialization: ids seen at least this often")
    opt.add_argument("--sample", type=_count, metavar="DECISIONS", help="budget of the token-level sample (0: everything)")
    opt.add_argument("--count-sample", type=_count, metavar="DECISIONS", help="budget of the tag and vocabulary counts (0: everything)")
    opt.add_argument("--full", action="store_true", help="JSON: add per-value count tables and co-activation matrices")
    opt.add_argument("--limit", type=_count, default=16, help="rows per table in text and Markdown (0: all)")
    pic = parser.add_argument_group(
        "pictures (need moeprobe[html]; they replace the text tables unless --json or --markdown is given, and "
        "imply --full)")
    pic.add_argument("--html", metavar="FILE", help="self-contained HTML report with charts (works offline)")
    pic.add_argument("--png", metavar="DIR", help="each chart as DIR/NAME.png")
    pic.add_argument("--svg", metavar="DIR", help="each chart as DIR/NAME.svg")
    pic.add_argument("--chart-layer", type=_count, metavar="N",
                     help="layer of the per-tag and co-activation charts (default: the worst MaxVio_global layer)")
    return parser


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return value


def main(argv: list[str]) -> int:
    from ..analysis.report_json import ReportOptions
    from .main import UsageError

    args = _parser().parse_args(argv)
    if args.compare and len(args.traces) != 2:
        raise UsageError(f"--compare takes exactly two traces, got {len(args.traces)}")
    if not args.compare and len(args.traces) != 1:
        raise UsageError("give one trace, or two with --compare")
    filters = selection_filters(args)
    defaults = ReportOptions()
    options = ReportOptions(
        ep_size=args.ep_size,
        window_steps=args.window,
        top_n=args.top_n,
        min_count=args.min_count,
        sample_budget=defaults.sample_budget if args.sample is None else args.sample,
        count_budget=defaults.count_budget if args.count_sample is None else args.count_sample,
        full=args.full,
    )
    pictures = bool(args.html or args.png or args.svg)
    if args.chart_layer is not None and not pictures:
        raise UsageError("--chart-layer only applies with --html, --png or --svg")
    if pictures:
        from dataclasses import replace

        options = replace(options, full=True)  # the charts need the count tables and co-activation matrices
        if args.html:
            from ..charts.render import prefetch_bundle

            prefetch_bundle()  # builds or reads the page's JavaScript while the analysis runs
    built = [_build(path, filters, options, timeline=pictures) for path in args.traces]
    reports = [report for report, _ in built]
    timelines = [timeline for _, timeline in built if timeline is not None]  # one per trace with pictures
    out = sys.stdout
    text_out = not pictures or args.json or args.markdown
    if args.compare:
        from ..analysis.report_json import compare

        result = compare(reports[0], reports[1])
        if pictures:
            from .pictures import write_compare

            code = write_compare(result, (timelines[0], timelines[1]), html=args.html, png=args.png, svg=args.svg,
                                 layer=args.chart_layer)
            if code or not text_out:
                return code
        if args.json:
            _write_json(result, out)
        else:
            _render_compare(result, out, markdown=args.markdown, limit=args.limit)
        return 0
    if pictures:
        from .pictures import write_report

        code = write_report(reports[0], timelines[0], html=args.html, png=args.png, svg=args.svg, layer=args.chart_layer)
        if code or not text_out:
            return code
    if args.json:
        _write_json(reports[0], out)
    else:
        _render(reports[0], out, markdown=args.markdown, limit=args.limit)
    return 0


def _build(path: str, filters: Any, options: Any, *, timeline: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from ..analysis.session import open_trace
    from .progress import Progress

    with open_trace(path) as trace, Progress(sys.stderr, f"report {path}") as progress:
        if progress.enabled:  # stderr is a terminal: show how far the running query is (its bar is never printed)
            con = trace.connection
            con.execute("SET enable_progress_bar = true")
            progress.watch(lambda: con.query_progress() / 100)
        return trace.summary(filters, options), (trace.timeline(filters).to_json() if timeline else None)


def _write_json(obj: dict[str, Any], out: IO[str]) -> None:
    json.dump(obj, out, indent=2, allow_nan=False)
    out.write("\n")


# -- rendering ------------------------------------------------------------------------------------------
def _render(report: dict[str, Any], out: IO[str], *, markdown: bool, limit: int) -> None:
    from ..analysis.tables import header, report_tables

    lines, tables = header(report), report_tables(report, limit=limit)
    if markdown:
        _markdown(lines, tables, out)
    else:
        _rich(lines, tables, out)


def _render_compare(result: dict[str, Any], out: IO[str], *, markdown: bool, limit: int) -> None:
    from ..analysis.tables import compare_tables, header

    lines = [f"a: {line}" for line in header(result["a"])[:3]] + [f"b: {line}" for line in header(result["b"])[:3]]
    tables = compare_tables(result, limit=limit)
    if markdown:
        _markdown(lines, tables, out)
    else:
        _rich(lines, tables, out)


def _markdown(lines: list[str], tables: list[Any], out: IO[str]) -> None:
    from ..safe_text import printable

    def cell(text: str) -> str:
        return printable(text).replace("|", "\\|")

    out.write("## moeprobe report\n\n")
    for line in lines:
        out.write(f"- {cell(line)}\n")
    for table in tables:
        out.write(f"\n### {cell(table.title)}\n\n")
        out.write("| " + " | ".join(cell(c) for c in table.columns) + " |\n")
        out.write("|" + "|".join("---" for _ in table.columns) + "|\n")
        for row in table.rows:
            out.write("| " + " | ".join(cell(c) for c in row) + " |\n")
        if table.note.strip():
            out.write(f"\n_{cell(table.note.strip())}_\n")


def _rich(lines: list[str], tables: list[Any], out: IO[str]) -> None:
    """Box tables laid out for the output's width: a table wider than it is split into column groups that each
    repeat the first column. A terminal's width is its own; a pipe or a file takes ``COLUMNS`` when set and
    otherwise every table's natural width. Nothing is padded with trailing spaces."""
    import io
    import textwrap

    from rich.console import Console

    from ..safe_text import printable

    width = _output_width(out)
    tty = out.isatty()
    buffer = io.StringIO()
    # A wide virtual console renders each table at its natural width; the splitting below keeps it within `width`.
    console = Console(file=buffer, width=100_000, highlight=False, force_terminal=tty, color_system="auto" if tty else None)

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


def _column_widths(table: Any) -> list[int]:
    from rich.cells import cell_len

    from ..safe_text import printable

    return [
        max([cell_len(printable(column))] + [cell_len(printable(row[i])) for row in table.rows if i < len(row)])
        for i, column in enumerate(table.columns)
    ]


def _column_groups(table: Any, width: int | None) -> list[list[int]]:
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


def _rich_table(table: Any, part: list[int]) -> Any:
    from rich.table import Table as RichTable
    from rich.text import Text

    from ..safe_text import printable

    def text(value: str) -> Text:
        # Text, not str: a tag value such as "[/]" is shown as written instead of being parsed as markup.
        return Text(printable(value))

    rich_table = RichTable(expand=False)
    for i in part:
        rich_table.add_column(text(table.columns[i]), justify="left" if i == 0 else "right", overflow="fold")
    for row in table.rows:
        rich_table.add_row(*(text(row[i]) if i < len(row) else Text("") for i in part))
    return rich_table
