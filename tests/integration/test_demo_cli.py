"""``moeprobe demo`` end to end, in a subprocess: exit codes, what it prints, and the traces it leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import moeprobe

pytest.importorskip("transformers")


def _demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeprobe", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    return _demo("-o", str(out), cwd=root), out


def test_demo_exits_zero_and_says_what_next(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    assert str(out / "untrained") in proc.stdout
    for name in ("balanced", "unbalanced"):
        assert f"{out / name} " in proc.stdout
    for command in ("moeprobe inspect", "moeprobe report", "moeprobe tui"):
        assert command in proc.stdout
    assert "MaxVio_global" in proc.stdout and "NMI" in proc.stdout


def test_demo_traces_have_prefill_decode_and_tags(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    from moeprobe.demo.checkpoints import available

    traces = sorted(p for p in out.iterdir() if (p / "manifest.json").exists())
    # one trace per shipped checkpoint, plus the random-weight baseline
    assert {p.name for p in traces} == {"untrained", *available()}
    for path in traces:
        with moeprobe.open_trace(path) as trace:
            assert trace.status == "complete"
            phases = {p: n for p, n in zip(*trace.sql("select phase, count(*) as n from routing group by all").to_pydict().values(), strict=True)}
            assert phases.get("prefill", 0) > 0 and phases.get("decode", 0) > 0
            domains = trace.sql("select distinct value from tags where key = 'domain' order by 1").column(0).to_pylist()
            assert domains == ["code", "data", "math", "prose"]
            checkpoints = trace.sql("select distinct value from tags where key = 'checkpoint'").column(0).to_pylist()
            assert checkpoints == [path.name]
            # every sequence carries a domain tag
            untagged = trace.sql(
                "select count(distinct sequence) from routing where sequence not in "
                "(select sequence from tags where key = 'domain')"
            ).column(0)[0].as_py()
            assert untagged == 0


def test_demo_refuses_existing_dir_without_force(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    again = _demo("-o", str(out), cwd=out.parent)
    assert again.returncode == 1
    assert again.stdout == ""
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "--force" in lines[0]
    forced = _demo("-o", str(out), "--force", "--max-new-tokens", "4", cwd=out.parent)
    assert forced.returncode == 0, forced.stderr


def test_demo_default_output_is_relative_to_cwd(tmp_path: Path) -> None:
    proc = _demo("--max-new-tokens", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "traces" / "demo" / "untrained" / "manifest.json").exists()


def test_demo_next_commands_run_as_printed(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    after = proc.stdout.split("\nnext:\n", 1)[1].splitlines()
    commands = [line.strip() for line in after if line.startswith("  ") and not line.strip().startswith("(")]
    assert any(" inspect " in c for c in commands) and any(" report " in c for c in commands)
    for command in commands:
        if " tui " in command:
            continue  # interactive; the TUI tests cover it
        # From the directory the demo ran in, in a shell, exactly as a user would paste it.
        result = subprocess.run(command, shell=True, cwd=out.parent, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}: {result.stderr}"
