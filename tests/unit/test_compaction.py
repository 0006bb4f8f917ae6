"""Compaction: a shard's small segments merged as it grows and at close, each flush shown exactly once to
readers before, during and after a merge, and after a writer killed at any point of one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import moeprobe
from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table

TOKENS, K = 3, 2  # per flush: 6 routing decisions of one step


def _flush(writer: ShardWriter, step: int) -> None:
    writer.append("routing", routing_table(np.array([[step % 8, (step + 1) % 8]] * TOKENS), step=np.full(TOKENS, step)))
    writer.append("steps", pa.table({"step": [step], "phase": ["prefill"], "batch": [1], "tokens": [TOKENS],
                                     "started_at": [1.0], "wall_ms": [1.0]}, schema=TABLES["steps"]))
    writer.flush()


def _writer(path: Path, fanout: int = 4) -> ShardWriter:
    prepare_trace_dir(path, force=False)
    writer = ShardWriter(path, model={"name": "m"}, layers=layer_meta(1, 8, K), options={})
    assert writer.compactor is not None
    writer.compactor.fanout = fanout
    return writer


def _files(path: Path, table: str = "routing") -> list[str]:
    return sorted(p.name for p in (path / "rank=0" / table).glob("*.parquet"))


def _each_step_once(trace: moeprobe.Trace, steps: int) -> None:
    got = trace.sql("SELECT step, count(*) AS n FROM routing GROUP BY step ORDER BY step").to_pydict()
    assert got["step"] == list(range(steps)) and set(got["n"]) <= {TOKENS * K}
    assert trace.sql("SELECT step FROM steps ORDER BY step").column(0).to_pylist() == list(range(steps))


def test_flushes_merge_in_tiers_and_every_row_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "t"
    writer = _writer(path)
    most = 0
    for step in range(100):
        _flush(writer, step)
        most = max(most, len(moeprobe.open_trace(path).reader.segments("routing")))
    # 100 flushes in base 4: 1 x 64 + 2 x 16 + 1 x 4 (the shown ones); never more than 3 per tier and a new one
    shown = [s.path.name for s in moeprobe.open_trace(path).reader.segments("routing")]
    assert shown == ["000000-000063.parquet", "000064-000079.parquet", "000080-000095.parquet", "000096-000099.parquet"]
    assert most <= 3 * 3 + 1
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 100)
    writer.close()
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 100)
        assert trace.status == "complete" and trace.manifest["counters"]["rows"]["routing"] == 100 * TOKENS * K
        assert [s.path.name for s in trace.reader.segments("steps")] == shown
        assert sum(s.rows for s in trace.reader.segments("routing")) == 100 * TOKENS * K
    # merged-away files are still on disk (their grace period: a reader may be reading them), hidden
    assert "000000.parquet" in _files(path) and len(_files(path)) > len(shown)


def test_merged_away_segments_are_deleted_after_their_grace_period(tmp_path: Path) -> None:
    path = tmp_path / "t"
    writer = _writer(path)
    assert writer.compactor is not None
    writer.compactor.grace_s = 0.0
    for step in range(21):
        _flush(writer, step)
    writer.close()
    # 16 flushes in one file, then 000016..000019 merged and deleted on the next flush's pass, then 000020
    assert _files(path) == ["000000-000015.parquet", "000016-000019.parquet", "000020.parquet"]
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 21)


def test_merges_stop_at_the_target_size(tmp_path: Path) -> None:
    path = tmp_path / "t"
    writer = _writer(path)
    assert writer.compactor is not None
    writer.compactor.target_bytes = 1  # every merge would pass it
    for step in range(20):
        _flush(writer, step)
    writer.close()
    assert len(_files(path)) == 20


def test_a_reader_counting_while_segments_merge_sees_each_flush_once(tmp_path: Path) -> None:
    path = tmp_path / "t"
    writer = _writer(path)
    _flush(writer, 0)
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            with moeprobe.open_trace(path) as trace:
                while not done.is_set() or len(seen) < 3:  # bounded: the writer sets `done` after 200 flushes
                    trace.refresh()
                    got = trace.sql("SELECT count(*) AS n, count(DISTINCT step) AS steps, max(step) AS last FROM routing").to_pylist()[0]
                    # every flush present once: as many decisions as steps hold, and no step missing before the last
                    assert got["n"] == got["steps"] * TOKENS * K and got["steps"] == got["last"] + 1, got
                    seen.append(int(got["steps"]))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 200):
        _flush(writer, step)
    done.set()
    reader.join(timeout=120)
    assert not reader.is_alive() and not errors, errors
    assert seen == sorted(seen) and len(seen) >= 3  # a reader's view only grows
    assert writer.compactor is not None and writer.compactor.merges >= 10
    writer.close()
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 200)


def test_merged_segments_beside_what_they_hold_show_each_flush_once(tmp_path: Path) -> None:
    # What a writer killed between the rename of a merged segment and the deletion of what it holds leaves (its
    # grace period also leaves exactly this for a while), plus a merge's temporary file.
    path = tmp_path / "t"
    writer = _writer(path)
    for step in range(8):
        _flush(writer, step)
    names = _files(path)
    assert "000000-000003.parquet" in names and "000000.parquet" in names  # merged, originals not yet deleted
    (path / "rank=0" / "routing" / ".000004-000007.parquet.tmp").write_bytes(b"PAR1 half a merge")
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 8)
    (path / "rank=0" / "routing" / "000001.parquet").unlink()  # part of the deletion done
    with moeprobe.open_trace(path) as trace:
        _each_step_once(trace, 8)
    writer.release_lock()


KILLED_WRITER = """
import sys, numpy as np, pyarrow as pa
from pathlib import Path
from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table
path = Path(sys.argv[1])
prepare_trace_dir(path, force=False)
writer = ShardWriter(path, model={"name": "m"}, layers=layer_meta(1, 8, 2), options={})
writer.compactor.fanout = 2
writer.compactor.grace_s = 0.0
for step in range(100000):
    writer.append("routing", routing_table(np.array([[1, 2]] * 3), step=np.full(3, step)))
    writer.append("steps", pa.table({"step": [step], "phase": ["prefill"], "batch": [1], "tokens": [3],
                                     "started_at": [1.0], "wall_ms": [1.0]}, schema=TABLES["steps"]))
    writer.flush()
"""


def test_a_writer_killed_while_merging_leaves_a_trace_with_each_flush_once(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    for attempt, wait_for in enumerate((5, 23, 64)):
        path = tmp_path / f"t{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env={**os.environ, "PYTHONPATH": str(root)})
        shard = path / "rank=0" / "shard.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until that many flushes are counted (fanout 2: merging all the time)
            try:
                if json.loads(shard.read_text())["counters"]["segments"]["routing"] >= wait_for:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with moeprobe.open_trace(path) as trace:
            steps = trace.sql("SELECT count(*) FROM steps").column(0).to_pylist()[0]
            assert steps >= wait_for
            _each_step_once(trace, steps)


def test_serve_counts_each_decision_once_while_segments_merge(tmp_path: Path) -> None:
    # `moeprobe serve` follows new flushes; a merged file holds flushes it counted already from their own files.
    from moeprobe.metrics.follow import TraceFollower
    from moeprobe.metrics.options import MetricsOptions

    path = tmp_path / "t"
    writer = _writer(path)
    _flush(writer, 0)
    warnings: list[str] = []
    follower = TraceFollower(path, MetricsOptions(), warn=warnings.append)
    polls = {1, 2, 3, 5, 8, 13, 21, 34, 55, 89}  # irregular: some polls see a merge of flushes counted one by one
    for step in range(1, 100):
        _flush(writer, step)
        if step in polls:
            follower.poll()
    writer.close()
    (counts,) = [view.counts for view in follower.views()]
    assert int(counts.assignments.sum()) == 100 * TOKENS * K and int(counts.tokens.sum()) == 100 * TOKENS
    assert warnings == []
    # a follower that starts after the merges reads the merged files
    late = TraceFollower(path, MetricsOptions(), warn=warnings.append)
    (counts,) = [view.counts for view in late.views()]
    assert int(counts.assignments.sum()) == 100 * TOKENS * K and warnings == []
    follower.close()
    late.close()


def test_the_tui_source_sees_new_flushes_when_a_merge_keeps_the_segment_count(tmp_path: Path) -> None:
    from moeprobe.tui.source import TraceSource

    path = tmp_path / "t"
    writer = _writer(path)
    for step in range(7):
        _flush(writer, step)
    source = TraceSource(path)
    assert source.poll() is not None
    assert len(moeprobe.open_trace(path).reader.segments("routing")) == 4  # 0-3, 4, 5, 6
    for step in range(7, 10):
        _flush(writer, step)
    assert len(moeprobe.open_trace(path).reader.segments("routing")) == 4  # 0-3, 4-7, 8, 9: as many files
    assert source.poll() is not None  # the screens are told that the data moved
    assert source.read(lambda t: t.sql("select count(*) from routing").column(0)[0].as_py()) == 10 * TOKENS * K
    source.close()
    writer.close()


def test_force_overwrites_a_trace_whose_segments_were_merged(tmp_path: Path) -> None:
    # Merged segments (NNNNNN-MMMMMM.parquet) are moeprobe's own files: --force must delete them like flushes.
    path = tmp_path / "t"
    writer = _writer(path)
    for step in range(8):
        _flush(writer, step)
    writer.close("complete")
    assert any("-" in name for name in _files(path))
    prepare_trace_dir(path, force=True)
    assert not path.exists() or not any(path.iterdir())
