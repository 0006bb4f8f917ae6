"""Reads a trace from an object store (``s3://bucket/prefix``): the same checks as on disk, over one listing.

One recursive LIST per ``refresh`` gives every object's name and size; manifests are fetched with a size limit,
segment footers are checked like local ones (schema, row counts) and read through the store's fsspec filesystem,
which DuckDB also reads through (``con.register_filesystem``: no httpfs extension to download). Only segments a
shard manifest counts are listed, as on disk, so a killed writer's last unacknowledged PUT is never read.
Local-only checks have no object-store meaning and are skipped: symbolic links, FIFOs and devices cannot exist
in a bucket, and a segment URL is always inside the trace's prefix by construction.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from . import layout
from .errors import CorruptManifestError, NotATraceError, TraceNotFoundError
from .manifest import MAX_MANIFEST_BYTES, read_shard_manifest, read_trace_manifest
from .reader import Segment, TraceReader, _committed
from .schema import TABLES
from .storage import ObjectStore, StoredObject, error_text, open_store

_SHARD_MANIFEST = re.compile(r"^rank=(\d+)/shard\.json$")
# NNNNNN.parquet, or NNNNNN-MMMMMM.parquet: a merged segment (compaction.py) in a trace copied from a disk.
_SEGMENT = re.compile(r"^rank=(\d+)/([a-z_]+)/\d{6,}(?:-\d{6,})?\.parquet$")


class RemoteTraceReader(TraceReader):
    """A validated view of one trace in an object store (all shards)."""

    path: Any  # the s3:// URL, a str

    def __init__(self, path: Any) -> None:
        self._store: ObjectStore = open_store(str(path))
        self.filesystem = self._store.fs
        self.path = self._store.url
        self._listing: list[StoredObject] = self._list()
        names = {obj.relative for obj in self._listing}
        if not self._listing:
            raise TraceNotFoundError(f"{self.path}: no such trace (nothing is stored under this prefix)")
        if layout.MANIFEST not in names:
            raise NotATraceError(f"{self.path}: not a moeprobe trace (objects without manifest.json)")
        self._header = read_trace_manifest(self._store.url_of(layout.MANIFEST), self._fetch_manifest(layout.MANIFEST))
        self._read_encoding(self._store.url_of(layout.MANIFEST))
        self.shards = {}
        self._segments = {}
        # shard.json by (name, ETag): a TUI polling a trace of many ranks re-fetches only the manifests that changed
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self.refresh(listing=self._listing)

    def _list(self) -> list[StoredObject]:
        try:
            return self._store.listing()
        except OSError as exc:
            raise NotATraceError(f"{self.path}: cannot be listed ({error_text(exc)})") from exc

    def _fetch_manifest(self, relative: str) -> bytes:
        try:
            return self._store.read_bytes(relative, MAX_MANIFEST_BYTES)
        except ValueError as exc:
            raise CorruptManifestError(
                f"{self._store.url_of(relative)}: {exc}, larger than a manifest can be ({MAX_MANIFEST_BYTES:,}); refusing to read it"
            ) from exc
        except OSError as exc:
            raise CorruptManifestError(f"{self._store.url_of(relative)}: cannot read ({error_text(exc)})") from exc

    def _shard_manifest(self, obj: StoredObject) -> dict[str, Any]:
        key = (obj.relative, obj.version)
        cached = self._manifests.get(key) if obj.version else None
        if cached is None:
            cached = read_shard_manifest(obj.url, self._fetch_manifest(obj.relative))
            self._manifests = {k: v for k, v in self._manifests.items() if k[0] != obj.relative}
            self._manifests[key] = cached
        return cached

    def refresh(self, listing: list[StoredObject] | None = None) -> None:
        """Re-list the prefix: shard manifests first, then the segments they count."""
        objects = listing if listing is not None else self._list()
        shards: dict[int, dict[str, Any]] = {}
        by_table: dict[tuple[int, str], dict[PurePosixPath, StoredObject]] = {}
        for obj in objects:
            if match := _SHARD_MANIFEST.match(obj.relative):
                shards[int(match.group(1))] = self._shard_manifest(obj)
            elif match := _SEGMENT.match(obj.relative):
                rank, table = int(match.group(1)), match.group(2)
                by_table.setdefault((rank, table), {})[PurePosixPath(obj.relative)] = obj
        self.shards = dict(sorted(shards.items()))
        previous: dict[Any, Segment] = {s.path: s for table in self._segments.values() for s in table}
        segments: dict[str, list[Segment]] = {name: [] for name in TABLES}
        for table in TABLES:
            for rank, shard in self.shards.items():
                # The listing rules of a disk trace, by name: flush order, a merged segment hides the flushes it
                # holds, and only the flushes shard.json counts.
                named = by_table.get((rank, table), {})
                for name in _committed(shard, table, layout.visible(list(named))):
                    obj = named[name]
                    known = previous.get(obj.url)
                    if known is None:
                        known = self._checked_segment(rank, table, obj.url, obj.size)
                    segments[table].append(known)
        self._segments = segments
