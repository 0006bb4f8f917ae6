"""A shard written straight into an object store (``s3://bucket/prefix``), with the guarantees of a disk shard.

Same layout, counters and manifests as ``ShardWriter`` (it is one; only where the bytes go differs):

* a segment is encoded in memory and PUT as one object: it appears whole or not at all (no rename needed);
* ``rank=R/shard.json`` is PUT after the segments it counts (the reader trusts only counted segments), and the
  final status is the last PUT;
* a job killed at any point leaves every counted segment readable, and its shard reads as ``stale``;
* no lock: one writer per ``rank=R/`` prefix by construction, and a writer refuses a prefix that already holds
  a shard (see ``storage`` for what is not detected).

No compaction (``compaction.py``): every flush stays one object. Merging in a store means a GET of every
merged-away object, a PUT of the merge and deletes after a grace period, from the writer's thread, per shard: a
lot of request traffic and latency inside the capture pipeline for what a disk does with local reads and a
rename. A long recording into a store keeps one object per table per flush (``flush_interval`` sets how many);
readers still apply the merged-name rules, so a compacted disk trace copied into a store reads the same.

The space reserve of the disk writer has no meaning here (a store does not fill up like a disk); a failed PUT is
counted like a failed disk write (``write_error``), never raised out of ``flush``.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .errors import NotATraceError, TraceBusyError, TraceError, TraceExistsError, TraceWriteError
from .manifest import manifest_bytes, read_shard_manifest
from .storage import ObjectStore, StoredObject, error_text, open_store
from .writer import ShardWriter, _write_options

# Names moeprobe writes into a trace prefix; ``force`` deletes nothing if anything else is there.
_OWNED = re.compile(r"^(manifest\.json|rank=\d+/(shard\.json|[a-z_]+/\d{6,}(-\d{6,})?\.parquet))$")


class RemoteShardWriter(ShardWriter):
    """One process's shard of a trace in an object store."""

    trace: Any  # the s3:// URL (a str): Path would collapse its double slash
    compacts = False  # see the module docstring: segments are kept as flushed

    def _location(self, trace: Any) -> str:
        self._store: ObjectStore = open_store(str(trace))
        self._top_manifest_seen = False
        return self._store.url

    def _create_shard(self) -> None:
        shard = f"rank={self.rank}"
        try:
            existing = self._store.listing(shard + "/")
        except OSError as exc:
            raise TraceWriteError(f"{self.trace}: cannot reach the object store ({error_text(exc)})") from exc
        if existing:
            raise TraceExistsError(f"{self.trace}/{shard}: a shard for rank {self.rank} already exists")

    def _table_location(self, table: str) -> str:
        return f"{self.trace}/rank={self.rank}/{table}"

    def _write_segment(self, table: str, number: int, data: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, **_write_options(table, data.schema))
        payload = sink.getvalue().to_pybytes()
        self._store.put_atomic(f"rank={self.rank}/{table}/{layout.segment_name(number)}", payload)
        return len(payload)

    def _reserve_space(self) -> None:
        pass

    def _release_space(self) -> None:
        pass

    def _write_manifest_files(self, final: bool) -> None:
        # shard.json first: it holds this shard's status and counters, the reader's source of truth.
        self._store.put_atomic(f"rank={self.rank}/{layout.SHARD_MANIFEST}", manifest_bytes(self._shard))
        # As on disk: rank 0 owns manifest.json; another rank writes it only while it does not exist yet (a HEAD
        # per write until it is seen; two ranks racing write the same header, the last PUT wins, both valid).
        if self.rank != 0 and not self._top_manifest_seen:
            self._top_manifest_seen = self._store.exists(layout.MANIFEST)
        if self.rank == 0 or not self._top_manifest_seen:
            self._store.put_atomic(layout.MANIFEST, manifest_bytes(self._top_manifest(final)))


def _refuse_foreign(url: str, objects: list[StoredObject]) -> None:
    for obj in objects:
        if not _OWNED.match(obj.relative):
            raise NotATraceError(
                f"{url}: refusing to overwrite, it is not a moeprobe trace ({obj.url} is not written by moeprobe); "
                "remove it yourself or record elsewhere"
            )


def _refuse_running(store: ObjectStore, objects: list[StoredObject]) -> None:
    from .reader import shard_state

    for obj in objects:
        if obj.relative.endswith("/" + layout.SHARD_MANIFEST):
            try:
                shard = read_shard_manifest(obj.url, store.read_bytes(obj.relative, 16 << 20))
            except (OSError, ValueError, TraceError):
                continue  # unreadable or damaged: no live writer we can see; its objects are ours by name
            if shard_state(shard) == "running":
                raise TraceBusyError(
                    f"{obj.url.rsplit('/', 1)[0]}: a writer is still writing this shard (its heartbeat is recent); "
                    "wait for it to finish, or record to another prefix"
                )


def _clear(url: str, relative: str, *, force: bool, what: str) -> None:
    store = open_store(url)
    try:
        objects = store.listing(relative)
        if not objects:
            return
        if not force:
            raise TraceExistsError(f"{url}: {what} already exists; pass --force (force=True) to overwrite it")
        _refuse_foreign(url, objects)
        _refuse_running(store, objects)
        store.delete([obj.relative for obj in objects])
    except OSError as exc:
        raise TraceWriteError(f"{url}: cannot use the object store here ({error_text(exc)})") from exc


def prepare_remote_trace(url: str, *, force: bool) -> None:
    """The object-store twin of ``prepare_trace_dir``: refuse a non-empty prefix unless ``force``; with it, delete
    only objects named like moeprobe's, and only when no shard's writer is alive (fresh heartbeat)."""
    _clear(url, "", force=force, what="a trace (or other objects)")


def prepare_remote_shard(url: str, rank: int, *, force: bool) -> None:
    """For one rank of a multi-process job: with ``force``, delete this rank's previous shard (same checks).
    Without it, the writer refuses an existing shard when it starts."""
    if force:
        _clear(url, f"rank={rank}/", force=True, what=f"a shard for rank {rank}")


def remove_remote(url: str, rank: int | None) -> None:
    """Delete what a writer created a moment ago and must abandon (the whole trace, or one rank's shard)."""
    store = open_store(url)
    relative = "" if rank is None else f"rank={rank}/"
    try:
        objects = store.listing(relative)
        _refuse_foreign(url, objects)
        store.delete([obj.relative for obj in objects])
    except (OSError, NotATraceError):
        pass  # best effort, like shutil.rmtree(ignore_errors=True) on disk


def remote_trace_exists(url: str) -> bool:
    """Whether ``url`` holds a trace manifest (what ``moeprobe record`` checks for each model the job recorded)."""
    try:
        return open_store(url).exists(layout.MANIFEST)
    except OSError:
        return False


def remote_has_objects(url: str) -> bool:
    try:
        return bool(open_store(url).listing())
    except OSError:
        return False


def mark_remote_abandoned(url: str, reason: str) -> list[int]:
    """The object-store twin of ``finalize.mark_abandoned``: every shard whose writer is gone becomes ``aborted``
    with ``reason`` (its data stays); the ranks changed."""
    import time

    from .manifest import MAX_MANIFEST_BYTES, read_trace_manifest
    from .reader import shard_state

    store = open_store(url)
    changed = []
    for obj in store.listing():
        match = re.match(r"^rank=(\d+)/shard\.json$", obj.relative)
        if not match:
            continue
        shard = read_shard_manifest(obj.url, store.read_bytes(obj.relative, MAX_MANIFEST_BYTES))
        if shard_state(shard) != "stale":
            continue
        shard.update({"status": "aborted", "error": reason, "ended_at": time.time()})
        store.put_atomic(obj.relative, manifest_bytes(shard))
        rank = int(match.group(1))
        changed.append(rank)
        if rank == 0:
            top = read_trace_manifest(store.url_of(layout.MANIFEST), store.read_bytes(layout.MANIFEST, MAX_MANIFEST_BYTES))
            top.update({"status": "aborted", "error": reason})
            store.put_atomic(layout.MANIFEST, manifest_bytes(top))
    return changed
