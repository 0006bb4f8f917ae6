"""``moeprobe tui``: a live Textual browser for traces. Imports Textual and ``moeprobe.analysis``, never torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import MoeprobeApp


def make_app(*paths: str | Path) -> MoeprobeApp:
    from .app import MoeprobeApp

    return MoeprobeApp(list(paths))


__all__ = ["make_app"]
