"""Merging a shard's small segments, so that a long recording stays a few hundred files.

A writer flushes one segment per table every ``flush_interval`` (1 s by default): a day is 86,400 files per
table, and every reader lists and opens them all. The shard's writer (which holds the shard's flock, so no other
process writes or merges here) merges them as it goes, size-tiered like a counter in base ``FANOUT``: when the
last ``FANOUT`` segments hold the same number of flushes, they become one segment (``NNNNNN-MMMMMM.parquet``, the
flush numbers it holds), unless that would pass ``TARGET_BYTES``. Every flush is then rewritten about
log_FANOUT(flushes per full segment) times, and a shard holds at most ``FANOUT - 1`` segments per tier plus its
full segments.

Atomic for readers: the merged file is written under a temporary name, renamed into place, and only then are
the segments it holds deleted; a listing at any moment shows each flush once (``layout.visible`` hides what a
merged segment holds). Deletion waits ``GRACE_S`` so that a reader's snapshot taken before the rename can still
read the files it listed. So ``close`` deletes only what is past its grace: a recording keeps, after close, the
last minute or so of merged-away segments beside the merged ones (hidden by ``layout.visible``; a tool that
globs the files must apply the same rule). A kill at any point leaves a readable trace without duplicates: a
temporary file that no listing shows, or merged segments beside the ones they hold (hidden).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import layout

FANOUT = 16
TARGET_BYTES = 32 << 20  # a merged segment stays under this (tens of MB: one DuckDB scan, bounded writer memory)
GRACE_S = 60.0  # merged-away segments are deleted this long after the merge (readers' older snapshots)
ROW_GROUP_ROWS = 1 << 20


@dataclass
class Compactor:
    """Merges one shard's segments; owned by that shard's ``ShardWriter`` (and called from its thread)."""

    trace: Path
    rank: int
    schemas: dict[str, pa.Schema]
    write_options: Callable[[str, pa.Schema], dict[str, Any]]
    fanout: int = FANOUT
    target_bytes: int = TARGET_BYTES
    grace_s: float = GRACE_S
    merges: int = 0
    _doomed: list[tuple[float, Path]] = field(default_factory=list)
    _planned: dict[str, int] = field(default_factory=dict)  # table -> flush count of its last plan with no merge

    def run(self, committed: dict[str, int]) -> None:
        """Merge what the policy says in every table, then delete merged-away segments whose grace is over.
        ``committed``: flushes per table that shard.json already counts; only those are merged, so a merged
        segment never holds a flush that readers do not show yet."""
        for table, count in committed.items():
            if self._planned.get(table) == count:
                continue  # nothing new in this table since a plan found nothing to merge: skip the listing
            while (run := self._plan(table, count)) is not None:
                self._merge(table, run)
            self._planned[table] = count
        self.delete_expired()

    # -- policy -----------------------------------------------------------------------------------
    def _plan(self, table: str, count: int) -> list[Path] | None:
        files = [p for p in layout.segments(self.trace, self.rank, table) if _span(p)[1] < count]
        if len(files) < self.fanout:
            return None
        sizes = [_size(p) for p in files[-self.fanout:]]
        tier = _tier(files[-1], self.fanout)
        run: list[Path] = []
        for path in reversed(files):
            if _tier(path, self.fanout) != tier or len(run) == self.fanout:
                break
            run.insert(0, path)
        if len(run) < self.fanout or sum(sizes) > self.target_bytes:
            return None
        return run

    # -- doing it ---------------------------------------------------------------------------------
    def _merge(self, table: str, run: list[Path]) -> None:
        first, last = _span(run[0])[0], _span(run[-1])[1]
        directory = layout.table_dir(self.trace, self.rank, table)
        final = directory / layout.merged_name(first, last)
        tmp = directory / f".{final.name}{layout.TMP_SUFFIX}"
        schema = self.schemas[table]
        try:
            # One input at a time, row groups of ROW_GROUP_ROWS: memory is bounded by a row group, not the run.
            options = {k: v for k, v in self.write_options(table, schema).items() if k != "row_group_size"}
            with pq.ParquetWriter(tmp, schema, **options) as out:
                buffered: list[pa.Table] = []
                rows = 0
                for path in run:
                    part = pq.read_table(path).cast(schema)
                    buffered.append(part)
                    rows += part.num_rows
                    if rows >= ROW_GROUP_ROWS:
                        out.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
                        buffered, rows = [], 0
                if buffered:
                    out.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        self.merges += 1
        now = time.monotonic()
        self._doomed += [(now, p) for p in run]

    def delete_expired(self) -> None:
        """Delete the merged-away segments whose grace is over."""
        if not self._doomed:
            return
        now = time.monotonic()
        keep = []
        for merged_at, path in self._doomed:
            if now - merged_at >= self.grace_s:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            else:
                keep.append((merged_at, path))
        self._doomed = keep


def _span(path: Path) -> tuple[int, int]:
    span = layout.segment_span(path)
    assert span is not None  # layout.segments lists only segment names
    return span


def _tier(path: Path, fanout: int) -> int:
    first, last = _span(path)
    return int(math.log(last - first + 1, fanout) + 1e-9)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
