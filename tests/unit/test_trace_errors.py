"""Every way a trace can be unusable gives a precise TraceError subclass, and the CLI one line + exit 1."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import moeprobe
from moeprobe.traces.schema import FORMAT_VERSION
from moeprobe.traces.errors import (
    CorruptManifestError,
    CorruptSegmentError,
    IncompatibleVersionError,
    NotATraceError,
    TraceNotFoundError,
)
from tests.conftest import PYTHON, run_cli_env


def _segment(trace: Path) -> Path:
    return sorted((trace / "rank=0" / "routing").glob("*.parquet"))[0]


def _edit_manifest(trace: Path, **changes: object) -> None:
    path = trace / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_good_v1_trace_reads(good_trace: Path) -> None:
    trace = moeprobe.open_trace(good_trace)
    assert trace.status == "complete"
    assert trace.routing().num_rows == 64
    assert trace.sql("select count(distinct layer) from routing").column(0)[0].as_py() == 2


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TraceNotFoundError, match="does not exist"):
        moeprobe.open_trace(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("hello")
    with pytest.raises(NotATraceError, match="it is a file"):
        moeprobe.open_trace(tmp_path / "f")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(NotATraceError, match="empty directory"):
        moeprobe.open_trace(tmp_path)


def test_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(NotATraceError, match="without manifest.json"):
        moeprobe.open_trace(tmp_path)


def test_wrong_magic(good_trace: Path) -> None:
    _edit_manifest(good_trace, magic="memray")
    with pytest.raises(NotATraceError, match="magic is 'memray'"):
        moeprobe.open_trace(good_trace)


def test_future_version(good_trace: Path) -> None:
    _edit_manifest(good_trace, format_version=99)
    with pytest.raises(IncompatibleVersionError, match="version 99 is not supported"):
        moeprobe.open_trace(good_trace)


def test_manifest_not_json(good_trace: Path) -> None:
    (good_trace / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptManifestError, match="not valid JSON"):
        moeprobe.open_trace(good_trace)


def test_manifest_wrong_types(good_trace: Path) -> None:
    _edit_manifest(good_trace, layers="many")
    with pytest.raises(CorruptManifestError, match="'layers' should be list"):
        moeprobe.open_trace(good_trace)


def test_shard_manifest_bad_status(good_trace: Path) -> None:
    path = good_trace / "rank=0" / "shard.json"
    data = json.loads(path.read_text())
    data["status"] = "exploded"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptManifestError, match="status 'exploded'"):
        moeprobe.open_trace(good_trace)


def test_truncated_segment(good_trace: Path) -> None:
    segment = _segment(good_trace)
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    with pytest.raises(CorruptSegmentError, match="corrupt or truncated"):
        moeprobe.open_trace(good_trace)


def test_segment_with_wrong_schema(good_trace: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), _segment(good_trace))
    with pytest.raises(CorruptSegmentError, match="does not have the routing schema"):
        moeprobe.open_trace(good_trace)


def test_temporary_files_are_ignored(good_trace: Path) -> None:
    (good_trace / "rank=0" / "routing" / ".000002.parquet.tmp").write_bytes(b"half a segment")
    assert moeprobe.open_trace(good_trace).routing().num_rows == 64


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_permission_denied(good_trace: Path) -> None:
    os.chmod(good_trace, 0)
    try:
        with pytest.raises(NotATraceError, match="permission denied"):
            moeprobe.open_trace(good_trace)
    finally:
        os.chmod(good_trace, 0o755)


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(moeprobe.TraceError):
        moeprobe.open_trace(tmp_path / "a")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "no such trace"),
        ("file", "not a trace"),
        ("future", "not supported"),
        ("truncated", "corrupt or truncated"),
    ],
)
def test_inspect_cli_one_line_and_exit_1(good_trace: Path, damage: str, message: str) -> None:
    target = good_trace
    if damage == "missing":
        target = good_trace.parent / "missing"
    elif damage == "file":
        target = good_trace / "manifest.json"
    elif damage == "future":
        _edit_manifest(good_trace, format_version=FORMAT_VERSION + 1)
    elif damage == "truncated":
        _segment(good_trace).write_bytes(b"PAR1garbage")
    result = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(target)], capture_output=True, text=True, env=run_cli_env(), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprobe inspect: ") and message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
