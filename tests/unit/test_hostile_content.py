"""Trace files are data, never code, and whatever they hold is shown as text.

- no module of moeprobe imports pickle or marshal, or calls eval/exec/torch.load on anything;
- the TUI's SQL console is read-only: writes, ATTACH, COPY, INSTALL, LOAD and settings are refused by the guard,
  and the connection itself cannot reach files outside the trace or load extensions;
- tag values, model and layer names and paths with quotes, markup, newlines and control characters are stored
  exactly, and report (text, Markdown, JSON), inspect and the TUI show them without interpreting them.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.traces.errors import QueryError
from moeprobe.cli.main import main as cli_main
from moeprobe.traces.schema import TABLES
from moeprobe.tui.queries.sql import ReadOnlyError, check_read_only, run_sql
from tests.support import layer_meta, routing_table, write_trace

PACKAGE = Path(moeprobe.__file__).parent
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "__import__"}
UNSAFE_ATTRIBUTES = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}

# Quotes, Rich/Textual markup, an OSC title change, an SGR colour, a screen clear, newline, tab, CR, NUL, DEL,
# a right-to-left override and a line separator (not control codes, but they reorder or break the line shown).
HOSTILE = ("it's \"q\" [/] [bold]b[/bold] \x1b]0;pwned\x07 \x1b[31mred\x1b[0m \x1b[2J\nnew\tline\r\x00nul\x7f"
           " \u202eevil\u2028next")
# What a trace may put in a layer's name or scoring: an OSC 0 window title, an OSC 52 clipboard write, a clear.
TERMINAL_ATTACK = "\x1b]0;owned\x07\x1b]52;c;ZWNobyBoaQ==\x07\x1b[2J\x1b[H"


def _calls_and_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module or "")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(func.id)
            elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and (func.value.id, func.attr) in UNSAFE_ATTRIBUTES and not _weights_only(node)):
                found.append(f"{func.value.id}.{func.attr}")
    return found


def _weights_only(call: ast.Call) -> bool:
    """``torch.load(..., weights_only=True)`` (a literal True): torch's restricted unpickler, which refuses any
    object that is not a tensor or a plain container. The SGLang importer needs it for the engine's .pt dumps."""
    func = call.func
    return (
        isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (func.value.id, func.attr) == ("torch", "load")
        and any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)
    )


def test_no_module_unpickles_or_evaluates_anything() -> None:
    offenders = {}
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50
    for module in modules:
        found = _calls_and_imports(ast.parse(module.read_text(), filename=str(module)))
        if found:
            offenders[str(module.relative_to(PACKAGE))] = found
    assert offenders == {}


def test_the_scan_would_see_them() -> None:
    code = "import pickle\nfrom marshal import loads\neval('1')\ntorch.load(f)\nnp.load(f, allow_pickle=True)"
    assert _calls_and_imports(ast.parse(code)) == ["pickle", "marshal", "eval", "torch.load", "np.load"]
    # only a literal weights_only=True passes
    code = "torch.load(f, weights_only=True)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=flag)"
    assert _calls_and_imports(ast.parse(code)) == ["torch.load", "torch.load"]


# -- the SQL console -------------------------------------------------------------------------------------
# Statements that are not one SELECT: DuckDB's parser names their type and the console refuses them unrun.
REFUSED = [
    "INSERT INTO routing VALUES (1)", "UPDATE routing SET expert = 0", "DELETE FROM routing", "DROP VIEW routing",
    "CREATE TABLE x AS SELECT 1", "ALTER VIEW routing RENAME TO r", "TRUNCATE routing",
    "ATTACH '/tmp/other.db' AS other", "attach 'x.db'", "DETACH other", "USE other",
    "COPY routing TO '/tmp/out.csv'", "COPY (SELECT 1) TO 'x.parquet' (FORMAT parquet)", "EXPORT DATABASE '/tmp/x'",
    "INSTALL httpfs", "LOAD httpfs", "INSTALL 'x' FROM 'http://evil'", "SET threads = 1", "RESET threads",
    "PRAGMA enable_profiling", "CALL pragma_version()", "CHECKPOINT", "VACUUM",
    "SELECT 1; DELETE FROM routing", "SELECT 1 /* a comment */; DROP VIEW routing", "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
    # The lexical guard this replaces let these two through: '--' inside a literal, and an E'' escape.
    "SELECT '--'; DROP VIEW routing", "SELECT E'\\''; DROP VIEW routing -- '",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "CREATE OR REPLACE VIEW routing AS SELECT 42",
]


@pytest.mark.parametrize("query", REFUSED)
def test_console_guard_refuses(query: str) -> None:
    with pytest.raises(ReadOnlyError):
        check_read_only(query)


@pytest.mark.parametrize("query", ["SELECT 'DROP TABLE routing; ATTACH' AS text", "-- DROP\nSELECT 1",
                                   "select count(*) from routing", "DESCRIBE routing", "SUMMARIZE routing",
                                   "FROM routing LIMIT 1", "SHOW TABLES", "SELECT '--' AS dashes;"])
def test_console_guard_allows_reads_and_words_inside_literals(query: str) -> None:
    check_read_only(query)


def _hostile_trace(tmp_path: Path) -> Path:
    # The path itself carries quotes, markup, an escape sequence and a newline.
    path = tmp_path / "run 'q\" [b]x[/b] \x1b]0;t\x07\nline"
    layers = layer_meta(2, 4, 2)
    layers[0]["name"] = "model.[/]layers\x1b[2J.0" + TERMINAL_ATTACK
    layers[0]["scoring"] = "softmax" + TERMINAL_ATTACK + "\u202e"
    write_trace(
        path,
        {
            "routing": routing_table(np.array([[0, 1], [2, 3], [1, 2], [0, 3]]), token_id=np.array([5, 6, 7, 8])),
            "tags": pa.table({"sequence": [0], "key": [HOSTILE], "value": [HOSTILE]}, schema=TABLES["tags"]),
        },
        layers=layers,
        model={"name": HOSTILE, "family": "test"},
    )
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(directory.rglob("*"))}


def test_console_cannot_write_read_other_files_or_forge_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What matters is checked, not error strings: nothing is written (in the trace, in the working directory where
    # DuckDB keeps its ./.tmp), no other file's content comes back, and the views every screen reads are unchanged.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    path = _hostile_trace(tmp_path)
    trace = moeprobe.open_trace(path)
    before = _snapshot(path)
    segment = next(iter(sorted(path.rglob("*.parquet"))))
    manifest = path / "manifest.json"
    attacks = [
        f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM '{secret}'",
        f"DESCRIBE '{secret}'", f"SUMMARIZE '{secret}'", f"SELECT * FROM ('{secret}')", f"SELECT * FROM routing, ('{secret}')",
        f"SELECT * FROM read_text('{manifest}')", f"SELECT * FROM glob('{tmp_path}/*')", "SELECT * FROM glob('/*')",
        "SELECT getenv('HOME')", "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY (SELECT 1) TO '{manifest}'", f"COPY (SELECT 42 AS x) TO '{segment}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY routing TO '{path}/rank=0/routing/999999.parquet' (FORMAT parquet)", f"ATTACH '{path}/x.db' AS x",
        "CREATE OR REPLACE VIEW routing AS SELECT 42", "SELECT '--'; DROP VIEW routing",
        "SELECT * FROM query('CREATE OR REPLACE VIEW routing AS SELECT 42')",
        "SET enable_external_access = true", "SET temp_directory = '.tmp'",
        # Big enough to spill if spilling were possible: it must not create ./.tmp.
        "SELECT i FROM range(3000000) t(i) ORDER BY i DESC LIMIT 1",
    ]
    leaked = []
    for query in attacks:
        try:
            result = run_sql(trace, query)
        except (ReadOnlyError, QueryError):
            continue
        if "hunter2" in repr(result.rows) or "moeprobe" in repr(result.rows) or "root:" in repr(result.rows):
            leaked.append(query)
        if "/" in repr(result.rows) and "glob" in query:
            leaked.append(query)
    assert leaked == []
    assert _snapshot(path) == before
    assert list(work.iterdir()) == []
    # Both the console and the analyses still see the trace's own data: 8 decisions, no forged view.
    assert run_sql(trace, "select count(*) from routing").rows == (("8",),)
    assert trace.sql("select count(*) from routing").column(0).to_pylist() == [8]
    assert trace.summary()["overall"]["decisions"] == 8
    with pytest.raises(duckdb.Error, match="locked"):
        trace.console_connection.execute("SET enable_external_access = true")  # locked, even from Python
    trace.close()


def test_console_after_refresh_reads_new_segments_and_analyses_stay_unrestricted(tmp_path: Path) -> None:
    path = _hostile_trace(tmp_path)
    trace = moeprobe.open_trace(path)
    assert run_sql(trace, "select count(*) from routing").rows == (("8",),)
    # The analyses' connection was never locked: it still reads files of its own choosing.
    other = tmp_path / "other.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2, 3]}), other)
    assert trace.sql(f"select count(*) from '{other}'").column(0).to_pylist() == [3]
    # A segment written since the console's connection was made, as a live writer adds one (and counts it in
    # shard.json): the refreshed console reads it, though the old connection's allowed_paths did not list it.
    encoding = trace.reader.routing_encoding  # stored as the trace's writer stores routing (format 2)
    assert encoding is not None
    pq.write_table(encoding.encode_logical(routing_table(np.array([[0, 1]]))), path / "rank=0" / "routing" / "000001.parquet")
    shard = path / "rank=0" / "shard.json"
    data = json.loads(shard.read_text())
    data["counters"]["segments"]["routing"] += 1
    shard.write_text(json.dumps(data))
    trace.refresh()
    assert run_sql(trace, "select count(*) from routing").rows == (("10",),)
    trace.close()


# -- hostile strings ------------------------------------------------------------------------------------
def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def _controls(text: str) -> list[str]:
    reorder = {0x202E, 0x2028, 0x2029, 0x200F, 0x2066, 0x2067, 0x2068, 0x2069}
    return sorted({hex(ord(c)) for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 or ord(c) in reorder})


def test_hostile_values_are_stored_exactly(tmp_path: Path) -> None:
    trace = moeprobe.open_trace(_hostile_trace(tmp_path))
    assert trace.tags().column("value").to_pylist() == [HOSTILE]
    assert trace.sql("select key from tags").column(0).to_pylist() == [HOSTILE]
    assert trace.manifest["model"]["name"] == HOSTILE


@pytest.mark.parametrize("argv", [["inspect"], ["report"], ["report", "--markdown"], ["simulate"]])
def test_text_outputs_show_hostile_values_escaped(tmp_path: Path, argv: list[str]) -> None:
    path = _hostile_trace(tmp_path)
    rc, out, err = _run([argv[0], str(path), *argv[1:]])
    assert rc == 0, err
    assert _controls(out + err) == []
    if argv[0] != "simulate":
        # Shown as written, escapes visible: the markup is not interpreted and the ESC is not sent.
        assert "[/] [bold]b[/bold] \\x1b]0;pwned\\x07 \\x1b[31mred" in out


@pytest.mark.parametrize("command", ["inspect", "report"])
def test_json_outputs_keep_hostile_values_exact(tmp_path: Path, command: str) -> None:
    path = _hostile_trace(tmp_path)
    rc, out, err = _run([command, str(path), "--json"])
    assert rc == 0, err
    assert _controls(out) == []  # JSON escapes control characters itself
    data = json.loads(out)
    name = data["manifest"]["model"]["name"] if command == "inspect" else data["trace"]["model"]["name"]
    assert name == HOSTILE


def test_error_messages_quote_hostile_paths_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad \x1b[2J [/] \nname"
    path.mkdir(parents=True)  # "[/]" makes it two levels
    (path / "manifest.json").write_text("{not json")
    rc, out, err = _run(["report", str(path)])
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and _controls(err) == [] and "\\x1b[2J [/] \\nname" in err


def test_tui_shows_hostile_values_as_text(tmp_path: Path) -> None:
    asyncio.run(_tui_shows_hostile_values(tmp_path))


async def _tui_shows_hostile_values(tmp_path: Path) -> None:
    from textual.widgets import DataTable, Input

    from moeprobe.tui.app import MoeprobeApp
    from moeprobe.tui.screens.layer import LayerScreen
    from moeprobe.tui.screens.overview import OverviewScreen
    from moeprobe.tui.screens.specialization import SpecializationScreen
    from moeprobe.tui.screens.sql import SqlScreen
    from tests.tui.helpers import loaded, open_screen, text_of, wait_for

    app = MoeprobeApp([_hostile_trace(tmp_path)])
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        header = text_of(app.screen.query_one("#run"))
        assert "[/] [bold]b[/bold] \\x1b]0;pwned\\x07" in header and _controls(header) == []
        layer_screen = await open_screen(pilot, "2", LayerScreen)
        title = text_of(layer_screen.query_one("#layer-title"))
        assert _controls(title) == [] and "\\x1b]52;c;" in title and "\\u202e" in title
        await open_screen(pilot, "3", SpecializationScreen)
        await pilot.press("5")
        await wait_for(pilot, lambda: isinstance(app.screen, SqlScreen), what="SQL screen")
        app.screen.query_one(Input).value = "select key, value from tags"
        await pilot.press("enter")
        table = app.screen.query_one("#result", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, what="SQL result")
        cells = [str(c) for c in table.get_row_at(0)]
        assert cells[0] == cells[1] and "[/] [bold]b[/bold]" in cells[0] and _controls(cells[0]) == []
    assert app.return_code in (0, None)
