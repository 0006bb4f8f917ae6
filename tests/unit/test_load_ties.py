"""Ties in the worst MaxVio_batch step resolve to the earliest step, whatever order the aggregate's rows are in
(DuckDB's threads, or a distributed merge, decide that order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis import load as load_mod
from tests.support import layer_meta, routing_table, write_trace

# steps 7, 2 and 5 route both tokens to expert 0 (MaxVio_batch 1.0, the worst); steps 1 and 3 are balanced
STEPS = {7: [0, 0], 1: [0, 1], 5: [0, 0], 2: [0, 0], 3: [1, 0]}


@pytest.mark.parametrize("order", [sorted(STEPS), sorted(STEPS, reverse=True), [7, 1, 5, 2, 3]])
def test_the_worst_step_of_a_tie_is_the_earliest(tmp_path: Path, order: list[int]) -> None:
    parts = [routing_table(np.array([[e] for e in STEPS[s]]), step=np.array([s, s]), sequence=np.array([s, s + 100]),
                           position=np.array([0, 0])) for s in STEPS]
    write_trace(tmp_path / "t", {"routing": parts}, layers=layer_meta(1, 2, 1))
    with moeprobe.open_trace(tmp_path / "t") as trace:
        ctx = trace.context()
        # the per-step table (step, layer, busiest expert's load, total, tokens, MaxVio_batch), rows in this order
        top = [max(STEPS[s].count(0), STEPS[s].count(1)) for s in order]
        ctx.seed("steps_load", pa.table({
            "step": pa.array(order, pa.int32()), "layer": pa.array([0] * len(order), pa.int16()),
            "top": pa.array(top, pa.int64()), "total": pa.array([2] * len(order), pa.int64()),
            "tokens": pa.array([2] * len(order), pa.int64()), "maxvio": pa.array([t * 2 / 2 - 1 for t in top], pa.float64())}))
        layer = load_mod.compute(ctx).layers[0]
    assert layer.maxvio_batch_worst == 1.0 and layer.worst_step == 2
