"""Format 2's contract check made once per stored (token) row counts exactly the logical rows that
Context.valid_routing leaves out, on stored files a hostile writer made: NULLs, a negative step, a phase code
that names no phase, unknown layers, expert ids and explicit ranks out of range, and rows whose ``choices``
is below K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moeprobe
from moeprobe.analysis.views import stored_routing_any_invalid_sql, stored_routing_invalid_sql
from tests.support import layer_meta, write_trace
from tests.unit.test_compact_format import _logical


def _set(table: pa.Table, name: str, rows: dict[int, object]) -> pa.Table:
    """``table`` with column ``name`` set to the given values (None: NULL) at the given rows."""
    values = table.column(name).to_pylist()
    for row, value in rows.items():
        values[row] = value
    index = table.schema.get_field_index(name)
    field = table.schema.field(index).with_nullable(True)
    return table.set_column(index, field, pa.array(values, field.type))


def _hostile(stored: pa.Table, ranked: bool) -> pa.Table:
    stored = _set(stored, "sequence", {0: None})
    stored = _set(stored, "position", {1: None})
    stored = _set(stored, "token_id", {2: None})
    stored = _set(stored, "dropped", {3: None})
    stored = _set(stored, "step", {4: -1, 5: None})
    stored = _set(stored, "phase", {6: 7, 7: None})
    stored = _set(stored, "layer", {8: 5, 9: None})
    stored = _set(stored, "expert_2", {10: 200, 11: 16})
    stored = _set(stored, "expert_0", {12: None})
    stored = _set(stored, "choices", {16: 2})  # NULL, 0 or over K: the reader refuses the segment (test below)
    if not ranked:  # explicit ranks, one of them out of range, one NULL inside the list (-> its column index)
        stored = _set(stored, "k", {17: [0, 1, 2, 9], 18: [3, None, 1, 0], 19: None})
    return stored


@pytest.mark.parametrize("ranked", [True, False], ids=["full rank", "explicit ranks"])
@pytest.mark.parametrize("uniform", [True, False], ids=["one layer shape", "two shapes"])
def test_stored_count_equals_the_logical_count(tmp_path: Path, ranked: bool, uniform: bool) -> None:
    logical = _logical(np.random.default_rng(3))
    layers = layer_meta(2, 16, 4) if uniform else [layer_meta(1, 16, 4)[0], {**layer_meta(2, 12, 3)[1]}]
    if not uniform:  # layer 1 has 12 experts and top-3: its 4th choice and experts 12..15 are out of its range
        logical = logical.filter(pa.compute.invert(pa.compute.and_(pa.compute.equal(logical["layer"], 1), pa.compute.equal(logical["k"], 3))))
    path = write_trace(tmp_path / "t", {"routing": logical}, layers=layers)
    segment = next((path / "rank=0" / "routing").glob("*.parquet"))
    stored = pq.read_table(segment)
    if ranked:
        stored = _set(stored, "k", dict.fromkeys(range(stored.num_rows)))  # every row in rank order
    pq.write_table(_hostile(stored, ranked), segment)
    with moeprobe.open_trace(path) as trace:
        ctx = trace.context()
        assert trace.reader.segments("routing")[0].full_rank is False  # a row of 2 choices: the general view
        sql = stored_routing_invalid_sql(trace.reader, ctx.contract_checks)
        assert sql is not None
        stored_count = int(ctx.run(sql)["n"][0])
        logical_count = int(ctx.run(f"SELECT count(*)::BIGINT AS n FROM routing v WHERE NOT {ctx.valid_routing('v')}")["n"][0])
        assert stored_count == logical_count
        assert logical_count >= 15  # the check above is not vacuous: most hostile rows are counted
        assert trace.summary()["overall"]["invalid_decisions"] == logical_count


def test_a_full_rank_segment_is_checked_with_its_own_view(tmp_path: Path) -> None:
    logical = _logical(np.random.default_rng(4))
    path = write_trace(tmp_path / "t", {"routing": logical.filter(pa.compute.not_equal(logical["layer"], 99))}, layers=layer_meta(2, 16, 4))
    segment = next((path / "rank=0" / "routing").glob("*.parquet"))
    stored = pq.read_table(segment)
    stored = _set(stored, "k", dict.fromkeys(range(stored.num_rows)))
    stored = _set(stored, "expert_1", {0: 20, 1: 16})
    stored = _set(stored, "sequence", {2: None})
    pq.write_table(stored, segment)
    with moeprobe.open_trace(path) as trace:
        assert trace.reader.segments("routing")[0].full_rank is True
        ctx = trace.context()
        sql = stored_routing_invalid_sql(trace.reader, ctx.contract_checks)
        assert sql is not None
        assert int(ctx.run(sql)["n"][0]) == 2 + 4  # two bad experts, and every choice of the token without a sequence
        assert trace.summary()["overall"]["invalid_decisions"] == 6


@pytest.mark.parametrize("count", [None, 0, 9])
def test_a_segment_with_a_null_or_impossible_choice_count_is_refused(tmp_path: Path, count: int | None) -> None:
    path = write_trace(tmp_path / "t", {"routing": _logical(np.random.default_rng(5))}, layers=layer_meta(2, 16, 4))
    segment = next((path / "rank=0" / "routing").glob("*.parquet"))
    pq.write_table(_set(pq.read_table(segment), "choices", {3: count}), segment)
    with pytest.raises(moeprobe.TraceError, match="choice count"), moeprobe.open_trace(path) as trace:
        trace.summary()


# One hostile change at a time (column, {row: value}), each of which makes some logical row invalid, and none.
SINGLE = [
    ("sequence", {0: None}), ("position", {1: None}), ("token_id", {2: None}), ("dropped", {3: None}),
    ("step", {4: -1}), ("step", {5: None}), ("phase", {6: 7}), ("phase", {7: None}), ("layer", {8: 5}),
    ("layer", {9: None}), ("expert_2", {10: 200}), ("expert_3", {11: 16}), ("expert_0", {12: None}), None,
]


@pytest.mark.parametrize("ranked", [True, False], ids=["full rank", "explicit ranks"])
@pytest.mark.parametrize("change", SINGLE, ids=[str(c) for c in SINGLE])
def test_the_quick_check_finds_a_bad_row_exactly_when_the_count_does(tmp_path: Path, ranked: bool, change: tuple[str, dict[int, object]] | None) -> None:
    """The clean-or-not check that runs first (stored_routing_any_invalid_sql) is positive exactly when the exact
    count is, for each kind of hostile row alone, in full-rank segments and in the general view's."""
    logical = _logical(np.random.default_rng(6))
    path = write_trace(tmp_path / "t", {"routing": logical}, layers=layer_meta(2, 16, 4))
    segment = next((path / "rank=0" / "routing").glob("*.parquet"))
    stored = pq.read_table(segment)
    if ranked:
        stored = _set(stored, "k", dict.fromkeys(range(stored.num_rows)))
    else:  # explicit ranks, and a row using 2 of the 4 columns with junk in the unused ones (not a decision)
        stored = _set(_set(stored, "k", {13: [1, 0, 3, 2], 14: [3, 2, 1, 0]}), "choices", {16: 2})
        stored = _set(stored, "expert_3", {16: 250})
    if change is not None:
        stored = _set(stored, *change)
    pq.write_table(stored, segment)
    with moeprobe.open_trace(path) as trace:
        ctx = trace.context()
        assert trace.reader.segments("routing")[0].full_rank is ranked
        quick = int(ctx.run(stored_routing_any_invalid_sql(trace.reader, ctx.contract_checks))["n"][0])
        exact = int(ctx.run(stored_routing_invalid_sql(trace.reader, ctx.contract_checks))["n"][0])
        assert (quick > 0) == (exact > 0)
        assert (exact > 0) == (change is not None)
        assert trace.summary()["overall"]["invalid_decisions"] == exact
