"""Opens a trace directory: validates it, lists complete segments and loads tables with pyarrow.

Reading while the writer is still running is the normal case: only renamed (complete) segments are
listed, and ``refresh()`` picks up the ones written since.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .compact import RoutingEncoding, decode
from .errors import CorruptManifestError, CorruptSegmentError, NotATraceError, TraceError, TraceNotFoundError
from .manifest import file_kind, read_shard_manifest, read_trace_manifest
from .schema import TABLES, with_rank
from .storage import is_remote

# A writer on another host cannot be probed by pid; past this long without a heartbeat it is presumed gone.
REMOTE_STALE_AFTER_S = 60.0
LISTING_ATTEMPTS = 5  # listings in a row that may each lose a file to a concurrent compaction


class _Vanished(TraceError):
    """A listed segment was deleted before its footer was read (compaction merged it)."""


@dataclass(frozen=True)
class Segment:
    rank: int
    table: str
    path: Path
    rows: int
    bytes: int
    # Format 2 routing: every row uses all K choice columns in rank order (no padding, no explicit ranks), by
    # the footer's statistics; the view then reads it without a filter or a rank lookup per decision.
    full_rank: bool = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_state(shard: dict[str, Any]) -> str:
    """running / complete / aborted, or ``stale`` when the status says running but its writer is gone."""
    status: str = shard["status"]
    if status != "running":
        return status
    if shard.get("host") == socket.gethostname():
        return "running" if _pid_alive(shard["pid"]) else "stale"
    return "stale" if time.time() - float(shard["heartbeat_at"]) > REMOTE_STALE_AFTER_S else "running"


class TraceReader:
    """A validated view of one trace directory (all shards), or of a trace in an object store (``s3://``)."""

    # Set by the object-store reader: the fsspec filesystem its segment URLs are read through (DuckDB and
    # pyarrow take it); None for a local trace.
    filesystem: Any = None

    def __new__(cls, path: str | os.PathLike[str]) -> TraceReader:
        # Every caller (open_trace, inspect, the TUI) gets the object-store reader for an s3:// URL.
        if cls is TraceReader and is_remote(path):
            from .remote_reader import RemoteTraceReader

            return super().__new__(RemoteTraceReader)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._check_path()
        self._header = read_trace_manifest(self.path / layout.MANIFEST)
        self._read_encoding(self.path / layout.MANIFEST)
        self.shards: dict[int, dict[str, Any]] = {}
        self._segments: dict[str, list[Segment]] = {}
        self.refresh()

    def _read_encoding(self, manifest: Any) -> None:
        """The stored schema of every table, from the trace manifest (``manifest``: its location, for messages)."""
        # v1 stored every table as its logical schema; v2 stores routing compactly (see compact.py).
        self.routing_encoding: RoutingEncoding | None = None
        if self._header["format_version"] >= 2:
            try:
                self.routing_encoding = RoutingEncoding.from_manifest(self._header.get("encoding", {}).get("routing"))
            except (ValueError, AttributeError) as exc:
                raise CorruptManifestError(f"{manifest}: {exc}") from exc
        self._stored = dict(TABLES)
        if self.routing_encoding is not None:
            self._stored["routing"] = self.routing_encoding.schema()

    def _check_path(self) -> None:
        path = self.path
        try:
            # os.stat, not Path.exists(): exists() answers False for a symlink loop, which would read as a
            # broken link (and make the TUI wait forever for a trace that can never appear).
            os.stat(path)
            exists = True
        except FileNotFoundError:
            exists = False
        except NotADirectoryError:  # a path through a file, e.g. trace.txt/sub
            exists = False
        except OSError as exc:  # symlink loops (ELOOP), overlong names
            raise NotATraceError(f"{path}: cannot be opened ({exc.strerror or exc})") from exc
        if not exists:
            if path.is_symlink():
                raise TraceNotFoundError(f"{path}: broken symbolic link")
            raise TraceNotFoundError(f"{path}: no such trace (the path does not exist)")
        if not path.is_dir():
            raise NotATraceError(f"{path}: not a trace (it is a file, a trace is a directory)")
        if not os.access(path, os.R_OK | os.X_OK):
            raise NotATraceError(f"{path}: permission denied")
        if not (path / layout.MANIFEST).exists():
            try:
                empty = not any(path.iterdir())
            except OSError as exc:
                raise NotATraceError(f"{path}: cannot be listed ({exc.strerror or exc})") from exc
            what = "an empty directory" if empty else "a directory without manifest.json"
            raise NotATraceError(f"{path}: not a moeprobe trace ({what})")

    # -- refresh ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read shard manifests and the list of complete segments."""
        shards: dict[int, dict[str, Any]] = {}
        try:
            ranks = layout.shard_ranks(self.path)
        except OSError as exc:
            raise NotATraceError(f"{self.path}: cannot be listed ({exc.strerror or exc})") from exc
        for rank in ranks:
            shard_file = layout.shard_dir(self.path, rank) / layout.SHARD_MANIFEST
            if not shard_file.exists():
                continue  # a shard being created this instant; it has no data yet
            shard = read_shard_manifest(shard_file)
            shards[rank] = shard
        self.shards = shards
        for attempt in range(LISTING_ATTEMPTS):
            try:
                self._segments = {name: self._list_segments(name) for name in TABLES}
                return
            except _Vanished:
                # Compaction deleted a merged segment between the listing and its footer: list again (the
                # merged file was renamed in before the deletion, so the new listing has it).
                if attempt == LISTING_ATTEMPTS - 1:
                    raise

    def _checked_segment(self, rank: int, table: str, path: Any, size: int) -> Segment:
        """A new segment's entry from its checked footer; local and object-store listings share it, so both count
        format-2 decisions and judge full-rank routing the same way."""
        meta = check_segment_metadata(path, table, self._stored[table], filesystem=self.filesystem)
        rows, full_rank = meta.num_rows, False
        if table == "routing" and self.routing_encoding is not None:
            rows = _stored_decisions(path, meta, self.routing_encoding.top_k, self.filesystem)
            full_rank = _full_rank(meta, self.routing_encoding.top_k)
        return Segment(rank, table, path, rows, size, full_rank)

    def _list_segments(self, table: str) -> list[Segment]:
        found: list[Segment] = []
        root = self.path.resolve()
        # Indexed by path: a long recording has thousands of segments, and a refresh must cost one
        # directory listing plus the footers of new segments, not a scan of the known list per file.
        previous = {s.path: s for s in self._segments.get(table, [])}
        for rank, shard in self.shards.items():
            for path in _committed(shard, table, layout.segments(self.path, rank, table)):
                known = previous.get(path)
                if known is not None:
                    found.append(known)
                    continue
                try:
                    _check_segment_file(path, root)
                    found.append(self._checked_segment(rank, table, path, path.stat().st_size))
                except (OSError, CorruptSegmentError) as exc:
                    if not os.path.lexists(path):
                        raise _Vanished(str(path)) from exc
                    if isinstance(exc, CorruptSegmentError):
                        raise
                    raise CorruptSegmentError(f"{path}: cannot be opened ({exc.strerror or exc})") from exc
        return found

    def find_corrupt_segment(self) -> None:
        """Read every listed segment in full and raise ``CorruptSegmentError`` naming the first one that fails.

        Listing checks only footers, so damage inside the column data surfaces later, in whatever query reads
        it (DuckDB then reports a bare decoding error). Callers use this on a failed query to turn that error
        into one that names the file; it costs a full read, so it runs only on the failure path.
        """
        for table in TABLES:
            for segment in self._segments.get(table, []):
                try:
                    pq.read_table(segment.path, filesystem=self.filesystem)
                except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: pyarrow decodes damaged names as UTF-8
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CorruptSegmentError(f"{segment.path}: corrupt Parquet segment ({first})") from exc

    # -- metadata -----------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The trace manifest with status and counters merged over all shards."""
        merged = dict(self._header)
        merged["status"] = self.status
        merged["shards"] = [
            {**{k: v for k, v in shard.items() if k != "counters"}, "state": shard_state(shard)}
            for shard in self.shards.values()
        ]
        merged["counters"] = _sum_counters([s["counters"] for s in self.shards.values()])
        return merged

    @property
    def status(self) -> str:
        """complete only when every shard is; aborted or stale if any is; running otherwise."""
        states = [shard_state(s) for s in self.shards.values()]
        if not states:
            return "running"
        for worst in ("stale", "aborted", "running"):
            if worst in states:
                return worst
        return "complete"

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self._header["layers"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self._header["model"])

    def keep_only(self, paths: set[str]) -> None:
        """Narrow this snapshot to the segments named in ``paths`` (``str(segment.path)``): the snapshot another
        process took of the same trace (moeprobe.distributed), so that both read exactly the same rows even while
        the trace grows. A named segment that this listing lacks is an error: segments never go away once
        committed, so the trace was replaced in between."""
        listed = {str(s.path) for table in self._segments.values() for s in table}
        missing = sorted(paths - listed)
        if missing:
            raise TraceError(f"{self.path}: segment {missing[0]} is gone (was the trace replaced meanwhile?)")
        self._segments = {name: [s for s in found if str(s.path) in paths] for name, found in self._segments.items()}

    def segments(self, table: str) -> list[Segment]:
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
        return list(self._segments[table])

    # -- data ---------------------------------------------------------------------------------------
    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """One table over all shards and complete segments, with ``rank`` as a column."""
        schema = with_rank(TABLES[name])
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        parts = []
        wanted = [c for c in schema.names if c != "rank"]
        for segment in self.segments(name):
            try:
                data = self.read_segment_file(segment.path, name, wanted)
            except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: pyarrow decodes damaged names as UTF-8
                raise CorruptSegmentError(f"{segment.path}: corrupt Parquet segment ({exc})") from exc
            if "rank" in schema.names:
                data = data.append_column("rank", pa.repeat(pa.scalar(segment.rank, pa.int32()), data.num_rows))
            parts.append(data.select(schema.names).cast(schema))
        if not parts:
            return schema.empty_table()
        return pa.concat_tables(parts)

    def read_segment_file(self, path: Path, table: str, columns: list[str]) -> pa.Table:
        """The logical ``columns`` of one segment file of ``table`` (format 2 routing decoded). Raises what
        pyarrow raises on a damaged file (OSError, ValueError, ArrowException)."""
        if table == "routing" and self.routing_encoding is not None:
            return decode(pq.read_table(path, filesystem=self.filesystem), self.routing_encoding, columns)
        return pq.read_table(path, columns=columns, filesystem=self.filesystem)

    def routing(self) -> pa.Table:
        return self.table("routing")

    def steps(self) -> pa.Table:
        return self.table("steps")

    def latency(self) -> pa.Table:
        return self.table("latency")

    def tags(self) -> pa.Table:
        return self.table("tags")

    def scores(self) -> pa.Table:
        return self.table("scores")

    def bias(self) -> pa.Table:
        return self.table("bias")

    def loads(self) -> pa.Table:
        return self.table("loads")

    @property
    def mode(self) -> str:
        """``counts`` when the trace holds expert loads but no per-token routing rows, else ``tokens``.

        The manifest says so for traces written in counts mode; a trace without that option is judged by
        what it holds, so that analyses pick the right source for any trace.
        """
        if self._header.get("options", {}).get("mode") == "counts":
            return "counts"
        has_routing = any(s.rows for s in self._segments.get("routing", []))
        has_loads = any(s.rows for s in self._segments.get("loads", []))
        return "counts" if has_loads and not has_routing else "tokens"


def check_segment_metadata(path: Path | str, table: str, expected: pa.Schema, filesystem: Any = None) -> pq.FileMetaData:
    """A segment's Parquet footer, checked: it must parse, have the stored schema ``expected`` of ``table`` (format
    2 routing: the trace's encoding) and consistent row counts."""
    try:
        meta = pq.read_metadata(path, filesystem=filesystem)
        schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: pyarrow decodes damaged names as UTF-8
        raise CorruptSegmentError(f"{path}: corrupt or truncated Parquet segment ({exc})") from exc
    names = [f.name for f in expected]
    if schema.names != names or any(not schema.field(n).type.equals(expected.field(n).type) for n in names):
        raise CorruptSegmentError(f"{path}: segment does not have the {table} schema (columns {', '.join(schema.names)})")
    try:
        _check_row_counts(path, meta)
    except (ValueError, pa.ArrowException) as exc:  # damaged column paths decode as bad UTF-8
        raise CorruptSegmentError(f"{path}: corrupt Parquet footer ({exc})") from exc
    return meta


def _check_row_counts(path: Path | str, meta: pq.FileMetaData) -> None:
    """The footer's row counts must agree with each other: the file's total with its row groups', and each row
    group's with the values of its flat columns. ``inspect`` shows these counts without reading the data, so a
    footer that claims 10^8 rows over 32 must be refused here, not believed. (A footer that lies consistently
    everywhere is caught when its rows are read: the pages hold fewer values than it claims.)"""
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    in_groups = sum(g.num_rows for g in groups)
    if meta.num_rows != in_groups:
        raise CorruptSegmentError(
            f"{path}: corrupt Parquet footer (it claims {meta.num_rows:,} rows, its row groups hold {in_groups:,})"
        )
    for group in groups:
        for c in range(group.num_columns):
            column = group.column(c)
            flat = "." not in column.path_in_schema  # list columns hold one value per element, not per row
            if flat and column.num_values != group.num_rows:
                raise CorruptSegmentError(
                    f"{path}: corrupt Parquet footer (a row group claims {group.num_rows:,} rows, its column "
                    f"{column.path_in_schema!r} holds {column.num_values:,} values)"
                )


def _committed(shard: dict[str, Any], table: str, paths: list[Any]) -> list[Any]:
    """The segments the shard's manifest counts as written. The writer renames one segment per table and then
    writes shard.json: a writer killed in between leaves segments that no manifest counts, and reading them
    would make the tables disagree (routing for steps the steps table does not have). Every table shows the
    same flushes. A shard without per-table counts (another writer) shows every complete segment. A merged
    segment (compaction) holds only flushes the manifest already counted."""
    counts = shard.get("counters", {}).get("segments")
    count = counts.get(table) if isinstance(counts, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return paths
    shown, flushes = [], 0
    for path in paths:  # the first `count` flushes, in order; a merged segment holds several
        span = layout.segment_span(path)
        if span is None or flushes + span[1] - span[0] + 1 > count:
            break
        shown.append(path)
        flushes += span[1] - span[0] + 1
    return shown


def _check_segment_file(path: Path, root: Path) -> None:
    """Refuse a segment that is not a regular file inside the trace, before anything opens it.

    A symlink out of the trace would make any file the reader can see look like trace data (and DuckDB read it);
    a FIFO named like a segment would block every reader on open; a device would be read without end.
    """
    try:
        resolved = path.resolve(strict=True)
        info = os.stat(resolved)
    except OSError as exc:
        raise CorruptSegmentError(f"{path}: cannot be opened ({exc.strerror or exc})") from exc
    if not resolved.is_relative_to(root):
        raise CorruptSegmentError(f"{path}: segment resolves outside the trace (to {resolved}); refusing to read it")
    if stat.S_ISDIR(info.st_mode):
        raise CorruptSegmentError(f"{path}: corrupt or truncated Parquet segment (a directory, not a file)")
    if not stat.S_ISREG(info.st_mode):
        raise CorruptSegmentError(f"{path}: segment is {file_kind(info.st_mode)}, not a regular file; refusing to read it")


def _stored_decisions(path: Path | str, meta: pq.FileMetaData, top_k: int, filesystem: Any = None) -> int:
    """Decisions in a v2 routing segment: the sum of its ``choices``, from the footer's statistics when every
    row uses the same number of choices (the usual case), else from that one small column. A count outside
    1..K would make the view invent or lose decisions: refused."""
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "choices")
    total = 0
    for g in range(meta.num_row_groups):
        column = meta.row_group(g).column(leaf)
        stats = column.statistics
        if stats is None or not stats.has_min_max or not stats.has_null_count or stats.null_count:
            break  # read the column (a NULL count is refused there)
        if not 1 <= int(stats.min) <= int(stats.max) <= top_k:
            raise CorruptSegmentError(f"{path}: routing segment has choice counts outside 1..{top_k}")
        if stats.min != stats.max:
            break
        total += int(stats.min) * column.num_values
    else:
        return total
    column = pq.read_table(path, columns=["choices"], filesystem=filesystem).column("choices")
    if column.null_count:  # a hostile file: the view would drop those rows' decisions without a word
        raise CorruptSegmentError(f"{path}: routing segment has rows without a choice count")
    choices = column.to_numpy()
    if choices.size and not (int(choices.min()) >= 1 and int(choices.max()) <= top_k):
        raise CorruptSegmentError(f"{path}: routing segment has choice counts outside 1..{top_k}")
    return int(choices.sum(dtype=np.int64))


def _full_rank(meta: pq.FileMetaData, top_k: int) -> bool:
    """Whether the footer says every row of a v2 routing segment uses all K choices (``choices`` min = max =
    K) and none has explicit ranks (every ``k`` list null). Missing statistics: False (the general view)."""
    leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    if "choices" not in leaves or "k.list.element" not in leaves:
        return False
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        choices, ranks = group.column(leaves["choices"]).statistics, group.column(leaves["k.list.element"])
        if choices is None or not choices.has_min_max or not int(choices.min) == int(choices.max) == top_k:
            return False
        stats = ranks.statistics
        if stats is None or not stats.has_null_count or stats.null_count != ranks.num_values or ranks.num_values != group.num_rows:
            return False
    return True


def _sum_counters(all_counters: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for counters in all_counters:
        for key, value in counters.items():
            if isinstance(value, dict):
                inner = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        inner[k] = inner.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def open_reader(path: str | os.PathLike[str]) -> TraceReader:
    try:
        return TraceReader(path)
    except TraceError:
        raise
    except PermissionError as exc:
        raise NotATraceError(f"{path}: permission denied") from exc
