"""Strategy specs, and running strategies on a layer built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate.data import BiasHistory, LayerData
from moeprobe.simulate.routing import sigmoid_group_topk
from moeprobe.simulate.strategies import StrategyError, parse_strategy, run_strategy

DEEPSEEK = {"index": 3, "name": "mlp", "num_experts": 16, "top_k": 4, "scoring": "sigmoid", "n_group": 4,
            "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "has_bias": True}


def test_parse_specs() -> None:
    s = parse_strategy("reroute:k=2,bias=zero")
    assert (s.routing.name, s.routing.params, s.capacity) == ("reroute", {"k": 2, "bias": "zero"}, None)
    assert s.needs_scores and not s.needs_recorded_bias
    s = parse_strategy("topk:k=1 + capacity:cf=1.25,order=score")
    assert s.routing.params["k"] == 1 and s.capacity is not None and s.capacity.params["cf"] == 1.25
    s = parse_strategy("capacity:slots=4,group=sequence")
    assert s.routing.name == "recorded" and not s.needs_scores
    assert parse_strategy("online-bias:init=recorded").needs_recorded_bias
    assert parse_strategy("online-bias").routing.params == {"u": 0.001, "init": "zero", "k": None}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magic", "unknown strategy 'magic'"),
        ("reroute:k=0", "k='0' should be an integer >= 1"),
        ("reroute:x=1", "unknown option 'x'"),
        ("reroute:k", "expected KEY=VALUE"),
        ("topk", "needs k=K"),
        ("capacity:order=position", "exactly one of cf"),
        ("capacity:cf=-1", "cf='-1' should be a number > 0"),
        ("capacity:cf=1,order=random", "order='random' should be one of position, score"),
        ("capacity:cf=1+reroute", "routing stage comes first"),
        ("reroute+topk:k=2", "at most one routing stage"),
        ("online-bias:u=0", "u='0' should be a number > 0"),
        ("reroute+", "empty strategy"),
        ("capacity:slots=2,second=random", "needs cf"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(StrategyError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_strategy(text)


def _deepseek_layer(rng: np.random.Generator) -> LayerData:
    """8 steps of 32 tokens; the bias changes at step 4. Recorded choices come from the exact router."""
    tokens, steps = 256, np.repeat(np.arange(8), 32)
    logits = rng.standard_normal((tokens, 16)).astype(np.float32)
    bias = (rng.standard_normal((2, 16)) * 0.3).astype(np.float32)
    experts = np.empty((tokens, 4), np.int32)
    weights = np.empty((tokens, 4), np.float32)
    for i, rows in enumerate((steps < 4, steps >= 4)):
        routed = sigmoid_group_topk(logits[rows], 4, bias=bias[i], n_group=4, topk_group=2, routed_scaling_factor=2.5)
        experts[rows], weights[rows] = routed.experts[:, ::-1], routed.weights[:, ::-1]  # any k order
    zeros = np.zeros(tokens, np.int64)
    return LayerData(
        index=3, meta=DEEPSEEK, step=steps, sequence=zeros, position=np.arange(tokens), rank=zeros,
        token_id=zeros, phase=zeros.astype(np.int8), experts=experts, weights=weights,
        dropped=np.zeros((tokens, 4), bool), scores=logits,
        bias=BiasHistory(rank=np.zeros(2, np.int64), steps=np.array([0, 4]), bias=bias),
    )


def test_reroute_with_recorded_bias_reproduces_recorded_choices() -> None:
    layer = _deepseek_layer(np.random.default_rng(0))
    for text in ("reroute", "reroute:bias=recorded"):
        sim = run_strategy(parse_strategy(text), layer)
        assert np.array_equal(np.sort(sim.experts, 1), np.sort(layer.experts, 1))
        np.testing.assert_allclose(np.sort(sim.weights, 1), np.sort(layer.weights, 1), rtol=1e-6)
        assert not sim.notes


def test_reroute_with_zero_bias_gives_unbalanced_choices() -> None:
    layer = _deepseek_layer(np.random.default_rng(1))
    sim = run_strategy(parse_strategy("reroute:bias=zero"), layer)
    plain = sigmoid_group_topk(layer.scores, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    assert np.array_equal(sim.experts, plain.experts)
    assert (np.sort(sim.experts, 1) != np.sort(layer.experts, 1)).any()


def test_other_k_online_bias_and_capacity() -> None:
    layer = _deepseek_layer(np.random.default_rng(2))
    assert run_strategy(parse_strategy("topk:k=2"), layer).experts.shape == (256, 2)
    online = run_strategy(parse_strategy("online-bias:u=0.01,init=recorded"), layer)
    assert online.bias is not None and online.bias_steps is not None
    assert online.bias_steps.tolist() == list(range(8))
    assert np.array_equal(online.bias[0], layer.bias.bias[0])  # type: ignore[union-attr]
    capped = run_strategy(parse_strategy("capacity:cf=1.0"), layer)
    assert capped.experts is layer.experts and capped.dropped.any()
    # Capacity per step (32 tokens x 4 / 16 experts = 8 slots): no expert keeps more than 8 per step.
    for step in range(8):
        rows = layer.step == step
        kept = capped.experts[rows][~capped.dropped[rows]]
        assert np.bincount(kept, minlength=16).max() <= 8


def test_errors_name_the_layer() -> None:
    layer = _deepseek_layer(np.random.default_rng(3))
    with pytest.raises(StrategyError, match="layer 3"):
        run_strategy(parse_strategy("topk:k=9"), layer)  # more than the 2 kept groups x 4 experts hold
    layer.scores = None
    with pytest.raises(StrategyError, match="needs router scores"):
        run_strategy(parse_strategy("reroute"), layer)
    with pytest.raises(StrategyError, match="top-2"):
        run_strategy(parse_strategy("capacity:cf=1,second=random"), _deepseek_layer(np.random.default_rng(4)))
