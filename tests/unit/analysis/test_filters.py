"""Filters (steps, phase, tags, layers, ranks) apply the same way to every analysis; bad ones fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis.filters import FilterError, Filters, parse_steps, parse_tag
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace

# k = 1, E = 4. Step 0 (prefill): sequence 0 -> expert 0 three times, sequence 1 -> expert 1 three times.
# Step 1 (decode): one token each, experts 2 and 3. Step 2 (prefill): sequence 2 -> expert 3 twice.
EXPERTS = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
STEP = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
SEQUENCE = np.array([0, 0, 0, 1, 1, 1, 0, 1, 2, 2])
POSITION = np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
PHASE = ["prefill"] * 6 + ["decode"] * 2 + ["prefill"] * 2


def _tables() -> dict[str, object]:
    routing = [
        routing_table(EXPERTS, step=STEP, sequence=SEQUENCE, position=POSITION, phase=PHASE, layer=layer)
        for layer in (0, 1)
    ]
    tags = pa.table({"sequence": [0, 1, 2], "key": ["domain"] * 3, "value": ["code", "math", "code"]}, schema=TABLES["tags"])
    steps = pa.table(
        {"step": [0, 1, 2], "phase": ["prefill", "decode", "prefill"], "batch": [2, 2, 1], "tokens": [6, 2, 2],
         "started_at": [0.0, 1.0, 2.0], "wall_ms": [1.0, 1.0, 1.0]},
        schema=TABLES["steps"],
    )
    latency = pa.table(
        {"step": [0, 0, 1, 1, 2, 2], "layer": [0, 1] * 3, "router_ms": [1.0] * 6,
         "block_ms": [10.0 * s + layer for s in (0, 1, 2) for layer in (0, 1)], "clock": ["perf_counter"] * 6},
        schema=TABLES["latency"],
    )
    return {"routing": routing, "tags": tags, "steps": steps, "latency": latency}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> moeprobe.Trace:
    path = tmp_path_factory.mktemp("filters") / "trace"
    write_trace(path, _tables(), layers=layer_meta(2, 4, 1))
    return moeprobe.open_trace(path)


@pytest.mark.parametrize(
    ("filters", "counts"),
    [
        (Filters(), [3, 3, 1, 3]),
        (Filters(phase="decode"), [0, 0, 1, 1]),
        (Filters(steps=(0, 1)), [3, 3, 0, 0]),
        (Filters(steps=(1, None)), [0, 0, 1, 3]),
        (Filters(tags=(("domain", "code"),)), [3, 0, 1, 2]),
        (Filters(tags=(("domain", "code"),), phase="prefill"), [3, 0, 0, 2]),
        (Filters(tags=(("domain", "code"), ("domain", "math"))), [0, 0, 0, 0]),
    ],
)
def test_filters_select_the_right_decisions(trace: moeprobe.Trace, filters: Filters, counts: list[int]) -> None:
    layers = trace.load(filters).layers
    if sum(counts) == 0:
        assert layers == []
    else:
        assert list(layers[0].counts) == counts


def test_layer_filter_keeps_only_those_layers(trace: moeprobe.Trace) -> None:
    assert [item.layer for item in trace.load(Filters(layers=(1,))).layers] == [1]


def test_latency_follows_step_phase_and_tag_filters(trace: moeprobe.Trace) -> None:
    assert trace.latency_summary(Filters(phase="decode")).layer(1).block.p50 == 11.0
    # a step's timing can be attributed to a tag only when every sequence in it carries the tag:
    # steps 0 and 1 mix code and math, step 2 is all code
    tagged = trace.latency_summary(Filters(tags=(("domain", "code"),)))
    assert tagged.layer(0).block.n == 1 and tagged.layer(0).block.p50 == 20.0
    assert trace.latency_summary(Filters(steps=(0, 2))).layer(0).block.max == 10.0


def test_unknown_layer_or_rank_is_an_error_not_an_empty_result(trace: moeprobe.Trace) -> None:
    with pytest.raises(FilterError, match=r"layer 5 is not in this trace \(layers: 0\.\.1\)"):
        trace.load(Filters(layers=(5,)))
    with pytest.raises(FilterError, match="rank 3 is not in this trace"):
        trace.load(Filters(ranks=(3,)))
    with pytest.raises(FilterError, match="phase 'train'"):
        Filters(phase="train")


def test_parsing_steps_and_tags() -> None:
    assert parse_steps("2:5") == (2, 5)
    assert parse_steps("3") == (3, 4)
    assert parse_steps(":4") == (None, 4) and parse_steps("5:") == (5, None)
    with pytest.raises(FilterError, match="expected A:B"):
        parse_steps("a:b")
    with pytest.raises(FilterError, match="empty"):
        parse_steps("5:2")
    assert parse_tag("domain=code") == ("domain", "code")
    with pytest.raises(FilterError, match="key=value"):
        parse_tag("domain")


def test_tag_values_with_quotes_are_literals_not_sql(tmp_path: Path) -> None:
    tags = pa.table({"sequence": [0], "key": ["domain"], "value": ["it's"]}, schema=TABLES["tags"])
    write_trace(tmp_path / "t", {"routing": routing_table(np.array([1, 2])), "tags": tags}, layers=layer_meta(1, 4, 1))
    trace = moeprobe.open_trace(tmp_path / "t")
    assert list(trace.load(Filters(tags=(("domain", "it's"),))).layer(0).counts) == [0, 1, 1, 0]


def test_a_trace_still_being_written_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "live"
    write_trace(path, {"routing": routing_table(np.array([0, 1, 1]))}, layers=layer_meta(1, 4, 1), status=None)
    trace = moeprobe.open_trace(path)
    assert trace.status == "running"
    assert list(trace.load().layer(0).counts) == [1, 2, 0, 0]
    empty = tmp_path / "empty"
    write_trace(empty, {}, layers=layer_meta(1, 4, 1), status=None)
    report = moeprobe.open_trace(empty).summary()
    assert report["layers"] == [] and report["overall"]["decisions"] == 0 and report["latency"] is None
