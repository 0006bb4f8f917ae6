"""Messages between the watcher, the query workers and the screens. Named in the past tense: they report facts.

Tests post these directly to drive the UI without a filesystem or a thread.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

from .source import Snapshot


class TraceUpdated(Message):
    """A poll found something new in source ``index``: segments, status, an error, or the trace appearing."""

    def __init__(self, index: int, snapshot: Snapshot) -> None:
        super().__init__()
        self.index = index
        self.snapshot = snapshot


class Fetched(Message):
    """A screen's query worker finished; ``data`` is what its ``fetch()`` returned for the data generations ``generation`` of its sources."""

    def __init__(self, generation: tuple[int, ...], data: Any, *, final: bool = True) -> None:
        super().__init__()
        self.generation = generation
        self.data = data
        self.final = final  # False for a quick first pass that a fuller result will replace


class FetchFailed(Message):
    """A screen's query raised a ``TraceError``; ``message`` is its one line."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
