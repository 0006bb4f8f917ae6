"""The library logs; the CLI, and the recorder in a job that `moeprobe record` started, decide what reaches the
terminal (moeprobe.logs)."""

from __future__ import annotations

import logging

import pytest

from moeprobe.logs import show_library_messages


def test_cli_shows_library_messages_on_the_current_stderr_once(capsys: pytest.CaptureFixture[str]) -> None:
    show_library_messages()
    show_library_messages()  # idempotent: every CLI command calls it
    log = logging.getLogger("moeprobe.importers.sink")
    log.info("moeprobe: recording 2 layers")
    log.warning("moeprobe: trace writer error (OSError: 100% full); records are being dropped")  # no args: % as is
    log.debug("moeprobe: not shown")
    err = capsys.readouterr().err
    # the message alone, as the commands printed it before they logged
    assert err == (
        "moeprobe: recording 2 layers\n"
        "moeprobe: trace writer error (OSError: 100% full); records are being dropped\n"
    )


def test_library_code_does_not_print() -> None:
    """No print(..., file=sys.stderr) outside the CLI, capture included. The exceptions: the handler that shows
    the messages (logs.py), and the job's start-up file (hooks/bootstrap/sitecustomize.py), which runs where
    moeprobe may not be importable at all and says so."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "moeprobe"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.parts[len(root.parts)] != "cli"
        and path.relative_to(root).as_posix() not in ("logs.py", "hooks/bootstrap/sitecustomize.py")
        and re.search(r"file=sys\.stderr|sys\.stderr\.write", path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
