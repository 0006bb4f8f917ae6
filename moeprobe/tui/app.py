"""The Textual app: screens as modes, one key each, and a watcher thread that polls the traces.

The app owns only what screens share: the trace sources, the watcher, the chosen layer, and switching screens.
Queries and drawing live in the screens, widgets and ``queries`` modules.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import get_current_worker

from .messages import TraceUpdated
from .screens.base import TraceScreen
from .screens.compare import CompareScreen
from .screens.layer import LayerScreen
from .screens.overview import OverviewScreen
from .screens.specialization import SpecializationScreen
from .screens.sql import SqlScreen
from .screens.tokens import TokensScreen
from .source import TraceSource

# New segments must be on screen within a second; polling a directory listing this often costs next to nothing.
POLL_INTERVAL_S = 0.3


class MoeprobeApp(App[None]):
    TITLE = "moeprobe"
    # Every action has a key in the footer; the palette would only take footer room at 80 columns.
    ENABLE_COMMAND_PALETTE = False
    MODES = {
        "overview": OverviewScreen,
        "layer": LayerScreen,
        "specialization": SpecializationScreen,
        "tokens": TokensScreen,
        "sql": SqlScreen,
        "compare": CompareScreen,
    }
    DEFAULT_MODE = "overview"
    # The screen keys are listed by `?` rather than in the footer: at 80 columns the footer has room for a
    # screen's own keys, `?` and `q`, not for six screen names as well.
    BINDINGS = [
        Binding("1", "switch_mode('overview')", "Overview screen", show=False),
        Binding("2", "switch_mode('layer')", "Layer screen", show=False),
        Binding("3", "switch_mode('specialization')", "Specialization screen", show=False),
        Binding("4", "switch_mode('tokens')", "Tokens screen", show=False),
        Binding("5", "switch_mode('sql')", "SQL screen", show=False),
        Binding("6", "compare", "Compare screen (needs a second trace)", show=False),
        Binding("question_mark", "help", "Help, screens 1-6", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, paths: Sequence[str | Path], *, poll_interval: float = POLL_INTERVAL_S) -> None:
        if not paths:
            raise ValueError("MoeprobeApp needs at least one trace path")
        super().__init__()
        self.sources = [TraceSource(p) for p in paths[:2]]
        self.poll_interval = poll_interval
        self.layer_index: int | None = None
        self._stop = threading.Event()

    # -- watching -------------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.poll_traces()

    @work(thread=True, exclusive=True, group="watch", exit_on_error=False)
    def poll_traces(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled and not self._stop.is_set():
            for index, source in enumerate(self.sources):
                snapshot = source.poll()
                if snapshot is not None:
                    self.post_message(TraceUpdated(index, snapshot))
            self._stop.wait(self.poll_interval)

    def on_trace_updated(self, message: TraceUpdated) -> None:
        # Only the screen in view re-queries now; the others catch up when they are shown again.
        screen = self.screen
        if isinstance(screen, TraceScreen):
            screen.trace_changed(message.index, message.snapshot)

    def on_unmount(self) -> None:
        self._stop.set()
        for source in self.sources:
            source.close()

    # -- shared state ---------------------------------------------------------------------------------
    def layer_indices(self) -> list[int]:
        return sorted(int(m["index"]) for m in self.sources[0].snapshot.layers)

    def current_layer(self) -> int | None:
        layers = self.layer_indices()
        if not layers:
            return None
        if self.layer_index not in layers:
            self.layer_index = layers[0]
        return self.layer_index

    def step_layer(self, delta: int) -> int | None:
        layers = self.layer_indices()
        current = self.current_layer()
        if current is None:
            return None
        self.layer_index = layers[(layers.index(current) + delta) % len(layers)]
        return self.layer_index

    def open_layer(self, index: int) -> None:
        self.layer_index = index
        self.switch_mode("layer")

    def action_compare(self) -> None:
        # Without a second trace the key says how to get one, rather than doing nothing.
        if len(self.sources) < 2:
            self.notify(
                f"Compare needs a second trace: quit (q) and run  moeprobe tui {self.sources[0].path} OTHER_TRACE",
                title="Compare", severity="warning", timeout=8,
            )
            return
        self.switch_mode("compare")

    def action_help(self) -> None:
        from .screens.help import HelpScreen, key_rows

        if isinstance(self.screen, HelpScreen):
            return
        name = type(self.screen).__name__.removesuffix("Screen")
        self.push_screen(HelpScreen(name, key_rows(self.BINDINGS, self.screen, self.get_key_display)))
