"""`import moeprobe` stays light: no Textual, no DuckDB, no torch until they are used."""

from __future__ import annotations

import subprocess

from tests.conftest import PYTHON, run_cli_env


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([PYTHON, "-c", code + "\nimport sys; print(' '.join(sys.modules))"], capture_output=True, text=True, env=run_cli_env(), check=True)
    return set(out.stdout.split())


def test_import_moeprobe_pulls_in_no_heavy_dependency() -> None:
    loaded = _modules_after("import moeprobe")
    assert not {"textual", "duckdb", "torch", "transformers"} & loaded


def test_reading_a_trace_needs_no_torch() -> None:
    loaded = _modules_after("import moeprobe, moeprobe.traces, moeprobe.analysis.session, moeprobe.cli.inspect")
    assert "torch" not in loaded and "textual" not in loaded


def test_capture_never_imports_textual() -> None:
    loaded = _modules_after("import moeprobe.hooks.probe, moeprobe.hooks.autoattach")
    assert "textual" not in loaded and "duckdb" not in loaded
