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
    parser.add_argument("trace", help="trace directory or s3://bucket/prefix")
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
            "dropped_choices": dropped_choices(reader.segments("routing"), reader.filesystem),
            **ranks_and_hosts(reader)}


def ranks_and_hosts(reader: Any) -> dict[str, Any]:
    """Per-rank and per-host counts, and which ranks of ``world_size`` have no shard (missing) or a writer that
    vanished (stale): what a many-host job needs to see first. Counts are the shards' own counters; segments and
    rows are what is readable (committed segments)."""
    from ..traces.reader import shard_state

    readable: dict[int, dict[str, int]] = {}
    for segment in reader.segments("routing"):
        counts = readable.setdefault(segment.rank, {"segments": 0, "rows": 0, "bytes": 0})
        counts["segments"] += 1
        counts["rows"] += segment.rows
        counts["bytes"] += segment.bytes
    ranks = []
    hosts: dict[str, dict[str, Any]] = {}
    for rank, shard in sorted(reader.shards.items()):
        counters = shard.get("counters", {})
        state = shard_state(shard)
        routing = readable.get(rank, {"segments": 0, "rows": 0, "bytes": 0})
        dropped = counters.get("dropped", {})
        entry: dict[str, Any] = {
            "rank": rank,
            "host": shard["host"],
            "state": state,
            "steps": counters.get("steps", 0),
            "tokens": counters.get("tokens", 0),
            "decisions": counters.get("decisions", 0),
            "dropped": sum(dropped.values()) if isinstance(dropped, dict) else 0,
            "routing_segments": routing["segments"],
            "routing_rows": routing["rows"],
            "bytes": counters.get("bytes", 0),
            "heartbeat_at": shard.get("heartbeat_at"),
        }
        ranks.append(entry)
        host = hosts.setdefault(shard["host"], {"host": shard["host"], "ranks": [], "tokens": 0, "decisions": 0,
                                                "routing_rows": 0, "stale_ranks": []})
        host["ranks"].append(rank)
        host["tokens"] += entry["tokens"]
        host["decisions"] += entry["decisions"]
        host["routing_rows"] += entry["routing_rows"]
        if state == "stale":
            host["stale_ranks"].append(rank)
    world_size = reader.manifest.get("world_size", 1)
    expected = set(range(world_size)) if isinstance(world_size, int) else set()
    return {
        "ranks": ranks,
        "hosts": sorted(hosts.values(), key=lambda h: h["host"]),
        "missing_ranks": sorted(expected - set(reader.shards)),
        "stale_ranks": [r["rank"] for r in ranks if r["state"] == "stale"],
    }


def dropped_choices(segments: list[Any], filesystem: Any = None) -> int | None:
    """Routing choices marked ``dropped`` (over expert capacity): read from the one boolean column, and from
    Parquet statistics alone for the row groups that have no drop. None when a segment cannot be read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for segment in segments:
        try:
            handle = pq.ParquetFile(segment.path, filesystem=filesystem)
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
    _render_ranks(console, summary)
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
            + ("(wrapped forwards, with latency)" if capture == "hooks" else "(ops in the model's graph, no latency)")
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


def _render_ranks(console: Any, summary: dict[str, Any]) -> None:
    """Missing and stale ranks first (they mean partial data), then per-host and per-rank counts."""
    from rich.table import Table

    from ..safe_text import plain

    missing, stale = summary.get("missing_ranks", []), summary.get("stale_ranks", [])
    if missing:
        console.print(f"[bold yellow]missing[/]   ranks {', '.join(map(str, missing))}: no shard written (yet); their routing is not in this trace")
    if stale:
        console.print(f"[bold yellow]stale[/]     ranks {', '.join(map(str, stale))}: writer gone without closing (killed?); their committed segments are readable")
    hosts = summary.get("hosts", [])
    if len(hosts) > 1 or len(summary.get("ranks", [])) > 1:
        table = Table(title="Hosts", title_justify="left")
        for col in ("host", "ranks", "stale", "tokens", "decisions", "routing rows"):
            table.add_column(col, justify="left" if col in ("host", "ranks", "stale") else "right")
        for host in hosts:
            table.add_row(plain(host["host"]), ", ".join(map(str, host["ranks"])),
                          ", ".join(map(str, host["stale_ranks"])) or "-", _count(host["tokens"]),
                          _count(host["decisions"]), _count(host["routing_rows"]))
        console.print(table)
        ranks = Table(title="Ranks", title_justify="left")
        for col in ("rank", "host", "state", "steps", "tokens", "decisions", "dropped", "segments", "routing rows"):
            ranks.add_column(col, justify="left" if col in ("host", "state") else "right")
        for r in summary["ranks"]:
            ranks.add_row(str(r["rank"]), plain(r["host"]), plain(r["state"]), _count(r["steps"]), _count(r["tokens"]),
                          _count(r["decisions"]), _count(r["dropped"]), _count(r["routing_segments"]), _count(r["routing_rows"]))
        console.print(ranks)


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
