"""Latency quantiles per layer and phase, and how block time tracks the step's busiest expert."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace

STEPS = 100


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> moeprobe.Trace:
    # Step s routes m_s = 1 + s % 5 tokens to expert 0 and one to each of experts 1..3 (k = 1, E = 4), so the
    # busiest expert carries m_s; block time is 2 m_s + 1 ms exactly. Router time is s + 1 ms.
    busiest = 1 + np.arange(STEPS) % 5
    experts = np.concatenate([np.r_[np.zeros(m, int), 1, 2, 3] for m in busiest])
    step = np.repeat(np.arange(STEPS), busiest + 3)
    phases = ["prefill" if s < 50 else "decode" for s in range(STEPS)]
    tables = {
        "routing": routing_table(experts, step=step, sequence=step, position=np.zeros(len(step))),
        "latency": pa.table(
            {"step": np.arange(STEPS), "layer": np.zeros(STEPS), "router_ms": np.arange(STEPS) + 1.0,
             "block_ms": 2.0 * busiest + 1, "clock": ["cuda_event"] * STEPS},
            schema=TABLES["latency"],
        ),
        "steps": pa.table(
            {"step": np.arange(STEPS), "phase": phases, "batch": np.ones(STEPS), "tokens": busiest + 3,
             "started_at": np.arange(STEPS, dtype=float), "wall_ms": np.ones(STEPS)},
            schema=TABLES["steps"],
        ),
    }
    path = tmp_path_factory.mktemp("latency") / "trace"
    write_trace(path, tables, layers=layer_meta(1, 4, 1))
    return moeprobe.open_trace(path)


def test_quantiles_per_layer(trace: moeprobe.Trace) -> None:
    lat = trace.latency_summary()
    assert lat.clocks == ["cuda_event"] and lat.steps == STEPS
    router = lat.layer(0).router
    # linear interpolation over 1..100 (quantile_cont)
    assert (router.n, router.p50, router.p90, router.p99, router.max) == (100, 50.5, pytest.approx(90.1), pytest.approx(99.01), 100.0)
    assert lat.layer(0).block.max == 11.0


def test_prefill_and_decode_are_split_by_the_steps_table(trace: moeprobe.Trace) -> None:
    phases = trace.latency_summary().layer(0).by_phase
    assert set(phases) == {"prefill", "decode"}
    assert phases["prefill"][0].p50 == 25.5 and phases["decode"][0].p50 == 75.5


def test_block_time_tracks_the_busiest_expert(trace: moeprobe.Trace) -> None:
    layer = trace.latency_summary().layer(0)
    assert layer.load_n == STEPS
    assert layer.load_r == pytest.approx(1.0)
    assert layer.load_slope_ms == pytest.approx(2.0)


def test_moe_time_per_step(trace: moeprobe.Trace) -> None:
    per_step = trace.latency_summary().moe_ms_per_step
    assert per_step.n == STEPS and per_step.max == 11.0 and per_step.p50 == 7.0
