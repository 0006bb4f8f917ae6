"""`import moeprobe` stays light: no Textual, no DuckDB, no torch until they are used."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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


def test_import_moeprobe_reads_nothing_until_asked() -> None:
    """The errors come with the packages; pyarrow, numpy, the reader and the writer only when something uses them
    (``moeprobe --version`` took 0.15 s when they came with ``import moeprobe``)."""
    loaded = _modules_after(
        "import moeprobe, moeprobe.traces\nfrom moeprobe import TraceError, NotATraceError\n"
        "from moeprobe.traces import layout, TraceBusyError"
    )
    assert not {"numpy", "pyarrow", "moeprobe.traces.reader", "moeprobe.traces.writer"} & loaded


def test_lazy_trace_names_are_those_of_their_modules() -> None:
    import moeprobe.traces as traces
    from moeprobe.traces import reader, schema, writer

    modules = {"reader": reader, "schema": schema, "writer": writer}
    for name, module in traces._LAZY.items():
        assert getattr(traces, name) is getattr(modules[module], name)
    assert set(traces._LAZY) <= set(traces.__all__)
    for name in traces.__all__:
        getattr(traces, name)
    assert dir(traces) == sorted(traces.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = traces.nope  # type: ignore[attr-defined]


def _modules_after_report(trace: Path, *flags: str) -> set[str]:
    """Every module imported by ``moeprobe report TRACE FLAGS`` (in a fresh process, the page's bundle thread done)."""
    code = (
        "import contextlib, io, sys, threading\nfrom moeprobe.cli.main import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    code = main(['report', {str(trace)!r}, *{list(flags)!r}])\n"
        "assert code == 0, code\n"
        "for thread in threading.enumerate():\n"
        "    if thread is not threading.main_thread():\n"
        "        thread.join()"
    )
    return _modules_after(code)


# Modules no report needs: the capture side, the TUI, the simulator, the writer.
_NEVER_IN_A_REPORT = {"torch", "textual", "moeprobe.hooks", "moeprobe.tui", "moeprobe.simulate", "moeprobe.traces.writer"}


def test_report_imports_only_what_its_output_needs(good_trace: Path, tmp_path: Path) -> None:
    text = _modules_after_report(good_trace)
    assert not _NEVER_IN_A_REPORT & text
    assert not {"moeprobe.charts", "vl_convert"} & text
    assert "rich" not in text  # plain ASCII tables are measured without it

    as_json = _modules_after_report(good_trace, "--json")
    assert not _NEVER_IN_A_REPORT & as_json
    assert not {"moeprobe.charts", "vl_convert", "rich", "moeprobe.analysis.tables"} & as_json


def test_html_report_imports_nothing_a_report_never_needs(good_trace: Path, tmp_path: Path) -> None:
    pytest.importorskip("vl_convert")
    html = _modules_after_report(good_trace, "--html", str(tmp_path / "report.html"))
    assert not _NEVER_IN_A_REPORT & html
    assert "moeprobe.charts.page" in html  # the page was made, so the test above saw a whole report
