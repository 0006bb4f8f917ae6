"""Live behaviour: segments written while the app runs appear; status changes; missing and bad traces."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeprobe.cli.main import main as cli_main
from moeprobe.tui.app import MoeprobeApp
from moeprobe.tui.screens.overview import OverviewScreen
from moeprobe.tui.screens.tokens import TokensScreen
from moeprobe.tui.widgets.tokentext import TokenText
from tests.tui.helpers import (
    LAYER0,
    LAYER1,
    TEXT,
    append_sequence,
    loaded,
    open_screen,
    sequence_tables,
    text_of,
    wait_for,
    write_known,
)

SIZE = (120, 36)


def _more(sequence: int, text: bytes, first_step: int) -> dict:
    n = len(text)
    return sequence_tables(text, LAYER0[:n], LAYER1[:n], [first_step + i for i in range(n)], sequence)


async def test_new_segments_appear_while_the_app_runs(tmp_path: Path) -> None:
    path = tmp_path / "live"
    writer = write_known(path, close=False)  # still running: this process is the writer
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "4", TokensScreen)
        assert "running" in text_of(screen.query_one("#run"))
        text = screen.query_one(TokenText)
        assert "".join(c.text for c in text.cells) == "hello wo"

        append_sequence(writer, _more(1, b"abc", 3))
        written = time.monotonic()
        await wait_for(pilot, lambda: "".join(c.text for c in text.cells) == "abc", what="the new sequence")
        print(f"new tokens on screen {time.monotonic() - written:.2f} s after the segment was written")
        assert screen.follow and text.cursor == 2  # follow mode: the newest sequence, cursor on its last token
        # the run header refreshes from its own query, independently of the token text
        await wait_for(pilot, lambda: "11 tokens" in text_of(screen.query_one("#run")), what="header update")
        assert "sequence 2/2" in text_of(screen.query_one("#seq-title"))

        # scrolling back pauses follow: a newer sequence does not replace the one being read
        await pilot.press("home")
        assert not screen.follow
        append_sequence(writer, _more(2, b"xyz", 6))
        await wait_for(pilot, lambda: "14 tokens" in text_of(screen.query_one("#run")), what="header update")
        await wait_for(pilot, lambda: loaded(app, TokensScreen) and "sequence 2/3" in text_of(screen.query_one("#seq-title")),
                       what="sequence list update")
        assert "".join(c.text for c in text.cells) == "abc"
        await pilot.press("f")  # resume
        await wait_for(pilot, lambda: "".join(c.text for c in text.cells) == "xyz", what="follow resumed")

        writer.close()
        await wait_for(pilot, lambda: "complete" in text_of(screen.query_one("#run")), what="complete status")


async def test_overview_counts_follow_new_segments(tmp_path: Path) -> None:
    path = tmp_path / "live"
    writer = write_known(path, close=False)
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        assert app.screen.data.layers[0].tokens == 8
        append_sequence(writer, _more(1, TEXT, 3))
        await wait_for(pilot, lambda: app.screen.data.layers[0].tokens == 16, what="overview after new segment")
        writer.close()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


async def test_a_vanished_writer_reads_as_stale(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    write_known(path, close=False)
    shard = path / "rank=0" / "shard.json"
    payload = json.loads(shard.read_text())
    payload["pid"] = _dead_pid()
    shard.write_text(json.dumps(payload))
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        assert "stale" in text_of(app.screen.query_one("#run"))
        assert "writer vanished" in text_of(app.screen.query_one("#banner"))


async def test_a_missing_trace_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "later"
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "waiting for" in text_of(app.screen.query_one("#banner")), what="waiting")
        write_known(path)
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview once it appears")
        assert not app.screen.query_one("#banner").display


def _future(tmp_path: Path) -> Path:
    path = tmp_path / "future"
    write_known(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt"
    write_known(path)
    segment = path / "rank=0" / "routing" / "000000.parquet"
    segment.write_bytes(segment.read_bytes()[:100])
    return path


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a trace")
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [(_file, "it is a file"), (_future, "format version 99"), (_corrupt, "corrupt or truncated")],
)
async def test_bad_input_is_a_message_not_a_traceback(tmp_path: Path, make, words: str) -> None:
    path = make(tmp_path)
    app = MoeprobeApp([path])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: words in text_of(app.screen.query_one("#banner")), what=words)
        await pilot.press("2", "3", "4")  # other screens say the same and do not crash
        await pilot.pause(0.1)
        assert words in text_of(app.screen.query_one("#banner"))


@pytest.mark.parametrize(("make", "words"), [(_file, "it is a file"), (_future, "format version 99")])
def test_cli_refuses_a_plain_bad_path_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str], make,
                                                      words: str) -> None:
    path = make(tmp_path)
    assert cli_main(["tui", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeprobe tui: ") and words in err


def test_cli_lets_a_missing_or_empty_path_be_waited_for(tmp_path: Path) -> None:
    from moeprobe.cli.tui import check_path

    check_path(tmp_path / "not-yet")
    (tmp_path / "empty").mkdir()
    check_path(tmp_path / "empty")
