"""Snapshots of the Overview, Layer and Tokens screens on the hand-made trace at a fixed size.

The trace is deterministic and the screens show no times, pids or paths, so the SVGs only change when the
rendering does. Update them with ``pytest tests/tui --snapshot-update`` after checking the new pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.layer import LayerScreen
from moeprobe.tui.screens.overview import OverviewScreen
from moeprobe.tui.screens.tokens import TokensScreen
from tests.tui.helpers import loaded, wait_for

SIZE = (100, 30)


def _opened(keys: tuple[str, ...], screen_type: type) -> Any:
    async def run_before(pilot: Any) -> None:
        await wait_for(pilot, lambda: loaded(pilot.app, OverviewScreen), what="overview")
        if keys:
            await pilot.press(*keys)
        await wait_for(pilot, lambda: loaded(pilot.app, screen_type), what=screen_type.__name__)
        await pilot.pause(0.05)

    return run_before


def test_overview_snapshot(known_trace: Path, snap_compare: Any) -> None:
    assert snap_compare(MoeprobeApp([known_trace]), terminal_size=SIZE, run_before=_opened((), OverviewScreen))


def test_layer_snapshot(known_trace: Path, snap_compare: Any) -> None:
    assert snap_compare(MoeprobeApp([known_trace]), terminal_size=SIZE, run_before=_opened(("2",), LayerScreen))


def test_tokens_snapshot(known_trace: Path, snap_compare: Any) -> None:
    keys = ("4",)
    assert snap_compare(MoeprobeApp([known_trace]), terminal_size=SIZE, run_before=_opened(keys, TokensScreen))
