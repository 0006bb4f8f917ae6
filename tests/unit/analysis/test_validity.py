"""The routing contract (Context.valid_routing) per layer shape: constants when every layer has the same number of
experts and top-k, a per-layer CASE otherwise; both leave out and count the same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

import moeprobe
from tests.support import layer_meta, routing_table, write_trace


def _invalid(tmp_path: Path, layers: list[dict], rows: list[tuple[int, int, int]]) -> dict[int, int]:
    """Invalid decisions per layer of a trace whose routing rows are (layer, k, expert), one token each."""
    tables = [
        routing_table(np.array([[expert]]), layer=layer).set_column(6, "k", pa.array([k], pa.int8()))
        for layer, k, expert in rows
    ]
    write_trace(tmp_path / "t", {"routing": tables}, layers=layers)
    with moeprobe.open_trace(tmp_path / "t") as trace:
        counted = trace.context().invalid_decisions()
        assert trace.summary()["overall"]["invalid_decisions"] == sum(counted.values())
        return counted


def _shape(index: int, experts: int, top_k: int) -> dict:
    return {**layer_meta(1, experts, top_k)[0], "index": index, "name": f"model.layers.{index}.mlp"}


def test_layers_of_different_shapes_are_checked_against_their_own(tmp_path: Path) -> None:
    layers = [_shape(0, 4, 1), _shape(1, 8, 2)]
    rows = [(0, 0, 3), (0, 0, 5), (0, 1, 0), (1, 1, 7), (1, 2, 0), (1, 0, 8), (7, 0, 0)]
    # layer 0: expert 5 of 4 and choice rank 1 of top-1; layer 1: rank 2 of top-2 and expert 8 of 8; layer 7 unknown
    assert _invalid(tmp_path, layers, rows) == {0: 2, 1: 2, 7: 1}


def test_layers_of_one_shape_use_constants_and_still_refuse_unknown_layers(tmp_path: Path) -> None:
    layers = [_shape(0, 4, 2), _shape(2, 4, 2)]  # not contiguous: layer 1 is not a layer of this model
    rows = [(0, 1, 3), (0, 2, 0), (2, 0, 4), (2, 0, 9), (1, 0, 0), (3, 0, 0)]
    assert _invalid(tmp_path, layers, rows) == {0: 1, 1: 1, 2: 2, 3: 1}
    ctx = moeprobe.open_trace(tmp_path / "t").context()
    assert "CASE" not in ctx.valid_routing("v") and "IN (0, 2)" in ctx.valid_routing("v")


def test_the_load_pass_counts_invalid_rows_and_leaves_them_out(tmp_path: Path) -> None:
    """The first load aggregate of a snapshot checks the contract in the same pass: its table is the plain
    aggregate over the valid rows, and the invalid count is the one a separate check finds."""
    from moeprobe.analysis import load
    from moeprobe.analysis.context import render_sql, sql_text

    layers = [_shape(0, 4, 1), _shape(1, 4, 1)]
    rows = [(0, 0, 3), (0, 0, 3), (0, 0, 5), (1, 0, 1), (1, 1, 1), (2, 0, 0), (1, 0, 2)]
    _invalid(tmp_path, layers, rows)
    with moeprobe.open_trace(tmp_path / "t") as trace:
        ctx = trace.context()
        assert ctx.contract_unchecked()
        fused = ctx.run(f"SELECT * FROM {load.aggregate(ctx)} ORDER BY ALL")
        assert not ctx.contract_unchecked() and ctx.count_invalid() == 3
        plain = ctx.run(render_sql(sql_text("load_agg"), ctx.sources()) + " ORDER BY ALL")  # sources: valid rows only
        assert {k: v.tolist() for k, v in fused.items()} == {k: v.tolist() for k, v in plain.items()}
        assert fused["n"].tolist() == [2, 1, 1]
