"""What a reader trusts in a trace directory, and what it does not (docs/security.md).

- the path above the trace is not data: directories named like Hive partitions do not become columns;
- the segments shown are those the shard's manifest counts, so every table shows the same flushes.

Special files, symlinks out of the trace, oversized or hostile manifests, lying footers and rows that break the
routing table's contract are cases of the bad-trace corpus (tests/data/bad_traces.py, tests/unit/test_bad_traces.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moeprobe
from tests.support import layer_meta, routing_table, write_trace


def _balanced_trace(path: Path) -> Path:
    # Two layers of 8 experts, every expert chosen equally often in both: MaxVio 0, no dead expert.
    experts = np.array([[e, (e + 1) % 8] for e in range(8)] * 4)
    tables = [routing_table(experts, layer=layer, step=np.zeros(len(experts))) for layer in (0, 1)]
    import pyarrow as pa

    return write_trace(path, {"routing": pa.concat_tables(tables)}, layers=layer_meta(2, 8, 2))


@pytest.mark.parametrize("parents", ["expert=0", "layer=1", "rank=7", "expert=3/layer=1/rank=7/step=5"])
def test_partition_like_directories_above_a_trace_are_not_columns(tmp_path: Path, parents: str) -> None:
    trace = moeprobe.open_trace(_balanced_trace(tmp_path / parents / "t"))
    assert trace.sql("select count(distinct expert), count(distinct layer), min(rank), max(rank), min(step) "
                     "from routing").to_pylist()[0] == {
        "count(DISTINCT expert)": 8, "count(DISTINCT layer)": 2, "min(rank)": 0, "max(rank)": 0, "min(step)": 0}
    for layer in trace.load().layers:
        assert layer.maxvio_global == pytest.approx(0.0) and layer.dead == [] and list(layer.counts) == [8] * 8
    trace.close()


def test_tables_show_the_same_flushes_after_a_writer_dies_between_segments(tmp_path: Path) -> None:
    # A writer that renamed a routing segment and died before its manifest counted it (SIGKILL between the
    # tables of one flush): routing must not show steps that the steps table does not have.
    import pyarrow as pa

    from moeprobe.traces import ShardWriter, prepare_trace_dir
    from moeprobe.traces.schema import TABLES

    def steps_rows(step: int) -> pa.Table:
        return pa.table({"step": [step], "phase": ["prefill"], "batch": [1], "tokens": [4], "started_at": [1.0],
                         "wall_ms": [1.0]}, schema=TABLES["steps"])

    trace = tmp_path / "t"
    prepare_trace_dir(trace, force=False)
    writer = ShardWriter(trace, model={"name": "m"}, layers=layer_meta(1, 8, 2), options={}, max_pending_rows=8)
    writer.append("routing", routing_table(np.array([[0, 1]] * 2), step=np.zeros(2)))
    writer.append("steps", steps_rows(0))
    writer.flush()  # step 0: both tables, counted in shard.json
    writer.append("steps", steps_rows(1))
    # Step 1's routing passes max_pending_rows: its segment is renamed into place at once ...
    writer.append("routing", routing_table(np.array([[2, 3]] * 4), step=np.ones(4)))
    assert len(list((trace / "rank=0" / "routing").glob("*.parquet"))) == 2
    # ... and the process dies here, before the flush that writes steps and the manifest.
    opened = moeprobe.open_trace(trace)
    assert opened.sql("select distinct step from routing").column(0).to_pylist() == [0]
    assert opened.sql("select distinct step from steps").column(0).to_pylist() == [0]
    assert opened.reader.segments("routing")[0].path.name == "000000.parquet"
    opened.close()
    writer.close()  # a writer that lives on counts the segment, and both tables show step 1
    opened = moeprobe.open_trace(trace)
    assert sorted(opened.sql("select distinct step from routing").column(0).to_pylist()) == [0, 1]
    assert sorted(opened.sql("select distinct step from steps").column(0).to_pylist()) == [0, 1]
    opened.close()
