"""One trace as the TUI sees it: opened when it appears, refreshed by polling, read under a lock.

The watcher thread calls ``poll()``; query workers call ``read()``. Both go through one lock because a DuckDB
connection must not run two statements at once, and ``Trace.refresh()`` re-creates the views the queries use.
Nothing here imports Textual, so the bench and the tests can drive it directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..analysis.session import Trace, open_trace
from ..traces.errors import NotATraceError, TraceError, TraceNotFoundError
from ..traces.schema import TABLES
from ..traces.storage import location

T = TypeVar("T")

STATE_NOTES = {
    "running": "writer running",
    "complete": "complete",
    "aborted": "aborted: the writer closed it after an error",
    "stale": "writer vanished without closing the trace (killed?)",
}


@dataclass(frozen=True)
class RunInfo:
    """What the run header shows; read from the manifest only, so it costs no query."""

    name: str
    family: str
    layers: int
    experts: str  # "16", or "8-64" when layers differ
    top_k: str
    tokens: int
    decisions: int
    steps: int
    dropped: int
    status: str
    error: str | None = None

    @property
    def status_note(self) -> str:
        note = STATE_NOTES.get(self.status, self.status)
        return f"{note}: {self.error}" if self.error and self.status == "aborted" else note


@dataclass(frozen=True)
class Snapshot:
    """The state of one source after a poll. ``data`` counts segment changes: screens re-query only when it moves."""

    path: Path
    state: str  # "waiting", "open" or "error"
    message: str = ""
    run: RunInfo | None = None
    data: int = 0
    layers: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def run_info(trace: Trace) -> RunInfo:
    manifest = trace.manifest
    model = manifest.get("model", {})
    layers = manifest.get("layers", [])
    counters = manifest.get("counters", {})
    dropped = counters.get("dropped", {})
    return RunInfo(
        name=str(model.get("name") or "?"),
        family=str(model.get("family") or model.get("engine") or "?"),  # imported traces name their engine
        layers=len(layers),
        experts=_span([int(layer["num_experts"]) for layer in layers]),
        top_k=_span([int(layer["top_k"]) for layer in layers]),
        tokens=int(counters.get("tokens", 0)),
        decisions=int(counters.get("decisions", 0)),
        steps=int(counters.get("steps", 0)),
        dropped=int(sum(dropped.values())) if isinstance(dropped, dict) else 0,
        status=trace.status,
        error=next((s.get("error") for s in manifest.get("shards", []) if s.get("error")), None),
    )


def _is_empty_dir(path: Path) -> bool:
    try:
        return isinstance(path, Path) and path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


class TraceSource:
    """A trace path that may not exist yet, may be growing, and may turn out to be bad."""

    def __init__(self, path: str | Path) -> None:
        self.path: Any = location(path)  # a Path, or an s3:// URL (a str)
        self.trace: Trace | None = None
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._data = 0
        self.snapshot = Snapshot(self.path, "waiting", f"waiting for {self.path} to appear")

    def poll(self) -> Snapshot | None:
        """Open or refresh the trace; return the new snapshot when anything a screen shows has changed."""
        with self._lock:
            snapshot = self._poll_locked()
        if snapshot == self.snapshot:
            return None
        self.snapshot = snapshot
        return snapshot

    def _poll_locked(self) -> Snapshot:
        try:
            if self.trace is None:
                self.trace = open_trace(self.path)
                self._signature = None
            else:
                # reader.refresh() only lists files and reads new footers; the views and the cached per-filter
                # tables are rebuilt only when the segment list moved, so an idle trace costs nothing.
                self.trace.reader.refresh()
            # The segment list itself, not its length: compaction merges 16 segments into one, so after
            # 15 flushes and a merge a table has as many segments as before, with more rows. str(): a local Path
            # or an s3:// URL.
            signature = tuple(tuple(str(s.path) for s in self.trace.reader.segments(table)) for table in TABLES)
            if signature != self._signature:
                if self._signature is not None:
                    self.trace.refresh()
                self._signature = signature
                self._data += 1
            return Snapshot(
                self.path, "open", run=run_info(self.trace), data=self._data, layers=tuple(self.trace.layers)
            )
        except TraceNotFoundError:
            return Snapshot(self.path, "waiting", f"waiting for {self.path} to appear (no trace there yet)")
        except NotATraceError as exc:
            # The probe creates the directory a moment before the manifest: an empty directory is a trace
            # about to start, not a mistake.
            if self.trace is None and _is_empty_dir(self.path):
                return Snapshot(self.path, "waiting", f"waiting for the writer to start in {self.path}")
            return self._failed(exc)
        except TraceError as exc:
            return self._failed(exc)

    def _failed(self, exc: TraceError) -> Snapshot:
        previous = self.snapshot
        return Snapshot(self.path, "error", str(exc), run=previous.run, data=previous.data, layers=previous.layers)

    def read(self, query: Callable[[Trace], T]) -> T | None:
        """Run ``query`` on the open trace (None while there is none), never beside another query or a refresh."""
        with self._lock:
            if self.trace is None:
                return None
            return query(self.trace)

    def close(self) -> None:
        with self._lock:
            if self.trace is not None:
                self.trace.close()
                self.trace = None
