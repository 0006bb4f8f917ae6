"""``moeprobe report TRACE``: load imbalance, specialization and latency as terminal tables, JSON or Markdown;
``moeprobe report A B --compare`` puts two traces side by side."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .args import Parser, add_selection_options, selection_filters
from .render import RenderOptions

if TYPE_CHECKING:
    from ..analysis.filters import Filters
    from ..analysis.report_json import ReportOptions
    from ..analysis.report_model import Comparison, Report

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
    opt.add_argument("--logit-sample", type=_count, metavar="LOGITS",
                     help="router statistics: at most this many logits, whole sequences (0: the whole --sample)")
    opt.add_argument("--full", action="store_true", help="JSON: add per-value count tables and co-activation matrices")
    opt.add_argument("--limit", type=_count, default=16, help="rows per table in text and Markdown (0: all)")
    eng = parser.add_argument_group("engine (docs/scale.md)")
    eng.add_argument("--engine", choices=("duckdb", "dask"), default="duckdb",
                     help="duckdb: this process (default); dask: per-shard aggregates on Dask workers, same report")
    eng.add_argument("--workers", type=_positive, help="--engine dask: local worker processes (4)")
    eng.add_argument("--scheduler", metavar="ADDRESS", help="--engine dask: a running Dask scheduler instead of local workers")
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
        logit_budget=defaults.logit_budget if args.logit_sample is None else args.logit_sample,
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
    if args.engine == "duckdb" and (args.scheduler is not None or args.workers is not None):
        raise UsageError("--workers and --scheduler need --engine dask")
    if args.scheduler is not None and args.workers is not None:
        raise UsageError("--workers starts local workers; a --scheduler brings its own: give one of them")
    engine = {"workers": args.workers or 4, "scheduler": args.scheduler} if args.engine == "dask" else None
    built = [_build(path, filters, options, timeline=pictures, engine=engine) for path in args.traces]
    reports = [report for report, _ in built]
    timelines = tuple(timeline for _, timeline in built if timeline is not None)  # one per trace with pictures
    text_out = not pictures or args.json or args.markdown
    document: Report | Comparison = reports[0]
    if args.compare:
        from ..analysis.report_json import compare_reports

        document = compare_reports(reports[0], reports[1])
    render_options = RenderOptions(limit=args.limit, timelines=timelines, chart_layer=args.chart_layer)
    if pictures:
        from .pictures import write_pictures

        code = write_pictures("report", document, render_options, html=args.html, png=args.png, svg=args.svg)
        if code or not text_out:
            return code
    from importlib import import_module

    # Only the renderer asked for: text's tables are not imported for --json.
    renderer = import_module(f".render.{'json_doc' if args.json else 'markdown' if args.markdown else 'text'}", __package__)
    renderer.render(document, sys.stdout, render_options)
    return 0


def _build(
    path: str, filters: Filters, options: ReportOptions, *, timeline: bool = False, engine: dict[str, Any] | None = None
) -> tuple[Report, dict[str, Any] | None]:
    from ..analysis.session import open_trace
    from .progress import Progress

    with open_trace(path) as trace, Progress(sys.stderr, f"report {path}") as progress:
        if engine is not None:  # the shards' full passes run on Dask; the report is then built as usual
            from ..distributed import prepare

            prepare(trace, filters, workers=engine["workers"], scheduler=engine["scheduler"])
        if progress.enabled:  # stderr is a terminal: show how far the running query is (its bar is never printed)
            con = trace.connection
            con.execute("SET enable_progress_bar = true")
            progress.watch(lambda: con.query_progress() / 100)
        return trace.report(filters, options), (trace.timeline(filters).to_json() if timeline else None)
