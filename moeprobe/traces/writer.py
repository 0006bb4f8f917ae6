"""Writes one shard of a trace: Parquet segments under temporary names, renamed when complete.

The writer is synchronous and thread-agnostic: the capture pipeline owns the background thread and calls
``append`` / ``flush`` / ``close`` from it. A failed write (full disk, permission lost) never raises out of
``flush``: the rows are counted as dropped with the reason, a warning is emitted once, and rows already on
disk stay readable.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .._version import __version__
from . import layout
from .compact import DEFAULT_WEIGHTS, RoutingEncoding
from .compaction import Compactor
from .errors import NotATraceError, TraceExistsError, TraceWriteError
from .locking import lock_shard
from .manifest import write_json_atomic
from .removal import remove_trace
from .schema import FORMAT_VERSION, MAGIC, TABLES
from .storage import is_remote


# Room held back for the final manifests (see ShardWriter._reserve_space): a manifest is a few KiB, with one
# entry per MoE layer; this covers both files many times over.
RESERVE_BYTES = 256 << 10


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def prepare_trace_dir(trace: Path | str, *, force: bool) -> None:
    """Make ``trace`` ready for a new recording, refusing to clobber anything that is not ours.

    ``force`` deletes an existing trace only if every file in it is one moeprobe writes and no writer is still
    writing it (see ``removal``); anything else is refused in one line with nothing deleted. An ``s3://`` URL
    is prepared in the object store (``remote_writer``).
    """
    if is_remote(trace):
        from .remote_writer import prepare_remote_trace

        prepare_remote_trace(str(trace), force=force)
        return
    trace = Path(trace)
    try:
        if trace.exists() and not trace.is_dir():
            raise TraceExistsError(f"{trace}: exists and is not a directory")
        if trace.is_dir() and any(trace.iterdir()):
            if not force:
                raise TraceExistsError(f"{trace}: already exists; pass --force (force=True) to overwrite it")
            if trace.is_symlink():
                raise NotATraceError(f"{trace}: refusing to overwrite through a symbolic link; give the directory itself")
            remove_trace(trace)
        trace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(trace, exc) from exc


def cannot_write(trace: Path, exc: OSError) -> TraceWriteError:
    """One line for an OSError met while creating a trace (read-only file system, a parent that is a file, ...)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(trace) else ""
    return TraceWriteError(f"{trace}: cannot create the trace here: {exc.strerror or exc}{where}")


def _decisions(batch: pa.RecordBatch) -> int:
    import pyarrow.compute as pc  # not at the top: a report imports this module and never needs it

    return int(pc.sum(batch.column("choices")).as_py() or 0)


def _write_options(table: str, schema: pa.Schema) -> dict[str, Any]:
    """Parquet settings per table, chosen by bench/trace_bytes.py on DeepSeek-V3-shaped data; every segment is
    encoded with them, on disk and in an object store alike.

    Routing (format v2): expert ids and weights are high-entropy bytes, so BYTE_STREAM_SPLIT (no hashing,
    and zstd then finds the predictable high bytes; fp16 values kept as FLOAT leave two constant low bytes)
    beat both plain and dictionary encoding; columns whose values repeat (step, phase, layer, choices, the
    u8 scale) take a dictionary; sequence and position run in order, so delta-encode.
    """
    options: dict[str, Any] = {
        "compression": "zstd",
        "compression_level": 1,
        "row_group_size": 1 << 20,
        "write_statistics": True,
    }
    if table == "routing" and "choices" in schema.names:
        choice_columns = [n for n in schema.names if n.split("_")[0] in ("expert", "weight") and n.split("_")[-1].isdigit()]
        options["use_dictionary"] = [
            n for n in ("step", "phase", "layer", "dropped", "choices", "weight_delta", "weight_offset", "weight_scale") if n in schema.names
        ]
        options["column_encoding"] = {
            **{n: "BYTE_STREAM_SPLIT" for n in choice_columns},
            "sequence": "DELTA_BINARY_PACKED",
            "position": "DELTA_BINARY_PACKED",
        }
        # choices: its min and max let a reader count a segment's decisions from the footer alone.
        # k: its null count tells a reader that no row has explicit ranks (reader._full_rank).
        options["write_statistics"] = ["step", "sequence", "layer", "choices", "k.list.element"]
    return options


class ShardWriter:
    """One process's shard of a trace directory (or, for an ``s3://`` URL, of a trace in an object store)."""

    # Whether this writer merges small segments (compaction.py); the object-store writer does not (see its module).
    compacts = True

    def __new__(cls, trace: Path | str, *args: Any, **kwargs: Any) -> ShardWriter:
        # The object-store writer differs only in where bytes go (see remote_writer); every caller that builds a
        # ShardWriter (capture, importers, replay) gets it for an s3:// URL without knowing about it.
        if cls is ShardWriter and is_remote(trace):
            from .remote_writer import RemoteShardWriter

            return super().__new__(RemoteShardWriter)
        return super().__new__(cls)

    def __init__(
        self,
        trace: Path | str,
        *,
        model: dict[str, Any],
        layers: list[dict[str, Any]],
        options: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        max_pending_rows: int = 2_000_000,
        on_warning: Callable[[str], None] | None = None,
        source: dict[str, Any] | None = None,
        compact: bool = True,
    ) -> None:
        self.trace = self._location(trace)
        self.rank = rank
        self.world_size = world_size
        self.max_pending_rows = max_pending_rows
        self._on_warning = on_warning
        self._warned: set[str] = set()
        self._pending: dict[str, list[pa.RecordBatch]] = defaultdict(list)
        self._pending_rows: dict[str, int] = defaultdict(int)
        # Routing is stored one row per token (format v2); drops and counters are in decisions.
        self._pending_decisions = 0
        self.routing_encoding = RoutingEncoding.for_layers(
            max((int(layer.get("num_experts", 0)) for layer in layers), default=0),
            max((int(layer.get("top_k", 1)) for layer in layers), default=1),
            str(options.get("weights", DEFAULT_WEIGHTS)),
        )
        self._stored_schemas = {**TABLES, "routing": self.routing_encoding.schema()}
        self._next_segment: dict[str, int] = defaultdict(int)
        # Small segments merged as the shard grows and at close (traces/compaction.py); False keeps every flush.
        self.compactor = (
            Compactor(self.trace, rank, self._stored_schemas, _write_options) if compact and self.compacts else None
        )
        self._counted_on_disk: dict[str, int] = {}  # segments per table in the last shard.json written
        self.closed = False
        self._manifest_lock = threading.RLock()
        self._finalized = False
        self.status = "running"
        self.error: str | None = None
        self.counters: dict[str, Any] = {
            "steps": 0,
            "tokens": 0,
            "decisions": 0,
            "rows": {name: 0 for name in TABLES},
            "segments": {name: 0 for name in TABLES},
            "bytes": 0,
            "dropped": {},  # reason -> routing decisions lost
            "anomalies": {},  # hook anomaly -> count
        }
        self._header = {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "moeprobe_version": __version__,
            "created_at": _utc_now(),
            "world_size": world_size,
            "model": model,
            "layers": layers,
            "options": options,
            "encoding": {"routing": self.routing_encoding.manifest_entry()},
        }
        if source is not None:  # where an imported trace came from (engine, version, files); see moeprobe.importers
            self._header["source"] = source
        self._shard = {
            "rank": rank,
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "ended_at": None,
            "heartbeat_at": time.time(),
            "counters": self.counters,
            "error": None,
        }
        self._lock_fd: int | None = None
        self._create_shard()
        self._reserve_space()
        self._write_manifests()

    def _location(self, trace: Path | str) -> Any:
        return Path(trace)

    def _create_shard(self) -> None:
        shard = layout.shard_dir(self.trace, self.rank)
        try:
            if shard.exists() or shard.is_symlink():
                raise TraceExistsError(f"{shard}: a shard for rank {self.rank} already exists")
            shard.mkdir(parents=True)
            # Held until close(): a second writer on this shard (another probe with force, a second run) is
            # refused in one line instead of mixing its rows into this trace.
            self._lock_fd = lock_shard(shard)
        except OSError as exc:
            raise cannot_write(self.trace, exc) from exc
        self._reserve = shard / layout.SPACE_RESERVE

    # -- counters kept by the capture side -------------------------------------------------------
    def count_dropped(self, reason: str, decisions: int) -> None:
        dropped = self.counters["dropped"]
        dropped[reason] = dropped.get(reason, 0) + int(decisions)

    def count_anomaly(self, kind: str, n: int = 1) -> None:
        anomalies = self.counters["anomalies"]
        anomalies[kind] = anomalies.get(kind, 0) + n

    # -- data ---------------------------------------------------------------------------------------
    def append(self, table: str, batch: pa.RecordBatch | pa.Table) -> None:
        if self.closed:
            raise RuntimeError("append() on a closed ShardWriter")
        schema = self._stored_schemas[table]
        if table == "routing" and not batch.schema.equals(schema):
            # Logical rows (one per decision, schema.ROUTING): stored in the compact per-token form.
            batch = self.routing_encoding.encode_logical(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)
        if isinstance(batch, pa.Table):
            batches = batch.cast(schema).to_batches()
        else:
            batches = [batch if batch.schema.equals(schema) else batch.cast(schema)]
        for b in batches:
            if b.num_rows:
                self._pending[table].append(b)
                self._pending_rows[table] += b.num_rows
                if table == "routing":
                    self._pending_decisions += _decisions(b)
        # Counted in logical rows (decisions for routing), whatever the stored layout.
        pending = self._pending_decisions if table == "routing" else self._pending_rows[table]
        if pending >= self.max_pending_rows:
            self._flush_table(table)

    def pending_rows(self) -> int:
        return sum(self._pending_rows.values())

    def flush(self) -> None:
        """Write every table's pending rows as one new segment each, then refresh the manifests."""
        for table in list(self._pending):
            self._flush_table(table)
        self._write_manifests()
        self._compact()

    def close(self, status: str = "complete", error: str | None = None) -> None:
        """Flush what is pending and write the final status. The status is the last thing written."""
        if self.closed:
            return
        for table in list(self._pending):
            self._flush_table(table)
        if self.compactor is not None:
            self.compactor.delete_expired()  # the rest stays, hidden: a reader may still be reading it
        with self._manifest_lock:
            if self._finalized:  # abandon() got there first: its status stands
                return
            self.status = status
            self.error = error
            self.closed = True
            try:
                self._write_manifests(final=True)
            finally:
                self.release_lock()

    def abandon(self, reason: str) -> None:
        """Mark the shard ``aborted`` with ``reason`` from another thread, when the thread that owns this writer is
        stuck (a sink that hangs): the trace must not stay ``running``. Nothing pending is written; the stuck
        thread's later writes cannot change the final status (it is written under the same lock)."""
        with self._manifest_lock:
            if self.closed:
                return
            self.status = "aborted"
            self.error = reason
            self.closed = True
        try:
            self._write_manifests(final=True)
        finally:
            self.release_lock()

    def release_lock(self) -> None:
        """Let another writer have this shard (the process exiting releases it too)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    # -- internals ----------------------------------------------------------------------------------
    def _flush_table(self, table: str) -> None:
        batches = self._pending.pop(table, [])
        rows = self._pending_rows.pop(table, 0)
        if not rows:
            return
        if table == "routing":
            rows, self._pending_decisions = self._pending_decisions, 0
        number = self._next_segment[table]
        data = pa.Table.from_batches(batches, schema=self._stored_schemas[table])
        try:
            written = self._write_segment(table, number, data)
        except OSError as exc:
            # EFBIG: a file-size limit (ulimit -f, quota) is a full disk as far as the trace is concerned.
            reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "write_error"
            if table == "routing":
                self.count_dropped(reason, rows)
            directory = self._table_location(table)
            self._warn_once(reason, f"moeprobe: cannot write {table} segment to {directory} ({exc.strerror or exc}); dropping records and counting them")
            return
        self._next_segment[table] = number + 1
        self.counters["rows"][table] += rows
        self.counters["segments"][table] += 1
        self.counters["bytes"] += written

    def _table_location(self, table: str) -> Any:
        """Where this shard's segments of ``table`` go, for messages."""
        return layout.table_dir(self.trace, self.rank, table)

    def _write_segment(self, table: str, number: int, data: pa.Table) -> int:
        """Write one complete segment under a temporary name and rename it; its size in bytes (0 if unknown)."""
        directory = layout.table_dir(self.trace, self.rank, table)
        tmp = directory / layout.temp_name(number)
        final = directory / layout.segment_name(number)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, tmp, **_write_options(table, data.schema))
            os.replace(tmp, final)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        try:
            return final.stat().st_size
        except OSError:
            return 0

    def _compact(self) -> None:
        """Merge small segments (see compaction.py). A merge that fails (a full disk) leaves the segments it
        would have merged as they are: nothing is lost, the trace only keeps more files."""
        if self.compactor is None:
            return
        try:
            # Only flushes that the shard.json on disk counts: readers show nothing beyond them.
            self.compactor.run(dict(self._counted_on_disk))
        except (OSError, pa.ArrowException) as exc:
            self._warn_once("compaction", f"moeprobe: cannot merge segments of {self.trace} ({exc}); keeping them as they are")

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if self._on_warning is not None:
            self._on_warning(message)

    def _reserve_space(self) -> None:
        """Hold back room for the final manifests, so that a disk that fills up and stays full still gets the
        trace's last word (status, counters, how many records were dropped) instead of a ``running`` manifest
        that hides the drops. Released at close, just before the final manifests are written."""
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            # Already full: nothing to hold back. The final write is still retried at close.
            self._release_space()

    def _release_space(self) -> None:
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass

    def _write_manifests(self, final: bool = False) -> None:
        # The writer thread and abandon() (on the closing thread) may both write; one at a time, and nothing
        # after the final status.
        with self._manifest_lock:
            if self._finalized:
                return
            self._finalized = final
            self._write_manifests_locked(final)

    def _write_manifests_locked(self, final: bool) -> None:
        now = time.time()
        self._shard["status"] = self.status
        self._shard["heartbeat_at"] = now
        self._shard["error"] = self.error
        if final:
            self._shard["ended_at"] = now
            # The reserve exists for this write; give its room back first (a failed write below is retried).
            self._release_space()
        attempts = 3 if final else 1
        for attempt in range(attempts):
            try:
                counted = dict(self.counters["segments"])
                self._write_manifest_files(final)
                self._counted_on_disk = counted
                return
            except OSError as exc:
                if attempt + 1 < attempts and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    continue  # the space released above, or freed meanwhile by somebody else
                self._warn_once("manifest", f"moeprobe: cannot update the manifest in {self.trace} ({exc.strerror or exc})")
                return

    def _write_manifest_files(self, final: bool) -> None:
        # shard.json first: it holds this shard's status and counters, the reader's source of truth.
        write_json_atomic(layout.shard_dir(self.trace, self.rank) / layout.SHARD_MANIFEST, self._shard)
        top = self.trace / layout.MANIFEST
        # Rank 0 owns the top-level manifest and mirrors its own status there, so a single-process
        # trace reads completely from manifest.json. Other ranks only create it if rank 0 has not yet.
        if self.rank == 0 or not top.exists():
            write_json_atomic(top, self._top_manifest(final))

    def _top_manifest(self, final: bool) -> dict[str, Any]:
        """manifest.json's content: the trace's header with this shard's status mirrored into it."""
        payload = dict(self._header)
        payload.update(
            {
                "status": self.status,
                "rank": self.rank,
                "ended_at": _utc_now() if final else None,
                "counters": self.counters,
                "error": self.error,
            }
        )
        return payload
