"""CLI conventions shared by every command: exit codes 0/1/2, one-line usage errors with a suggestion, a closed
pipe without a traceback, and shell completion generated from the parsers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYTHON, run_cli_env
from tests.support import layer_meta, routing_table, write_trace


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "moeprobe", *args], capture_output=True, text=True, env=run_cli_env(), timeout=120)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    experts = np.argsort(np.random.default_rng(0).random((64, 8)), axis=1)[:, :2]
    path = tmp_path_factory.mktemp("conv") / "t"
    return write_trace(path, {"routing": [routing_table(experts)]}, layers=layer_meta(1, 8, 2))


def test_unknown_command_suggests_the_nearest() -> None:
    result = _cli("reprot")
    assert result.returncode == 2
    assert "did you mean 'report'?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_option_suggests_the_nearest_in_one_line(trace: Path) -> None:
    result = _cli("report", str(trace), "--tga", "domain=code")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moeprobe report: unrecognized arguments: --tga domain=code; did you mean --tag? (see moeprobe report --help)"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("report", "{t}", "--tag", "domain"),      # malformed key=value
        ("report", "{t}", "--layer", "x"),         # not a number
        ("report", "{t}", "--steps", "5:2"),       # empty range
        ("report", "{t}", "--phase", "decod"),     # not a choice
        ("simulate", "{t}", "--steps", "a:b"),
        ("inspect",),                              # missing positional
    ],
)
def test_malformed_values_are_usage_errors(trace: Path, args: tuple[str, ...]) -> None:
    result = _cli(*(a.format(t=trace) for a in args))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_values_the_trace_lacks_are_bad_input(trace: Path, tmp_path: Path) -> None:
    assert _cli("report", str(trace), "--layer", "3").returncode == 1
    assert _cli("report", str(tmp_path / "nosuch")).returncode == 1
    assert _cli("report", str(trace)).returncode == 0


@pytest.mark.parametrize("args", [("--help",), ("report", "--help"), ("completion", "bash")])
def test_closed_pipe_is_not_a_traceback(args: tuple[str, ...]) -> None:
    # The reader closes its end before the child has written anything (the child is still starting Python),
    # which is what `moeprobe --help | head -1` does to a long output.
    process = subprocess.Popen(
        [PYTHON, "-m", "moeprobe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_cli_env()
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert stderr == ""


def _bash_complete(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    program = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _moeprobe; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_and_choices() -> None:
    result = _cli("completion", "bash")
    assert result.returncode == 0
    script = result.stdout
    assert _bash_complete(script, ["moeprobe", "rep"]) == ["report"]
    assert _bash_complete(script, ["moeprobe", "report", "--ph"]) == ["--phase"]
    assert _bash_complete(script, ["moeprobe", "report", "--phase", "d"]) == ["decode"]
    assert "--max-new-tokens" in _bash_complete(script, ["moeprobe", "demo", "--"])
    assert _bash_complete(script, ["moeprobe", "completion", "z"]) == ["zsh"]


def test_zsh_completion_wraps_the_same_function() -> None:
    result = _cli("completion", "zsh")
    assert result.returncode == 0
    assert "bashcompinit" in result.stdout and "complete -o filenames" in result.stdout
    if shutil.which("zsh"):
        check = subprocess.run(["zsh", "-n", "-c", result.stdout], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr


def test_completion_needs_a_known_shell() -> None:
    result = _cli("completion", "fish")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
