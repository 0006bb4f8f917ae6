"""DuckDB draws a progress bar on stdout (when it is a terminal) for queries longer than progress_bar_time: on
moeprobe's connections it is off and never printed (even after `SET progress_bar_time`, which turns the bar on)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.support import layer_meta, routing_table, write_trace

QUERY = "SELECT count(*) FROM range(200000000) t(a) WHERE a % 7 = 3"
CHILD = """
import sys
import duckdb
import moeprobe
trace = moeprobe.open_trace(sys.argv[1])
con = trace.connection if sys.argv[2] == "analyses" else duckdb.connect()
con.execute("SET progress_bar_time = 0")  # draw at once, not after 2 s
print("result", con.sql(sys.argv[3]).fetchall()[0][0] > 0, flush=True)
"""


def _stdout_on_a_terminal(trace: Path, which: str, query: str) -> bytes:
    parent, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(trace), which, query], stdout=child, stderr=subprocess.PIPE, env=env)
    os.close(child)
    out = b""
    while True:  # until the child closes the terminal (bounded by the child's own end)
        try:
            chunk = os.read(parent, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    return out


def test_no_duckdb_progress_bar_on_stdout(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t", {"routing": routing_table(np.array([[0, 1]] * 4))}, layers=layer_meta(1, 8, 2))
    # the check can fail: a plain DuckDB connection does draw its bar on this terminal
    assert b"%" in _stdout_on_a_terminal(trace, "plain", QUERY)
    assert _stdout_on_a_terminal(trace, "analyses", QUERY).strip() == b"result True"


def test_console_connection_has_no_progress_bar(tmp_path: Path) -> None:
    import moeprobe

    trace = write_trace(tmp_path / "t", {"routing": routing_table(np.array([[0, 1]] * 4))}, layers=layer_meta(1, 8, 2))
    with moeprobe.open_trace(trace) as opened:
        setting = "SELECT current_setting('enable_progress_bar')"
        assert opened.console_connection.sql(setting).fetchall() == [(False,)]
        assert opened.connection.sql(setting).fetchall() == [(False,)]
