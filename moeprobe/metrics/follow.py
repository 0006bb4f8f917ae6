"""``moeprobe serve``'s side of the endpoint: counts fed from a trace directory, followed while it grows.

Each scrape refreshes the trace (listing files and reading new footers, like the TUI's source) and counts only
the flushes it has not counted, in write order, so following a long recording costs per scrape what was written
since the last one. The writer merges small segments (traces/compaction.py): a merged file holds flushes that
were counted already from their own files, so flushes are followed by number, preferring single-flush files
(kept for a grace period after a merge), and a merged file is counted only when it holds no counted flush. A segment that cannot be read is reported once on stderr, counted
(``moeprobe_trace_read_errors_total``) and left out; the metrics keep serving what was read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..analysis.session import Trace, open_trace
from ..safe_text import printable
from ..traces import layout
from ..traces.errors import TraceError
from ..traces.reader import shard_state
from .counts import LiveCounts
from .options import Health, MetricsOptions, ShardView, heartbeat_age

log = logging.getLogger(__name__)

COLUMNS = {
    "routing": ["step", "layer", "k", "expert", "dropped"],
    "latency": ["layer", "router_ms", "block_ms"],
}


class TraceFollower:
    """A trace on disk as metric shards, one per rank. Raises ``TraceError`` if the path is not a trace."""

    def __init__(self, path: str | Path, options: MetricsOptions, *, warn: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.trace: Trace = open_trace(path)
        self._warn = warn or log.warning
        self._lock = threading.Lock()
        self._counts: dict[int, LiveCounts] = {}
        self._next_flush: dict[tuple[int, str], int] = {}  # (rank, table) -> first flush number not counted
        self._errors: dict[int, int] = {}
        self._problems: set[str] = set()
        self.poll()

    def _counts_of(self, rank: int) -> LiveCounts:
        counts = self._counts.get(rank)
        if counts is None:
            counts = self._counts[rank] = LiveCounts(self.trace.layers, window_steps=self.options.window_steps)
        return counts

    def poll(self) -> None:
        """Pick up segments written since the last poll."""
        with self._lock:
            reader = self.trace.reader
            try:
                reader.refresh()
            except TraceError as exc:
                # A segment or manifest caught mid-damage: keep what was counted, say so once per message.
                self._problem(f"moeprobe serve: {printable(exc)}", rank=None)
                return
            for table, columns in COLUMNS.items():
                for rank in reader.shards:
                    self._follow(reader, rank, table, columns)
            for rank in reader.shards:
                self._counts_of(rank)

    def _follow(self, reader: Any, rank: int, table: str, columns: list[str]) -> None:
        """Count the flushes of one table of one shard not counted yet, in flush order."""
        key = (rank, table)
        single: dict[int, tuple[int, Path]] | None = None
        for segment in reader.segments(table):
            span = layout.segment_span(segment.path)
            if segment.rank != rank or span is None:
                continue
            first, last = span
            start = self._next_flush.get(key, 0)
            if last < start:
                continue
            if first >= start:
                self._read(reader, rank, table, columns, segment.path)
            else:
                # Merged after its first flushes were counted: read the rest from their own files, which stay
                # for a grace period after a merge (the smallest span starting at each flush).
                if single is None:
                    single = {}
                    listed = (
                        (s, p) for p in layout.table_dir(reader.path, rank, table).iterdir() if (s := layout.segment_span(p)) is not None
                    )
                    for (span_first, span_last), p in sorted(listed, key=lambda t: (t[0][0], -t[0][1])):
                        single[span_first] = (span_last, p)
                n = start
                while n <= last and n in single and single[n][0] <= last:
                    self._read(reader, rank, table, columns, single[n][1])
                    n = single[n][0] + 1
                if n <= last:
                    self._problem(
                        f"moeprobe serve: {segment.path}: flushes {n}..{last} were merged and deleted before they were "
                        "read (a gap between scrapes longer than the grace period); left out",
                        rank,
                    )
            self._next_flush[key] = last + 1

    def _read(self, reader: Any, rank: int, table: str, columns: list[str], path: Path) -> None:
        try:
            data = reader.read_segment_file(path, table, columns)
        except (OSError, ValueError, pa.ArrowException) as exc:
            self._problem(f"moeprobe serve: {path}: unreadable segment left out ({printable(exc)})", rank)
            return
        self._counts_of(rank).add(table, data)

    def _problem(self, message: str, rank: int | None) -> None:
        """Count and report a problem once: a damaged file fails every refresh until it is gone."""
        if message in self._problems:
            return
        self._problems.add(message)
        key = rank if rank is not None else min(self._counts, default=0)
        self._errors[key] = self._errors.get(key, 0) + 1
        self._warn(message)

    def views(self) -> list[ShardView]:
        self.poll()
        with self._lock:
            reader = self.trace.reader
            model = str(reader.model.get("name") or "?")
            views = []
            for rank in sorted(self._counts):
                shard = reader.shards.get(rank, {})
                counters = shard.get("counters", {})
                anomalies = counters.get("anomalies", {})
                running = bool(shard) and shard_state(shard) == "running"
                health = Health(
                    steps=int(counters.get("steps", 0)),
                    dropped={str(k): int(v) for k, v in counters.get("dropped", {}).items()},
                    anomalies=int(sum(int(v) for v in anomalies.values())) if isinstance(anomalies, dict) else 0,
                    heartbeat_age_s=heartbeat_age(shard.get("heartbeat_at")) if running else None,
                    read_errors=self._errors.get(rank, 0),
                )
                views.append(ShardView(model, rank, self._counts[rank].snapshot(), health))
            return views

    def close(self) -> None:
        with self._lock:
            self.trace.close()
