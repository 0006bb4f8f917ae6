"""``moeprobe report`` in a subprocess on hand-made traces: formats, filters, --compare, and one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from moeprobe.traces.schema import TABLES
from tests.conftest import PYTHON, run_cli_env
from tests.support import layer_meta, routing_table, write_trace


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "moeprobe", "report", *args], capture_output=True, text=True, env=run_cli_env(), timeout=120
    )


def _trace(path: Path, experts: np.ndarray, *, status: str | None = "complete") -> Path:
    n = len(experts)
    seq = np.repeat([0, 1], n // 2)
    step = np.repeat([0, 1, 2, 3], n // 4)
    tags = pa.table({"sequence": [0, 1], "key": ["domain"] * 2, "value": ["code", "math"]}, schema=TABLES["tags"])
    routing = [
        routing_table(experts, step=step, sequence=seq, position=np.tile(np.arange(n // 2), 2), layer=i,
                      phase=["prefill" if s == 0 else "decode" for s in step])
        for i in (0, 1)
    ]
    latency = pa.table(
        {"step": np.repeat(np.arange(4), 2), "layer": np.tile([0, 1], 4), "router_ms": np.full(8, 0.1),
         "block_ms": np.arange(8, dtype=float), "clock": ["perf_counter"] * 8},
        schema=TABLES["latency"],
    )
    return write_trace(path, {"routing": routing, "tags": tags, "latency": latency}, layers=layer_meta(2, 8, 2), status=status)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    balanced = np.argsort(rng.random((400, 8)), axis=1)[:, :2]
    skewed = np.column_stack([np.zeros(400, int), 1 + rng.integers(0, 7, 400)])
    return _trace(root / "balanced", balanced), _trace(root / "skewed", skewed)


def test_text_report_lists_worst_layers_with_baselines(traces: tuple[Path, Path]) -> None:
    result = _report(str(traces[1]))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert f"trace {traces[1]}: complete" in out
    assert "2 MoE layers, 1,600 routing decisions, 400 tokens, steps 0..3" in out
    for title in ("Load imbalance across layers", "Layers, worst first", "Expert vs domain", "Token-level specialization",
                  "Latency in ms (perf_counter)"):
        assert title in out
    assert "random" in out and "ideal" in out
    assert "MaxVio global" in out and "balancedness EP8 SGLang / vLLM" in out


def test_json_report_with_filters(traces: tuple[Path, Path]) -> None:
    result = _report(str(traces[0]), "--json", "--steps", "1:3", "--phase", "decode", "--tag", "domain=code",
                     "--layer", "1", "--ep-size", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format_version"] == 1
    assert report["filters"] == {"steps": [1, 3], "phase": "decode", "tags": {"domain": "code"}, "layers": [1], "ranks": None}
    # sequence 0 (code) spans steps 0 and 1; of those only step 1 (decode) is in 1:3: 100 tokens, k=2, layer 1
    assert report["overall"]["decisions"] == 200
    assert [item["layer"] for item in report["layers"]] == [1]
    assert report["overall"]["balancedness"]["ep_size"] == 4


def test_markdown_report(traces: tuple[Path, Path]) -> None:
    result = _report(str(traces[0]), "--markdown", "--limit", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("## moeprobe report\n")
    assert "### Layers, worst first" in result.stdout and "|---|" in result.stdout
    assert "1 more not shown" in result.stdout


def test_compare_two_traces(traces: tuple[Path, Path]) -> None:
    result = _report(str(traces[0]), str(traces[1]), "--compare", "--json")
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)["diff"]["overall"]["maxvio_global"]
    assert diff["b"] > diff["a"] and diff["delta"] > 0
    text = _report(str(traces[0]), str(traces[1]), "--compare")
    assert text.returncode == 0, text.stderr
    assert "Overall: a vs b" in text.stdout and "a: trace" in text.stdout and "b: trace" in text.stdout


def test_a_trace_still_being_written(tmp_path: Path) -> None:
    # the writer is left open: status running (its pid, this test process, is alive)
    path = _trace(tmp_path / "live", np.zeros((8, 2), int) + [0, 1], status=None)
    result = _report(str(path))
    assert result.returncode == 0, result.stderr
    assert "still being written" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{missing}"], 1, "no such trace"),
        (["{balanced}", "--layer", "7"], 1, "layer 7 is not in this trace (layers: 0..1)"),
        (["{balanced}", "--steps", "5:2"], 2, "--steps '5:2': the range is empty"),
        (["{balanced}", "--tag", "domain"], 2, "--tag 'domain': expected key=value"),
        (["{balanced}", "--tag", "nosuch=x"], 1, "no sequence has the tag key 'nosuch' (tag keys: domain)"),
        (["{balanced}", "--tag", "domain=x"], 1, "no sequence has domain=x (domain values: code, math)"),
        (["{balanced}", "{skewed}"], 2, "give one trace, or two with --compare"),
        (["{balanced}", "--compare"], 2, "--compare takes exactly two traces, got 1"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    traces: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    names = {"missing": str(tmp_path / "nope"), "balanced": str(traces[0]), "skewed": str(traces[1])}
    result = _report(*[a.format(**names) for a in args])
    assert result.returncode == code
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("moeprobe report: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("columns", ["60", "80", "120", None])
def test_text_report_fits_the_width_without_trailing_padding(traces: tuple[Path, Path], columns: str | None) -> None:
    env = run_cli_env()
    env.pop("COLUMNS")
    if columns is not None:
        env["COLUMNS"] = columns
    result = subprocess.run([PYTHON, "-m", "moeprobe", "report", str(traces[1])], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines)
    if columns is not None:
        assert max(len(line) for line in lines) <= int(columns)
    else:
        assert max(len(line) for line in lines) > 120  # the per-layer table at its natural width, in one piece
    # Split tables keep every column: each per-layer header cell and each layer's row label is still there.
    for header in ("E/k", "MaxVio batch", "worst step", "MaxVio global", "entropy", "Gini", "top-N share", "dead",
                   "EP balancedness"):
        assert header in result.stdout
    json_report = json.loads(_report(str(traces[1]), "--json").stdout)
    for layer in json_report["layers"]:
        assert f"{layer['maxvio_global']:.3f}" in result.stdout


def _exit_freeze_count(*argv: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``moeprobe ARGV`` through the console entry point; the number of objects frozen when it exits."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print(f'frozen {gc.get_freeze_count()}', file=sys.stderr))\n"
        f"sys.argv = ['moeprobe', *{list(argv)!r}]\n"
        "from moeprobe.cli.main import entry\nentry()"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=run_cli_env(), timeout=120)
    return result, int(result.stderr.split("frozen ")[-1])


def test_report_leaves_its_objects_to_the_end_of_the_process(traces: tuple[Path, Path]) -> None:
    # The interpreter's last collection would walk every object the report made (50 ms at 1 M decisions): a
    # read-only command freezes them once its output is written; another command's exit is left as it was.
    result, frozen = _exit_freeze_count("report", str(traces[0]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trace"]["path"] == str(traces[0])
    assert frozen > 10_000
    result, frozen = _exit_freeze_count("--version")
    assert result.returncode == 0 and frozen == 0
