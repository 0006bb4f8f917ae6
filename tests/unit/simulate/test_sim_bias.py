"""The aux-loss-free bias update: one step by hand, and convergence towards balance on a skewed load."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate.bias import route_with_online_bias, update_bias
from moeprobe.simulate.metrics import max_vio
from moeprobe.simulate.routing import RouterConfig


def test_one_update_by_hand() -> None:
    # Load 4 2 1 1, mean 2: the busiest expert goes down, the one at the mean stays, the idle ones go up.
    bias = update_bias(np.array([0.0, 0.0, 0.5, 0.0]), np.array([4, 2, 1, 1]), rate=0.1)
    assert bias.dtype == np.float32
    assert bias.tolist() == pytest.approx([-0.1, 0.0, 0.6, 0.1])


def _skewed_logits(steps: int, tokens: int, experts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((steps * tokens, experts)).astype(np.float32)
    logits[:, :2] += 2.0  # experts 0 and 1 are everyone's favourites
    return logits, np.repeat(np.arange(steps), tokens)


def test_online_bias_converges_towards_balance() -> None:
    logits, steps = _skewed_logits(steps=200, tokens=128, experts=8)
    config = RouterConfig(top_k=2, scoring="sigmoid")
    result = route_with_online_bias(logits, steps, config, rate=0.01)
    experts = result.routed.experts

    def step_vio(step: int) -> float:
        return float(max_vio(np.bincount(experts[steps == step].ravel(), minlength=8)))

    first = step_vio(0)
    last = np.mean([step_vio(s) for s in range(180, 200)])
    assert first > 1.5  # unbalanced: the two favourites take most assignments
    assert last < 0.35  # balanced to within batch noise
    # The bias went down for the favourites and up for the others.
    assert (result.final_bias[:2] < 0).all() and (result.final_bias[2:] > 0).all()


def test_history_is_the_bias_each_step_was_routed_with() -> None:
    logits, steps = _skewed_logits(steps=5, tokens=16, experts=4, seed=1)
    rng = np.random.default_rng(2)
    order = rng.permutation(len(steps))  # tokens of different steps interleaved: replay sorts by step
    logits, steps = logits[order], steps[order]
    config = RouterConfig(top_k=1, scoring="softmax")
    result = route_with_online_bias(logits, steps, config, rate=0.05, initial_bias=np.full(4, 0.1))
    assert result.steps.tolist() == [0, 1, 2, 3, 4]
    assert result.bias[0].tolist() == pytest.approx([0.1] * 4)
    for i in range(5):
        rows = steps == i
        routed = config.route(logits[rows], bias=result.bias[i])
        assert np.array_equal(result.routed.experts[rows], routed.experts)
        following = result.bias[i + 1] if i < 4 else result.final_bias
        expected = update_bias(result.bias[i], np.bincount(routed.experts.ravel(), minlength=4), 0.05)
        assert np.array_equal(following, expected)
