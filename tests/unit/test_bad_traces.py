"""The bad-trace corpus (tests/data/bad_traces.py) through every command that takes a trace, and property tests
that mutate a good trace's manifests and segment bytes at random.

Every command must answer a broken trace with one line on stderr and exit status 1, never a traceback and never
"internal error"; the reader must either open a damaged trace or raise a TraceError subclass, nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeprobe.cli.main import main as cli_main
from moeprobe.traces.errors import TraceError
from moeprobe.traces.reader import TraceReader
from tests.conftest import PYTHON, ROOT, run_cli_env
from tests.data.bad_traces import GOOD, Case, InvalidRowsCase, make_corpus, make_invalid_rows, restore_permissions

# Every command that takes a trace path. One more (issue 13's `import`) is one more entry here and, if it does not
# take the trace as its only positional argument, one more entry in ARGV.
COMMANDS = ("inspect", "report", "simulate")
ARGV: dict[str, list[str]] = {}


def _argv(command: str, path: Path) -> list[str]:
    return [command, *ARGV.get(command, []), str(path)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    root = tmp_path_factory.mktemp("bad") / "corpus"
    cases = make_corpus(root)
    yield cases
    restore_permissions(root)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def _problem(command: str, case: Case, rc: int, out: str, err: str) -> str | None:
    lines = err.strip().splitlines()
    if rc != 1 or len(lines) != 1 or out:
        return f"{case.name}: {command} exit {rc}, stdout {out[:80]!r}, stderr {err[:300]!r}"
    line = lines[0]
    if not line.startswith(f"moeprobe {command}: ") or "internal error" in line or case.expect not in line:
        return f"{case.name}: {command}: {line!r} (expected a message with {case.expect!r})"
    return None


def test_the_corpus_is_large_enough(corpus: list[Case]) -> None:
    assert len(corpus) >= 30
    assert len({c.name for c in corpus}) == len(corpus)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_every_bad_trace_in_one_line(corpus: list[Case], command: str) -> None:
    problems = []
    for case in corpus:
        if command == "inspect" and case.data_only:
            continue
        problems.append(_problem(command, case, *_run(_argv(command, case.path))))
    assert [p for p in problems if p] == []


def test_damage_only_in_column_data_is_named_when_rows_are_read(corpus: list[Case]) -> None:
    # inspect and the TUI's start-up check read footers only (both must stay instant on a large trace), so they
    # open this trace; the first query that reads its rows fails with the segment's name, in the CLI (above) and
    # on the TUI's data path, where a screen shows the message.
    from moeprobe.traces.errors import CorruptSegmentError
    from moeprobe.tui.source import TraceSource

    case = next(c for c in corpus if c.data_only)
    rc, out, _ = _run(["inspect", str(case.path)])
    assert rc == 0 and "moeprobe trace v1" in out
    source = TraceSource(case.path)
    assert source.poll() is not None and source.snapshot.state == "open"
    with pytest.raises(CorruptSegmentError, match=r"routing/000000\.parquet: corrupt Parquet segment"):
        source.read(lambda trace: trace.summary())
    source.close()


TUI_SCRIPT = """
import contextlib, io, json, sys
sys.path.insert(0, {root!r})
from moeprobe.cli.main import main
results = []
for path in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["tui", path])  # a case that got past the check would start the app and hang: the timeout fails it
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_tui_refuses_every_bad_trace_before_starting_the_app(corpus: list[Case]) -> None:
    # A real process (stdin not a terminal, no app ever started); the missing path, the empty directory and a
    # dangling symlink are waited for by design (a job is about to write there), so they are not refusals.
    cases = [c for c in corpus if not c.tui_waits and not c.data_only]
    result = subprocess.run(
        [PYTHON, "-c", TUI_SCRIPT.format(root=str(ROOT)), json.dumps([str(c.path) for c in cases])],
        capture_output=True, text=True, env=run_cli_env(), timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    problems = [_problem("tui", case, *r) for case, r in zip(cases, json.loads(result.stdout), strict=True)]
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_traces_in_a_real_process_are_one_line_and_exit_1(corpus: list[Case], command: str) -> None:
    case = next(c for c in corpus if c.name == "segment-wrong-schema")
    result = subprocess.run([PYTHON, "-m", "moeprobe", command, str(case.path)], capture_output=True, text=True,
                            env=run_cli_env(), timeout=60)
    assert _problem(command, case, result.returncode, result.stdout, result.stderr) is None
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def invalid_rows(tmp_path_factory: pytest.TempPathFactory) -> list[InvalidRowsCase]:
    return make_invalid_rows(tmp_path_factory.mktemp("invalid") / "corpus")


def test_rows_that_break_the_routing_contract_are_counted_or_refused(invalid_rows: list[InvalidRowsCase]) -> None:
    # Expert ids -1, -32768 and 300 of 8, NULLs in non-null columns, step -2**31, a layer the manifest does not
    # list: the report leaves the rows out of every figure and says how many; simulate (which replays every
    # decision) refuses in one line; inspect reads footers only and shows the trace. Never an IndexError.
    rc, out, err = _run(["report", str(GOOD), "--json"])
    assert rc == 0, err
    good = json.loads(out)["overall"]["decisions"]
    problems = []
    for case in invalid_rows:
        rc, out, err = _run(["report", str(case.path), "--json"])
        if rc != 0:
            problems.append(f"{case.name}: report --json exit {rc}: {err.strip()[:200]}")
            continue
        overall = json.loads(out)["overall"]
        if (overall["invalid_decisions"], overall["decisions"]) != (case.invalid, good - case.invalid):
            problems.append(f"{case.name}: invalid {overall['invalid_decisions']}, decisions {overall['decisions']} "
                            f"(expected {case.invalid}, {good - case.invalid})")
        rc, out, err = _run(["report", str(case.path)])
        if rc != 0 or f"invalid: {case.invalid} routing rows left out" not in out:
            problems.append(f"{case.name}: report exit {rc}, no 'invalid:' line: {err.strip()[:200]}")
        rc, out, err = _run(["simulate", str(case.path)])
        problems.append(_problem("simulate", Case(case.name, case.path, case.simulate_expect), rc, out, err))
        rc, out, err = _run(["inspect", str(case.path)])
        if rc != 0:
            problems.append(f"{case.name}: inspect exit {rc}: {err.strip()[:200]}")
    assert [p for p in problems if p] == []


def test_tui_screens_show_traces_with_invalid_rows(invalid_rows: list[InvalidRowsCase]) -> None:
    import asyncio

    asyncio.run(_tui_screens_show(next(c for c in invalid_rows if c.name == "expert-min-int16").path))


async def _tui_screens_show(path: Path) -> None:
    from moeprobe.tui.app import MoeprobeApp
    from moeprobe.tui.screens.layer import LayerScreen
    from moeprobe.tui.screens.overview import OverviewScreen
    from moeprobe.tui.screens.tokens import TokensScreen
    from tests.tui.helpers import loaded, open_screen, wait_for

    app = MoeprobeApp([path])
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: loaded(app, OverviewScreen), what="overview")
        for key, screen_type in (("2", LayerScreen), ("4", TokensScreen)):
            screen = await open_screen(pilot, key, screen_type)  # times out if the fetch failed
            assert screen._note == ""  # no failed query on the banner


# -- property tests ---------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
TOP_KEYS = ["magic", "format_version", "world_size", "model", "layers", "options", "status", "counters", "rank"]
LAYER_KEYS = ["index", "name", "num_experts", "top_k", "num_shared_experts", "scoring", "family"]
SHARD_KEYS = ["rank", "status", "pid", "host", "started_at", "heartbeat_at", "ended_at", "counters", "error"]


@st.composite
def manifest_edits(draw: st.DrawFn) -> tuple[str, list[Any], str, Any]:
    """(file, key path, action, value): set or delete one field, at the top, in a layer, or in the counters."""
    file = draw(st.sampled_from(["manifest.json", "rank=0/shard.json"]))
    if file == "manifest.json":
        where = draw(st.sampled_from(["top", "layer", "model"]))
        if where == "top":
            path: list[Any] = [draw(st.sampled_from(TOP_KEYS) | st.text(max_size=6))]
        elif where == "layer":
            path = ["layers", draw(st.integers(0, 1)), draw(st.sampled_from(LAYER_KEYS))]
        else:
            path = ["model", draw(st.sampled_from(["name", "family", "parameters", "dtype"]))]
    else:
        where = draw(st.sampled_from(["top", "counters"]))
        if where == "top":
            path = [draw(st.sampled_from(SHARD_KEYS) | st.text(max_size=6))]
        else:
            path = ["counters", draw(st.sampled_from(["steps", "tokens", "decisions", "dropped", "rows", "anomalies"]))]
    action = draw(st.sampled_from(["set", "set", "set", "delete"]))
    return file, path, action, draw(json_values)


def _apply(data: Any, path: list[Any], action: str, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    if action == "delete":
        data.pop(path[-1], None)
    else:
        data[path[-1]] = value


def _exercise(trace: Path) -> None:
    """Open the trace and use everything the commands use from the reader; only TraceError may come out."""
    refused = False  # by the reader when it opens the trace (inspect opens it the same way)
    try:
        reader = TraceReader(trace)
    except TraceError:
        refused = True
    else:
        try:
            # Properties that parse the manifest, and tables: reading them is the check.
            _ = reader.manifest, reader.status, reader.layers, reader.model
            for name in ("routing", "steps", "tags"):
                reader.table(name)
        except TraceError:
            pass
    # inspect renders every manifest field it finds: a damaged value is a one-line error naming the command, or
    # the summary with nothing on stderr; a trace the reader refuses to open is always the error.
    rc, out, err = _run(["inspect", str(trace)])
    lines = err.strip().splitlines()
    if rc == 0:
        assert not refused and out.strip() and err == "", (rc, out[:200], err)
    else:
        assert rc == 1 and out == "" and len(lines) == 1, (rc, out[:200], err)
        assert lines[0].startswith("moeprobe inspect: ") and "internal error" not in lines[0], err


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(manifest_edits(), min_size=1, max_size=3))
def test_mutated_manifests_open_or_raise_trace_error(edits: list[tuple[str, list[Any], str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t"
        shutil.copytree(GOOD, trace)
        for file, path, action, value in edits:
            target = trace / file
            data = json.loads(target.read_text())
            try:
                _apply(data, path, action, value)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit replaced the container this one reaches into
            target.write_text(json.dumps(data))
        _exercise(trace)


@st.composite
def byte_edits(draw: st.DrawFn) -> tuple[str, int, bytes]:
    return (draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"])), draw(st.integers(0, 1 << 16)),
            draw(st.binary(min_size=1, max_size=16)))


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(byte_edits(), min_size=1, max_size=4))
def test_mutated_segments_open_or_raise_trace_error(edits: list[tuple[str, int, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t"
        shutil.copytree(GOOD, trace)
        segment = sorted((trace / "rank=0" / "routing").glob("*.parquet"))[0]
        data = bytearray(segment.read_bytes())
        for kind, at, blob in edits:
            at %= max(len(data), 1)
            if kind == "flip" and not data:
                continue  # an earlier edit truncated everything: nothing left to flip
            if kind == "flip":
                data[at] ^= blob[0] or 0xFF
            elif kind == "truncate":
                del data[at:]
            elif kind == "insert":
                data[at:at] = blob
            else:
                data[at : at + len(blob)] = blob
        segment.write_bytes(bytes(data))
        _exercise(trace)


def test_simulate_names_an_expert_id_the_manifest_does_not_cover(good_trace: Path) -> None:
    # Consistent on its own, inconsistent with the data: layer 0 claims 2 experts, its rows name experts up to 7.
    manifest = good_trace / "manifest.json"
    data = json.loads(manifest.read_text())
    data["layers"][0]["num_experts"] = 2
    manifest.write_text(json.dumps(data))
    rc, out, err = _run(["simulate", str(good_trace)])
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "name expert 7, but the manifest gives that layer 2 experts" in err and "internal error" not in err
