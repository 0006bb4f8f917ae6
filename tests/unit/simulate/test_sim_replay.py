"""Reading hand-made traces (written through the real writer) into numpy, replaying, writing back.

The DeepSeek-style trace is recorded by transformers' own ``DeepseekV3TopkRouter`` (identity weight, so
its input is its logits), with the bias changing half-way, as the demo model's captures will be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeprobe.analysis.session import open_trace
from moeprobe.simulate import replay
from moeprobe.simulate.deployment import EplbOptions, evaluate_placement
from moeprobe.simulate.strategies import parse_strategy
from tests.support import layer_meta, routing_table, write_trace

torch = pytest.importorskip("torch")
modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

E, K, GROUPS, KEEP, STEPS, PER_STEP = 16, 4, 4, 2, 4, 24


def _deepseek_router(bias: np.ndarray) -> torch.nn.Module:
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS,
                              topk_group=KEEP, norm_topk_prob=True, routed_scaling_factor=2.5)
    router = modeling.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return router


def _record(logits: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        _, weights, idx = _deepseek_router(bias)(torch.from_numpy(logits))
    return idx.numpy(), weights.numpy()


def write_deepseek_trace(path: Path, *, seed: int = 0, scores: bool = True, drop_score_of: int | None = None,
                         rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Two layers; layer L's bias is b[L, 0] for steps 0-1 and b[L, 1] from step 2 on."""
    rng = np.random.default_rng(seed)
    tokens = STEPS * PER_STEP
    step = np.repeat(np.arange(STEPS), PER_STEP)
    sequence = np.tile(np.arange(4), tokens // 4) + 10 * rank
    position = np.repeat(np.arange(tokens // 4), 4)
    logits = rng.standard_normal((2, tokens, E)).astype(np.float32)
    bias = (rng.standard_normal((2, 2, E)) * 0.3).astype(np.float32)
    routing, score_rows, bias_rows = [], [], []
    for layer in range(2):
        experts = np.empty((tokens, K), np.int64)
        weights = np.empty((tokens, K), np.float32)
        for half, rows in enumerate((step < 2, step >= 2)):
            experts[rows], weights[rows] = _record(logits[layer][rows], bias[layer, half])
        routing.append(routing_table(experts, weights=weights, step=step, sequence=sequence, position=position,
                                     layer=layer))
        keep = np.ones(tokens, bool)
        if drop_score_of is not None:
            keep[drop_score_of] = False
        order = rng.permutation(np.flatnonzero(keep))  # rows in any order: the reader joins on keys
        score_rows.append(replay.scores_table(step[order], sequence[order], position[order], layer,
                                              logits[layer][order]))
        bias_rows.append(replay.bias_table(np.array([0, 2]), layer, bias[layer]))
    tables = {"routing": routing, "bias": bias_rows}
    if scores:
        tables["scores"] = score_rows
    layers = layer_meta(2, E, K, scoring="sigmoid", n_group=GROUPS, topk_group=KEEP, norm_topk_prob=True,
                        routed_scaling_factor=2.5, has_bias=True)
    write_trace(path, tables, layers=layers, rank=rank, world_size=world_size,
                model={"name": "tiny-deepseek", "family": "deepseek_v3"})
    return {"logits": logits, "bias": bias, "step": step}


def test_reroute_with_recorded_bias_reproduces_the_capture(tmp_path: Path) -> None:
    truth = write_deepseek_trace(tmp_path / "t")
    with open_trace(tmp_path / "t") as trace:
        data = replay.load_layers(trace, scores=True)
        # The loaded scores are the recorded logits, re-ordered to the routing's token order.
        loaded = np.sort(np.concatenate([layer.scores for layer in data.layers]), axis=0)  # type: ignore[misc]
        assert np.array_equal(loaded, np.sort(truth["logits"].reshape(-1, E), axis=0))
        assert [layer.index for layer in data.layers] == [0, 1]
        for layer in data.layers:
            sim = replay.run(parse_strategy("reroute"), replay.ReplayInput(trace, [layer], (None, None)))[0]
            assert np.array_equal(np.sort(sim.experts, 1), np.sort(layer.experts, 1))
            # The trace keeps weights to half precision's 11 significant bits (format v2's default): the bound.
            np.testing.assert_allclose(np.sort(sim.weights, 1), np.sort(layer.weights, 1), rtol=2.0**-11)
            # Zero bias: what transformers' router gives without balancing.
            zero = replay.run(parse_strategy("reroute:bias=zero"), replay.ReplayInput(trace, [layer], (None, None)))[0]
            assert layer.scores is not None
            expected, _ = _record(layer.scores, np.zeros(E, np.float32))
            assert np.array_equal(np.sort(zero.experts, 1), np.sort(expected, 1))


def test_selection_and_missing_data(tmp_path: Path) -> None:
    write_deepseek_trace(tmp_path / "t", drop_score_of=5)
    with open_trace(tmp_path / "t") as trace:
        data = replay.load_layers(trace, window=(1, 3), layers=[1])
        assert [layer.index for layer in data.layers] == [1]
        assert sorted(set(data.layers[0].step.tolist())) == [1, 2]
        assert data.layers[0].scores is None
        data = replay.load_layers(trace, scores=True)
        assert data.layers[0].tokens == STEPS * PER_STEP - 1  # token 5 has no scores: left out, and said so
        assert "1 of 96 tokens have no scores" in data.notes[0]
        with pytest.raises(replay.MissingDataError, match="no MoE layer 7"):
            replay.load_layers(trace, layers=[7])
        with pytest.raises(replay.MissingDataError, match="no routing recorded in steps 50:"):
            replay.load_layers(trace, window=(50, None))
    write_deepseek_trace(tmp_path / "plain", scores=False)
    with open_trace(tmp_path / "plain") as trace, pytest.raises(replay.MissingDataError, match="moeprobe record --logits"):
        replay.load_layers(trace, scores=True)


def test_write_simulated_trace_round_trip(tmp_path: Path) -> None:
    write_deepseek_trace(tmp_path / "t")
    strategy = parse_strategy("online-bias:u=0.01,k=2+capacity:cf=1.0")
    with open_trace(tmp_path / "t") as trace:
        data = replay.load_layers(trace, window=(1, None), scores=True)
        sims = replay.run(strategy, data)
        out = replay.write_simulated_trace(data, sims, strategy, tmp_path / "sim")
    with open_trace(out) as sim_trace:
        manifest = sim_trace.manifest
        assert manifest["status"] == "complete"
        assert manifest["options"]["simulated_from"]["strategy"] == strategy.text
        assert manifest["options"]["simulated_from"]["steps"] == "1:"
        assert [meta["top_k"] for meta in manifest["layers"]] == [2, 2]
        assert manifest["model"]["name"] == "tiny-deepseek"
        back = replay.load_layers(sim_trace)
        for layer, sim in zip(back.layers, sims, strict=True):
            assert np.array_equal(layer.experts, sim.experts)
            assert np.array_equal(layer.dropped, sim.dropped)
            np.testing.assert_array_equal(layer.weights, sim.weights)
        bias = sim_trace.sql("SELECT step, layer FROM bias ORDER BY layer, step").to_pydict()
        assert bias["step"] == [1, 2, 3, 1, 2, 3]
    with open_trace(tmp_path / "t") as trace:
        data = replay.load_layers(trace)
        with pytest.raises(Exception, match="already exists"):
            replay.write_simulated_trace(data, replay.run(parse_strategy("recorded"), data),
                                         parse_strategy("recorded"), tmp_path / "sim")


def test_eplb_on_a_two_rank_trace(tmp_path: Path) -> None:
    write_deepseek_trace(tmp_path / "t", seed=1, rank=0, world_size=2)
    write_deepseek_trace(tmp_path / "t", seed=2, rank=1, world_size=2)
    with open_trace(tmp_path / "t") as trace:
        data = replay.load_layers(trace)
        assert data.world_size == 2 and set(data.layers[0].rank.tolist()) == {0, 1}
        report = evaluate_placement(data.layers, EplbOptions.parse("gpus=4,redundant=4,nodes=2,plan=0:2"),
                                    data.world_size)
    assert report["policy"] == "hierarchical" and report["groups"] == GROUPS  # from the manifest's n_group
    assert report["plan_steps"] == [0, 1] and report["eval_steps"] == [2, 3]
    assert report["origin"] == "rank"
    assert np.asarray(report["phy2log"]).shape == (2, 20)
    # Every assignment of the evaluation window is sent somewhere, from the two source ranks only.
    matrix = np.asarray(report["eplb"]["traffic"]["matrix"])
    assert matrix.sum() == 2 * 2 * (STEPS // 2) * PER_STEP * K
    assert matrix[2:].sum() == 0
    assert np.asarray(report["eplb"]["gpu_load"]).sum() == matrix.sum()
