"""``moeprobe inspect TRACE``: the manifest, the segments, row counts and dropped records."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from .args import Parser

HELP = "show a trace's manifest, mode, source, segments, row counts and dropped records"

_STATE_NOTE = {
    "running": "writer still running",
    "complete": "closed normally",
    "aborted": "closed after an error",
    "stale": "writer vanished without closing (killed?); complete segments are readable",
}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moeprobe inspect", description="Show what a trace holds.")
    parser.add_argument("trace", help="trace directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def summarize(reader: Any) -> dict[str, Any]:
    from ..traces.schema import TABLES

    manifest = reader.manifest
    tables = {}
    for name in TABLES:
        segments = reader.segments(name)
        tables[name] = {
            "segments": len(segments),
            "rows": sum(s.rows for s in segments),
            "bytes": sum(s.bytes for s in segments),
        }
    return {"path": str(reader.path), "manifest": manifest, "mode": reader.mode, "tables": tables,
            "dropped_choices": dropped_choices(reader.segments("routing"))}


def dropped_choices(segments: list[Any]) -> int | None:
    """Routing choices marked ``dropped`` (over expert capacity): read from the one boolean column, and from
    Parquet statistics alone for the row groups that have no drop. None when a segment cannot be read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for segment in segments:
        try:
            handle = pq.ParquetFile(segment.path)
            column = handle.schema_arrow.get_field_index("dropped")
            if column < 0:
                continue
            for group in range(handle.num_row_groups):
                stats = handle.metadata.row_group(group).column(column).statistics
                if stats is not None and stats.has_min_max and stats.max is False:
                    continue  # no drop in this row group
                values = handle.read_row_group(group, columns=["dropped"]).column(0)
                total += int(pc.sum(values.cast("int64")).as_py() or 0)
        except (OSError, ValueError, KeyError):
            return None  # a damaged segment: `report` names it; inspect still shows what it can
    return total


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _count(value: Any) -> str:
    """A counter with thousands separators; a damaged (non-numeric) one is shown as written, not a crash."""
    from ..safe_text import plain

    return f"{value:,}" if isinstance(value, (int, float)) and not isinstance(value, bool) else plain(value)


def _render(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..safe_text import plain

    # Every value interpolated below comes from the trace (or its path): plain() escapes markup and control codes.
    console = Console(highlight=False, soft_wrap=True)
    m = summary["manifest"]
    model = m["model"]
    status = m["status"]
    console.print(f"[bold]{plain(summary['path'])}[/]  moeprobe trace v{m['format_version']}")
    anomalies = m.get("counters", {}).get("anomalies", {})
    if anomalies:
        # First, not last: a trace with anomalies may miss or misplace routing, and a reader must know before trusting it.
        total = sum(anomalies.values())
        console.print(f"[bold yellow]WARNING[/] {_count(total)} capture anomalies (listed below): some routing may be missing or approximate")
    console.print(f"status    [bold]{plain(status)}[/] ({_STATE_NOTE.get(status, '')})")
    if "engine" in model:  # imported from an engine's output: no module to describe
        console.print(f"model     {plain(model.get('name'))} (imported from {plain(model['engine'])})")
    else:
        console.print(
            f"model     {plain(model.get('name'))} ({plain(model.get('class'))}, family {plain(model.get('family'))}, "
            f"{_count(model.get('parameters', 0))} parameters, {plain(model.get('dtype'))} on {plain(model.get('device'))})"
        )
    mode = summary.get("mode", "tokens")
    console.print(f"mode      {mode} " + ("(per-token routing rows)" if mode == "tokens" else
                  "(expert loads per step only: no per-token analyses)"))
    source = m.get("source")
    if isinstance(source, dict):
        files = source.get("files") or []
        shown = ", ".join(plain(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        console.print(f"source    {plain(source.get('engine'))} {plain(source.get('version') or 'version unknown')}"
                      f" ({plain(source.get('kind', 'import'))}): {shown or 'no files'}")
    console.print(f"ranks     {m['world_size']} (shards: {', '.join(str(s['rank']) + ':' + s['state'] for s in m['shards']) or 'none yet'})")
    counters = m.get("counters", {})
    console.print(
        f"captured  {_count(counters.get('steps', 0))} steps, {_count(counters.get('tokens', 0))} tokens, "
        f"{_count(counters.get('decisions', 0))} routing decisions"
    )
    options = m.get("options") or {}
    if options.get("capture"):
        # Which capture recorded (the mode has its own line): hook capture has latency, graph capture survives
        # compiled models and CUDA graphs but times nothing; a sampled trace has tokens for some steps only.
        capture = options["capture"]
        sample = options.get("sample")
        console.print(
            f"capture   {plain(capture)} "
            + ("(forward hooks, with latency)" if capture == "hooks" else "(ops in the model's graph, no latency)")
            + (f"; tokens of 1 step in {plain(sample)}, counts of every step" if sample else "")
        )
    for shard in m["shards"]:
        console.print(f"rank {shard['rank']}    pid {shard['pid']} on {plain(shard['host'])}, started {_when(shard.get('started_at'))}, "
                      f"last heartbeat {_when(shard.get('heartbeat_at'))}" + (f", error: {plain(shard['error'])}" if shard.get("error") else ""))

    layers = Table(title="MoE layers", title_justify="left")
    for col in ("#", "module", "family", "experts", "top-k", "shared", "scoring", "bias"):
        layers.add_column(col, justify="right" if col in ("#", "experts", "top-k", "shared") else "left")
    for layer in m["layers"]:
        layers.add_row(
            str(layer["index"]), plain(layer["name"]), plain(layer.get("family", "")), str(layer["num_experts"]), str(layer["top_k"]),
            plain(layer.get("num_shared_experts", 0)), plain(layer.get("scoring", "")), "yes" if layer.get("has_bias") else "no",
        )
    console.print(layers)

    tables = Table(title="Segments", title_justify="left")
    for col in ("table", "segments", "rows", "bytes"):
        tables.add_column(col, justify="left" if col == "table" else "right")
    for name, t in summary["tables"].items():
        tables.add_row(name, f"{t['segments']:,}", f"{t['rows']:,}", f"{t['bytes']:,}")
    console.print(tables)

    choices = summary.get("dropped_choices")
    if choices is None:
        console.print("dropped choices (over capacity): unknown (a routing segment could not be read)")
    else:
        console.print(f"dropped choices (over capacity): {_count(choices)} of {_count(summary['tables']['routing']['rows'])} "
                      "routing decisions (they count in the routed load, not in the processed load)")
    dropped = counters.get("dropped", {})
    anomalies = counters.get("anomalies", {})
    if dropped:
        console.print("[bold red]dropped[/]   " + ", ".join(f"{_count(v)} decisions ({plain(k)})" for k, v in dropped.items())
                      + " not recorded")
    else:
        console.print("dropped   none (no record lost by the capture)")
    if anomalies:
        console.print("[yellow]anomalies[/] " + ", ".join(f"{plain(k)}: {plain(v)}" for k, v in anomalies.items()))
    else:
        console.print("anomalies none")


def main(argv: list[str]) -> int:
    from ..traces.reader import TraceReader

    args = _parser().parse_args(argv)
    summary = summarize(TraceReader(args.trace))
    if args.json:
        json.dump(summary, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        _render(summary)
    return 0
