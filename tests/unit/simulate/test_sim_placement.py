"""Placement, per-GPU load, traffic, load metrics and load estimation on small hand-made loads."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate import metrics
from moeprobe.simulate.eplb import plan_eplb
from moeprobe.simulate.loads import LoadEstimate, estimate_load
from moeprobe.simulate.placement import (
    balancedness,
    contiguous_placement,
    gpu_load,
    replicated_experts,
    traffic_matrix,
)


def test_contiguous_gpu_load_and_balancedness() -> None:
    load = np.array([[8, 0, 2, 2], [1, 1, 1, 1]])
    placement = contiguous_placement(2, 4, 2)
    per_gpu = gpu_load(load, placement)
    assert per_gpu.tolist() == [[8.0, 4.0], [2.0, 2.0]]
    assert balancedness(per_gpu).tolist() == [0.75, 1.0]
    assert placement.log2phy.tolist() == [[[0], [1], [2], [3]]] * 2
    with pytest.raises(ValueError, match="divide evenly"):
        contiguous_placement(1, 6, 4)


def test_replicas_share_load_and_traffic() -> None:
    # One layer, 4 experts, 6 slots on 2 GPUs: the global hand-worked case of test_sim_eplb.
    load = np.array([[10, 20, 30, 40]])
    plan = plan_eplb(load, 6, 1, 1, 2)
    assert plan.phy2log.tolist() == [[1, 3, 0, 3, 2, 2]]
    assert replicated_experts(plan) == [
        {"layer": 0, "expert": 2, "replicas": 2, "gpus": [1, 1]},
        {"layer": 0, "expert": 3, "replicas": 2, "gpus": [0, 1]},
    ]
    # Tokens of source 0 go to experts 0 and 3, of source 1 to expert 2 only.
    source = np.array([[[10, 0, 0, 40], [0, 0, 30, 0]]])
    traffic = traffic_matrix(source, plan)
    # Expert 0 lives on GPU 0; expert 3 is split 20/20; expert 2 has both replicas on GPU 1.
    assert traffic.tolist() == [[[30.0, 20.0], [0.0, 30.0]]]
    assert traffic.sum() == source.sum()


def test_load_metrics() -> None:
    load = np.array([4, 2, 1, 1])
    assert metrics.max_vio(load) == pytest.approx(1.0)  # (4 - 2) / 2
    assert metrics.cv(load) == pytest.approx(np.std([4, 2, 1, 1]) / 2)
    assert balancedness(load) == pytest.approx(1 / (1 + metrics.max_vio(load)))
    assert metrics.max_vio(np.zeros(4)) == 0.0
    experts = np.array([[0, 1], [0, 2], [3, -1]])
    dropped = np.array([[False, True], [False, False], [False, False]])
    assert metrics.expert_load(experts, 4, dropped).tolist() == [2, 0, 1, 1]
    assert metrics.dropped_share(experts, dropped) == pytest.approx(1 / 5)
    per_step = metrics.step_loads(experts, np.array([0, 1, 1]), 2, 4)
    assert per_step.tolist() == [[1, 1, 0, 0], [1, 0, 1, 1]]


def test_changed_tokens_and_mass_lost() -> None:
    recorded = np.array([[0, 1], [2, 3], [0, 1]])
    weights = np.array([[0.75, 0.25], [0.5, 0.5], [0.6, 0.2]])
    simulated = np.array([[1, 0], [2, 0], [0, 1]])  # same set (order differs), one expert swapped, same
    dropped = np.array([[False, False], [False, False], [True, False]])
    assert metrics.changed_tokens(recorded, simulated).tolist() == [False, True, False]
    # Token 1 loses expert 3 (half its weight); token 2 keeps its experts but expert 0 is dropped: 0.6/0.8.
    assert metrics.mass_lost(recorded, weights, simulated, dropped).tolist() == pytest.approx([0.0, 0.5, 0.75])
    # A different k compares as sets too.
    assert metrics.changed_tokens(recorded, np.array([[0], [2], [1]])).tolist() == [True, True, True]


def test_load_estimates() -> None:
    counts = np.array([[4.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
    assert estimate_load(counts).tolist() == [6.0, 6.0]
    assert estimate_load(counts, LoadEstimate.parse("last:2")).tolist() == [2.0, 6.0]
    # ema alpha 0.5: start [4, 0] -> [2, 2] -> [2, 2]
    assert estimate_load(counts, LoadEstimate.parse("ema:0.5")).tolist() == [2.0, 2.0]
    assert str(LoadEstimate.parse("ema:0.25")) == "ema:0.25"
    for bad in ("ema:0", "last:0", "mean", "sum:3"):
        with pytest.raises(ValueError, match="load estimate"):
            LoadEstimate.parse(bad)
