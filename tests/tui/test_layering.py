"""docs/architecture.md layering: the TUI imports Textual and the analysis layer, never torch or the capture hooks."""

from __future__ import annotations

import subprocess

from tests.conftest import PYTHON, run_cli_env


def test_tui_never_imports_torch() -> None:
    code = "import moeprobe.tui.app, moeprobe.cli.tui, sys; print(' '.join(sys.modules))"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=run_cli_env(), check=True)
    loaded = set(out.stdout.split())
    assert "textual" in loaded
    assert not {"torch", "transformers", "moeprobe.hooks"} & loaded
