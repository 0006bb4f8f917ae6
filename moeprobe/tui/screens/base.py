"""What every trace screen shares: the run header and banner, and a fetch loop that never queues stale work.

A screen says what to query (``fetch``, run in a worker thread) and how to show it (``show``, on the UI thread).
When the trace changes while a fetch is running, the screen marks itself dirty and fetches once more when the
running one ends: a burst of new segments costs at most one extra query, never a queue of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from textual import work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from ...traces.errors import TraceError
from ..messages import Fetched, FetchFailed
from ..source import Snapshot, TraceSource
from ..widgets.header import Banner, RunHeader

if TYPE_CHECKING:
    from ..app import MoeprobeApp


@dataclass(frozen=True)
class Refinements:
    """Queries whose results replace each other on screen, cheapest first (see ``TraceScreen.fetch``)."""

    steps: tuple[Callable[[], Any], ...]


class TraceScreen(Screen[None]):
    # Sources this screen reads (indices into the app's sources); the header shows the first.
    SOURCES: tuple[int, ...] = (0,)
    # Whether new segments trigger a new fetch (the SQL console re-runs only when asked).
    LIVE = True

    def __init__(self) -> None:
        super().__init__()
        self._busy = False
        self._dirty = False
        self.shown_generation: tuple[int, ...] | None = None
        self._note = ""

    # -- to be provided by each screen ------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        """The screen's own widgets, between the header and the footer."""
        yield from ()

    def fetch(self) -> Any:
        """Query the trace (worker thread). Return None when there is no trace to query yet.

        A screen whose data has a cheap first pass returns ``Refinements([quick, full])`` (callables): each result
        is shown as it arrives, so the screen paints early and fills in.
        """
        return None

    def show(self, data: Any) -> None:
        """Put fetched data on screen (UI thread)."""

    # -- shared ---------------------------------------------------------------------------------------
    @property
    def moeprobe(self) -> MoeprobeApp:
        return cast("MoeprobeApp", self.app)

    @property
    def source(self) -> TraceSource:
        return self.moeprobe.sources[self.SOURCES[0]]

    def compose(self) -> ComposeResult:
        yield RunHeader(id="run")
        yield Banner(id="banner")
        yield from self.compose_body()
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.refresh_header()
        self.reload()

    def on_screen_resume(self) -> None:
        self.refresh_header()
        if self.LIVE and self.shown_generation != self.generation():
            self.reload()

    def view_key(self) -> tuple[int, ...]:
        """What else, besides the data, decides what ``fetch`` returns (a chosen layer, a sequence)."""
        return ()

    def generation(self) -> tuple[int, ...]:
        """The data generations of this screen's sources plus its view key: shown data is current when equal."""
        sources = self.moeprobe.sources
        return tuple(sources[i].snapshot.data if i < len(sources) else 0 for i in self.SOURCES) + self.view_key()

    def trace_changed(self, index: int, snapshot: Snapshot) -> None:
        """Called by the app for the active screen when a poll found something new."""
        if index not in self.SOURCES:
            return
        self.refresh_header()
        if self.LIVE and snapshot.state == "open" and self.shown_generation != self.generation():
            self.reload()

    def refresh_header(self) -> None:
        snapshot = self.source.snapshot
        self.query_one("#run", RunHeader).show(snapshot)
        self.query_one("#banner", Banner).show(snapshot, self._note)

    def set_note(self, note: str) -> None:
        """A message for the banner line (a failed query), kept until the next successful fetch."""
        self._note = note
        self.refresh_header()

    def reload(self) -> None:
        """Fetch again, or, when a fetch is running, once more after it: stale requests replace each other."""
        if self._busy:
            self._dirty = True
            return
        self._busy = True
        self._dirty = False
        self._fetch_worker(self.generation())

    @work(thread=True, group="fetch", exit_on_error=False)
    def _fetch_worker(self, generation: tuple[int, ...]) -> None:
        try:
            data = self.fetch()
            if isinstance(data, Refinements):
                for step in data.steps[:-1]:
                    self.post_message(Fetched(generation, step(), final=False))
                data = data.steps[-1]()
        except TraceError as exc:
            self.post_message(FetchFailed(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a bug in one query must not take the live view down
            self.post_message(FetchFailed(f"internal error: {type(exc).__name__}: {exc}"))
            return
        self.post_message(Fetched(generation, data))

    def on_fetched(self, message: Fetched) -> None:
        message.stop()
        if not message.final:
            if message.data is not None:
                self.show(message.data)
            return
        self._busy = False
        if message.data is not None:
            self.shown_generation = message.generation
            if self._note:
                self._note = ""
                self.refresh_header()
            self.show(message.data)
        if self._dirty:
            self.reload()

    def on_fetch_failed(self, message: FetchFailed) -> None:
        message.stop()
        self._busy = False
        self.set_note(f"✗ {message.message}")
        if self._dirty:
            self.reload()
