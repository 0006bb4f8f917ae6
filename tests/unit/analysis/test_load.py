"""Load metrics on hand-made traces with known answers: exact MaxVio (global and per batch), CV, Gini,
entropy, top-N, dead experts, utilisation, windows, and EP balancedness in both aggregations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis.filters import Filters
from tests.support import layer_meta, routing_table, write_trace

# Layer 0 loads 4, 2, 1, 1 (c_bar 2); layer 1 is perfectly even. E = 4, k = 2, one step.
LAYER0 = np.array([[0, 1], [0, 1], [0, 2], [0, 3]])
LAYER1 = np.array([[0, 1], [2, 3], [0, 1], [2, 3]])


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> moeprobe.Trace:
    path = tmp_path_factory.mktemp("load") / "trace"
    routing = [routing_table(LAYER0, layer=0), routing_table(LAYER1, layer=1)]
    write_trace(path, {"routing": routing}, layers=layer_meta(2, 4, 2))
    return moeprobe.open_trace(path)


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> moeprobe.Trace:
    # k = 1, E = 4, three steps of four tokens: per-step MaxVio 2, 0 and 1.
    path = tmp_path_factory.mktemp("batches") / "trace"
    experts = np.array([0, 0, 0, 1, 0, 1, 2, 3, 3, 3, 2, 2])
    step = np.repeat([0, 1, 2], 4)
    write_trace(path, {"routing": routing_table(experts, step=step)}, layers=layer_meta(1, 4, 1))
    return moeprobe.open_trace(path)


def test_constructed_load_gives_exact_metrics(constructed: moeprobe.Trace) -> None:
    load = constructed.load()
    first, even = load.layer(0), load.layer(1)
    assert list(first.counts) == [4, 2, 1, 1]
    assert first.decisions == 8 and first.tokens == 4
    assert first.maxvio_global == pytest.approx(1.0)
    assert first.cv == pytest.approx(math.sqrt(1.5) / 2)
    assert first.gini == pytest.approx(0.3125)
    assert first.entropy_norm == pytest.approx(0.875)
    assert first.top_n == 2 and first.top_n_coverage == pytest.approx(0.75)  # top-N defaults to top-k
    assert list(first.utilisation) == pytest.approx([2.0, 1.0, 0.5, 0.5])
    assert first.dead == []
    assert even.maxvio_global == 0 and even.cv == 0 and even.gini == pytest.approx(0)
    assert even.entropy_norm == pytest.approx(1.0)
    assert first.first is None  # first choices cost one more pass: only when asked for
    assert list(constructed.load(first_choice=True).layer(0).first) == [4, 0, 0, 0]


def test_balancedness_in_both_aggregations(constructed: moeprobe.Trace) -> None:
    ep = constructed.ep_load(ep_size=2)
    # layer 0: ranks hold experts {0,1} and {2,3}: loads 6 and 2, mean 4 / max 6; layer 1: 4 and 4.
    assert list(ep.layer(0).loads) == [6, 2]
    assert ep.layer(0).balancedness == pytest.approx(2 / 3)
    assert ep.layer(1).balancedness == pytest.approx(1.0)
    assert ep.sglang == pytest.approx((2 / 3 + 1) / 2)  # mean of per-layer ratios
    assert ep.vllm == pytest.approx((4 + 4) / (6 + 4))  # sum of means over sum of maxima
    # a single step: the per-step forms equal the whole-window ones
    assert ep.sglang_batch == pytest.approx(ep.sglang) and ep.vllm_batch == pytest.approx(ep.vllm)
    # one expert per rank: balancedness = 1 / (1 + MaxVio)
    assert constructed.ep_load(ep_size=4).layer(0).balancedness == pytest.approx(0.5)


def test_custom_placement(constructed: moeprobe.Trace) -> None:
    ep = constructed.ep_load(ep_size=2, placement=[0, 1, 1, 0])  # {0,3} and {1,2}: 5 and 3
    assert ep.placement == "custom"
    assert list(ep.layer(0).loads) == [5, 3]
    assert ep.layer(0).balancedness == pytest.approx(4 / 5)
    assert ep.layer(0).balancedness_batch == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="placement has 3 entries"):
        constructed.ep_load(ep_size=2, placement=[0, 1, 1])


def test_maxvio_batch_mean_worst_and_global(batches: moeprobe.Trace) -> None:
    layer = batches.load().layer(0)
    assert layer.steps == 3
    assert layer.maxvio_batch_mean == pytest.approx(1.0)  # (2 + 0 + 1) / 3
    assert layer.maxvio_batch_worst == pytest.approx(2.0) and layer.worst_step == 0
    assert list(layer.counts) == [4, 2, 3, 3]
    assert layer.maxvio_global == pytest.approx(1 / 3)
    # the baseline is simulated on the same batch sizes (three steps of 4 tokens, E=4, k=1)
    assert 0.5 < layer.random_maxvio_batch < 1.5


def test_windows_over_steps(batches: moeprobe.Trace) -> None:
    load = batches.load(window_steps=2)
    assert load.window_steps == 2
    w0, w1 = load.layer(0).windows
    assert (w0.first_step, w0.last_step, w1.first_step, w1.last_step) == (0, 1, 2, 2)
    assert w0.maxvio_global == pytest.approx(1.0)  # loads 4, 2, 1, 1
    assert w0.maxvio_batch == pytest.approx(1.0)  # mean of 2 and 0
    assert w1.maxvio_global == pytest.approx(1.0) and w1.cv == pytest.approx(1.0)  # loads 0, 0, 2, 2


def test_dead_experts_in_a_step_range(batches: moeprobe.Trace) -> None:
    layer = batches.load(Filters(steps=(2, 3))).layer(0)
    assert layer.dead == [0, 1]
    assert list(layer.counts) == [0, 0, 2, 2]


def test_dropped_choices_still_count_as_load(tmp_path: Path) -> None:
    routing = routing_table(np.array([0, 0, 0, 1]))
    routing = routing.set_column(routing.schema.get_field_index("dropped"), "dropped", pa.array([False, True, True, False]))
    write_trace(tmp_path / "t", {"routing": routing}, layers=layer_meta(1, 4, 1))
    layer = moeprobe.open_trace(tmp_path / "t").load().layer(0)
    assert layer.dropped == 2
    assert list(layer.counts) == [3, 1, 0, 0]  # what the router asked for, drops included


def test_ranks_add_up_and_filter(tmp_path: Path) -> None:
    path = tmp_path / "trace"
    meta = layer_meta(1, 4, 1)
    write_trace(path, {"routing": routing_table(np.array([0, 0, 1]))}, layers=meta, world_size=2)
    write_trace(path, {"routing": routing_table(np.array([2, 3, 3]))}, layers=meta, rank=1, world_size=2)
    trace = moeprobe.open_trace(path)
    assert list(trace.load().layer(0).counts) == [2, 1, 1, 2]
    assert list(trace.load(Filters(ranks=(1,))).layer(0).counts) == [0, 0, 1, 2]
