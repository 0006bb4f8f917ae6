"""A progress line on stderr for commands that may take a while (``report``), only on a terminal.

Drawn from a thread after ``DELAY_S`` (a quick command shows nothing), redrawn every ``INTERVAL_S``, erased when
the work ends: what is being done, the seconds so far and, while DuckDB runs a query, that query's share done
(``DuckDBPyConnection.query_progress``). Never on stdout, never when stderr is a pipe or a file, so that
``report --json > out.json`` and scripts reading stderr see nothing of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO

DELAY_S = 1.0
INTERVAL_S = 0.2
WIDTH = 20


class Progress:
    """``with Progress(stream, "report traces/run1") as progress: ...``; ``progress.watch(fraction)`` gives the
    bar its fill (a callable returning 0..1, or a negative number when unknown)."""

    def __init__(self, stream: IO[str], label: str, *, delay_s: float = DELAY_S) -> None:
        self.stream = stream
        self.label = label
        self.delay_s = delay_s
        self._fraction: Callable[[], float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0
        self._started = 0.0

    @property
    def enabled(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def watch(self, fraction: Callable[[], float]) -> None:
        self._fraction = fraction

    def __enter__(self) -> Progress:
        if self.enabled:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="moeprobe-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._drawn:
            self._write("\r" + " " * self._drawn + "\r")

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        fraction = -1.0
        if self._fraction is not None:
            try:
                fraction = float(self._fraction())
            except Exception:  # noqa: BLE001 - a progress probe must never break the command
                fraction = -1.0
        if 0 <= fraction <= 1:
            filled = round(fraction * WIDTH)
            bar = f" [{'#' * filled}{'.' * (WIDTH - filled)}] query {fraction * 100:3.0f}%"
        else:
            bar = ""
        return f"moeprobe: {self.label}: {elapsed:5.1f} s{bar}"

    def _run(self) -> None:
        if self._stop.wait(self.delay_s):
            return
        while not self._stop.is_set():
            text = self.line()
            self._write("\r" + text.ljust(self._drawn))
            self._drawn = max(self._drawn, len(text))
            self._stop.wait(INTERVAL_S)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal: nothing to show it on
            self._stop.set()
