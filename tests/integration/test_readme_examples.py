"""Every ``moeprobe`` command in the README's shell blocks runs as written on the demo traces.

The README's "Analysing" and "What if" examples use ``traces/demo/...``, what ``make demo`` leaves behind. This
test records the demo in a scratch directory and runs each command line from there, in order (a later command
may read a trace an earlier one wrote). Synopses (``[--force]``, ``ARGS...``), commands that run a job
(``record``), serve until stopped (``serve``) or read an engine's files or server (``import``,
``capture-server``: tested on their own), the interactive TUI and the demo itself (run once as the fixture) are left out, and the test
checks that what is left covers the analysis commands.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli_env

pytest.importorskip("transformers")

_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in _BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #", 1)[0].strip()
            if not command.startswith("moeprobe "):
                continue
            words = shlex.split(command)
            # record runs a job; import and capture-server read engines' files or servers (tests of their own)
            if words[1] in ("record", "tui", "demo", "import", "capture-server", "serve") or any(w.startswith("[") or w.endswith("...") for w in words):
                continue
            if words[1] == "completion":
                continue  # covered by tests/integration/test_cli_conventions.py
            commands.append(command)
    return commands


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    result = subprocess.run([sys.executable, "-m", "moeprobe", "demo"], cwd=root, capture_output=True, text=True,
                            env=run_cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    return root


def test_readme_has_runnable_examples_for_every_analysis_command() -> None:
    commands = readme_commands()
    used = {shlex.split(c)[1] for c in commands}
    assert {"report", "simulate"} <= used
    assert all("traces/demo/" in c for c in commands)


def test_every_readme_example_runs_on_the_demo_traces(demo_dir: Path) -> None:
    for command in readme_commands():
        argv = [sys.executable, "-m", *shlex.split(command)]
        result = subprocess.run(argv, cwd=demo_dir, capture_output=True, text=True, env=run_cli_env(), timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        words = shlex.split(command)
        if "--html" in words:  # the page replaces the text output
            assert (demo_dir / words[words.index("--html") + 1]).stat().st_size > 0, command
        else:
            assert result.stdout.strip(), command
