"""Creating and overwriting traces: what ``--force`` may delete, one writer per shard, one-line errors for places
a trace cannot be written (docs/security.md)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import moeprobe
from moeprobe.cli.main import main as cli_main
from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.errors import NotATraceError, TraceBusyError, TraceError, TraceWriteError
from tests.conftest import PYTHON, run_cli_env
from tests.support import layer_meta, routing_table, write_trace


def _tree(root: Path) -> dict[str, bytes | str]:
    """Everything under ``root`` (links as their targets), to prove that nothing was deleted or changed."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = "<dir>"
    return out


def _trace(path: Path) -> Path:
    return write_trace(path, {"routing": routing_table(np.array([[0, 1], [2, 3]]))}, layers=layer_meta(1, 4, 2))


def _per_rank_dataset(root: Path) -> Path:
    (root / "metrics" / "rank=0").mkdir(parents=True)
    (root / "metrics" / "rank=0" / "m.csv").write_text("loss\n0.1\n")
    return root / "metrics"


def _rank_named_file(root: Path) -> Path:
    (root / "out").mkdir()
    (root / "out" / "rank=1.csv").write_text("a,b\n")
    return root / "out"


def _notebook_in_trace(root: Path) -> Path:
    trace = _trace(root / "t")
    (trace / "analysis.ipynb").write_text("{}")
    return trace


def _manifest_symlink(root: Path) -> Path:
    trace = _trace(root / "t")
    elsewhere = root / "kept-manifest.json"
    shutil.move(trace / "manifest.json", elsewhere)
    (trace / "manifest.json").symlink_to(elsewhere)
    return trace


def _segment_symlink(root: Path) -> Path:
    trace = _trace(root / "t")
    segment = next((trace / "rank=0" / "routing").glob("*.parquet"))
    precious = root / "precious.parquet"
    shutil.move(segment, precious)
    segment.symlink_to(precious)
    return trace


def _foreign_file_named_like_a_segment(root: Path) -> Path:
    trace = _trace(root / "t")
    (trace / "rank=0" / "routing" / "000007.parquet").write_text("my own notes, not Parquet")
    return trace


def _file_in_shard(root: Path) -> Path:
    trace = _trace(root / "t")
    (trace / "rank=0" / "notes.txt").write_text("keep")
    return trace


FOREIGN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "per-rank-dataset": (_per_rank_dataset, "m.csv is not written by moeprobe"),
    "file-named-rank": (_rank_named_file, "rank=1.csv is not written by moeprobe"),
    "notebook-in-trace": (_notebook_in_trace, "analysis.ipynb is not written by moeprobe"),
    "manifest-is-symlink": (_manifest_symlink, "manifest.json is not a regular file"),
    "segment-is-symlink": (_segment_symlink, "000000.parquet is not written by moeprobe"),
    "text-named-like-a-segment": (_foreign_file_named_like_a_segment, "000007.parquet is not written by moeprobe"),
    "file-in-shard": (_file_in_shard, "notes.txt is not written by moeprobe"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_force_deletes_nothing_that_moeprobe_did_not_write(tmp_path: Path, case: str) -> None:
    make, expect = FOREIGN[case]
    target = make(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(NotATraceError, match="refusing to overwrite") as info:
        prepare_trace_dir(target, force=True)
    assert expect in str(info.value)
    assert _tree(tmp_path) == before
    # The CLI says so in one line, exit 1, before the job runs.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["record", "--force", "-o", str(target), "--", sys.executable, "-c", "raise SystemExit(5)"])
    assert rc == 1 and len(err.getvalue().strip().splitlines()) == 1 and expect in err.getvalue()
    assert _tree(tmp_path) == before


def test_force_removes_a_trace_with_its_temporary_files(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t")
    (trace / ".manifest.json.abc.tmp").write_text("{")
    (trace / "rank=0" / "routing" / ".000009.parquet.tmp").write_bytes(b"PAR1half")
    prepare_trace_dir(trace, force=True)
    assert trace.is_dir() and list(trace.iterdir()) == []


def test_a_second_writer_on_a_shard_is_refused_and_the_first_keeps_its_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t"
    prepare_trace_dir(trace, force=False)
    first = ShardWriter(trace, model={"name": "m"}, layers=layer_meta(1, 4, 2), options={})
    first.append("routing", routing_table(np.array([[0, 1]])))
    first.flush()
    before = _tree(trace)
    # Another probe with force=True on the same path, in this process or another: refused, nothing deleted.
    with pytest.raises(TraceBusyError, match="another process is writing this shard"):
        prepare_trace_dir(trace, force=True)
    result = subprocess.run(
        [PYTHON, "-m", "moeprobe", "record", "--force", "-o", str(trace), "--", sys.executable, "-c", "pass"],
        capture_output=True, text=True, env=run_cli_env(), timeout=60,
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "another process is writing this shard" in result.stderr and "Traceback" not in result.stderr
    assert _tree(trace) == before
    first.close()
    assert moeprobe.open_trace(trace).status == "complete"
    # Once the writer has closed, the shard is free: force may now replace the trace.
    prepare_trace_dir(trace, force=True)
    assert list(trace.iterdir()) == []


def test_a_second_writer_for_the_same_rank_of_a_multi_process_trace_is_refused(tmp_path: Path) -> None:
    trace = tmp_path / "t"
    trace.mkdir()
    first = ShardWriter(trace, model={"name": "m"}, layers=layer_meta(1, 4, 2), options={}, rank=1, world_size=2)
    from moeprobe.traces.removal import remove_shard

    with pytest.raises(TraceBusyError):
        remove_shard(trace / "rank=1")  # what Probe(force=True) does for its own rank
    assert (trace / "rank=1" / "shard.json").exists()
    first.close()
    remove_shard(trace / "rank=1")
    assert not (trace / "rank=1").exists()


def _read_only_mount(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(path)], capture_output=True).returncode == 0


def test_places_a_trace_cannot_be_written_get_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    places = {tmp_path / "a-file" / "t": "Not a directory", Path("/proc/self/moeprobe-t"): "cannot create the trace here"}
    read_only = tmp_path / "ro"
    mounted = _read_only_mount(read_only)
    if mounted:
        places[read_only / "t"] = "Read-only file system"
    try:
        for place, expect in places.items():
            with pytest.raises(TraceWriteError, match=expect):
                prepare_trace_dir(place, force=False)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli_main(["record", "-o", str(place), "--", sys.executable, "-c", "pass"])
            assert rc == 1 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
            assert expect in err.getvalue() and "internal error" not in err.getvalue()
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=True)
    assert issubclass(TraceWriteError, TraceError)
