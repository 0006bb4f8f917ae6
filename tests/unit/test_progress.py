"""The report's progress line: on stderr only when it is a terminal, erased when done, never on stdout."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from moeprobe.cli.progress import Progress
from tests.support import layer_meta, routing_table, write_trace


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what Progress asks), and tells when something was drawn."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self.drawn = threading.Event()

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        n = super().write(text)
        if "%" in text:
            self.drawn.set()
        return n


def test_a_line_with_the_query_share_is_drawn_then_erased_on_a_terminal() -> None:
    stream = Terminal()
    with Progress(stream, "report t", delay_s=0) as progress:
        progress.watch(lambda: 0.5)
        assert stream.drawn.wait(10)
    text = stream.getvalue()
    assert text.startswith("\rmoeprobe: report t:") and "[##########..........] query  50%" in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[-2].strip() == ""  # the last thing drawn blanks the line


def test_nothing_is_drawn_when_stderr_is_not_a_terminal() -> None:
    stream = Terminal(tty=False)
    with Progress(stream, "report t", delay_s=0) as progress:
        progress.watch(lambda: 0.5)
        assert not stream.drawn.wait(0.5)
    assert stream.getvalue() == ""


def test_report_json_on_stdout_stays_clean_with_stderr_on_a_terminal(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t", {"routing": routing_table(np.array([[0, 1], [2, 3]] * 8))}, layers=layer_meta(1, 8, 2))
    parent, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "moeprobe", "report", str(trace), "--json"], stdout=subprocess.PIPE,
                            stderr=child, env=env)
    os.close(child)
    out, _ = proc.communicate(timeout=120)
    os.close(parent)
    assert proc.returncode == 0
    assert json.loads(out)["overall"]["decisions"] == 32
