"""Routing functions: hand-worked answers, and the transformers routers themselves as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeprobe.simulate import routing
from moeprobe.simulate.routing import RouterConfig, reroute, sigmoid_group_topk, softmax_topk, topk

torch = pytest.importorskip("torch")


def _router_logits(router: torch.nn.Module, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a transformers router whose weight is the identity, so its input is its logits."""
    with torch.no_grad():
        out = router(torch.from_numpy(logits))
    return out


def _by_expert(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Choices as sets: sorted by expert index, weights carried along."""
    order = np.argsort(experts, axis=1)
    return np.take_along_axis(experts, order, 1), np.take_along_axis(weights, order, 1)


# -- hand-worked ------------------------------------------------------------------------------------
def test_topk_orders_by_value_and_prefers_lower_index_on_ties() -> None:
    values = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert topk(values, 2).tolist() == [[1, 2], [0, 1], [0, 1]]
    wide = np.tile(np.arange(40, dtype=np.float32), (2, 1))
    wide[1, 5] = 39.0  # a tie with the largest value on the fast (partition) path
    assert topk(wide, 3).tolist() == [[39, 38, 37], [5, 39, 38]]


def test_softmax_topk_hand_worked() -> None:
    logits = np.array([[0.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    routed = softmax_topk(logits, 2)
    assert routed.experts.tolist() == [[1, 2]]
    e2, e1 = math.exp(2.0), math.exp(1.0)
    assert routed.weights[0] == pytest.approx([e2 / (e2 + e1), e1 / (e2 + e1)], rel=1e-6)
    raw = softmax_topk(logits, 2, norm_topk_prob=False)
    total = sum(math.exp(v) for v in (0.0, 2.0, 1.0, -1.0))
    assert raw.weights[0] == pytest.approx([e2 / total, e1 / total], rel=1e-6)


def test_deepseek_groups_and_bias_hand_worked() -> None:
    # 8 experts in 4 groups of 2, keep 2 groups, choose 2 experts; logits chosen so sigmoids are easy to
    # rank: groups score 0+1: s(3)+s(-3)=1.0, 2+3: s(2)+s(1), 4+5: s(2.5)+s(2.5), 6+7: s(0)+s(0)=1.0.
    logits = np.array([[3.0, -3.0, 2.0, 1.0, 2.5, 2.5, 0.0, 0.0]], dtype=np.float32)
    plain = sigmoid_group_topk(logits, 2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    # Kept groups: {4,5} (1.848) and {2,3} (1.612); expert 0 (the single best score) is in a dropped group.
    assert plain.experts.tolist() == [[4, 5]]
    assert plain.weights.sum() == pytest.approx(2.0, rel=1e-6)  # normalised, times the scaling factor
    bias = np.zeros(8, np.float32)
    bias[6] = 0.7  # group {6,7} scores 1.2 + 0.5 = 1.7 > 1.612 of {2,3}; expert 6 (1.2) beats 4 and 5 (0.924)
    biased = sigmoid_group_topk(logits, 2, bias=bias, n_group=4, topk_group=2, norm_topk_prob=False)
    assert biased.experts.tolist() == [[6, 4]]  # 4 and 5 tie: the lower index wins
    # Weights stay the unbiased sigmoid: s(0) = 0.5 for expert 6.
    assert biased.weights[0].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2.5))], rel=1e-6)


def test_reroute_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="top_k"):
        reroute(np.zeros((2, 4), np.float32), top_k=5)
    with pytest.raises(ValueError, match="scoring"):
        reroute(np.zeros((2, 4), np.float32), top_k=1, scoring="nope")
    with pytest.raises(ValueError, match="bias"):
        reroute(np.zeros((2, 4), np.float32), top_k=1, bias=np.zeros(3))


def test_chunked_and_threaded_routing_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((1000, 32)).astype(np.float32)
    whole = reroute(logits, top_k=4, scoring="sigmoid", n_group=4, topk_group=2)
    monkeypatch.setattr(routing, "CHUNK_ROWS", 64)
    for threads in (1, 3):
        parts = reroute(logits, top_k=4, scoring="sigmoid", n_group=4, topk_group=2, threads=threads)
        assert np.array_equal(parts.experts, whole.experts)
        assert np.array_equal(parts.weights, whole.weights)


def test_router_config_from_manifest_layer() -> None:
    meta = {"top_k": 8, "num_experts": 256, "scoring": "sigmoid", "n_group": 8, "topk_group": 4,
            "norm_topk_prob": True, "routed_scaling_factor": 2.5, "has_bias": True}
    config = RouterConfig.from_layer(meta, top_k=4)
    assert config == RouterConfig(top_k=4, scoring="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
                                  routed_scaling_factor=2.5)
    assert RouterConfig.from_layer({"top_k": 1, "scoring": "softmax_top1"}).norm_topk_prob is False


# -- transformers' own routers as the reference -------------------------------------------------------
@pytest.mark.parametrize(
    ("experts", "n_group", "topk_group", "top_k", "bias_scale"),
    [(64, 8, 4, 6, 0.05), (16, 4, 2, 4, 0.2), (32, 1, 1, 8, 0.1), (64, 8, 4, 6, 0.0), (256, 8, 4, 8, 0.02)],
)
def test_sigmoid_matches_deepseek_v3_topk_router(
    experts: int, n_group: int, topk_group: int, top_k: int, bias_scale: float
) -> None:
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=experts, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    router = modeling.DeepseekV3TopkRouter(config)
    rng = np.random.default_rng(experts + top_k)
    bias = (rng.standard_normal(experts) * bias_scale).astype(np.float32)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))  # router_logits = hidden_states
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    logits = (rng.standard_normal((4096, experts)) * 1.5).astype(np.float32)
    ref_logits, ref_weights, ref_idx = _router_logits(router, logits)
    assert np.array_equal(ref_logits.numpy(), logits)

    mine = reroute(logits, top_k=top_k, scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group,
                   norm_topk_prob=True, routed_scaling_factor=2.5)
    # torch.topk(sorted=False) leaves the order of the k choices unspecified: compare them as sets.
    ref_e, ref_w = _by_expert(ref_idx.numpy(), ref_weights.numpy())
    my_e, my_w = _by_expert(mine.experts, mine.weights)
    assert np.array_equal(my_e, ref_e)
    np.testing.assert_allclose(my_w, ref_w, rtol=2e-6, atol=1e-7)


def test_softmax_matches_mixtral_and_qwen_routers() -> None:
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((4096, 16)) * 2).astype(np.float32)
    cases = [
        (MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=16, num_experts_per_tok=2)), True),
        (Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=16, num_experts_per_tok=4,
                                           norm_topk_prob=False)), False),
    ]
    for router, norm in cases:
        with torch.no_grad():
            router.weight.copy_(torch.eye(16))
        _, ref_weights, ref_idx = _router_logits(router, logits)
        mine = reroute(logits, top_k=router.top_k, scoring="softmax", norm_topk_prob=norm)
        assert np.array_equal(mine.experts, ref_idx.numpy())  # sorted=True: same order too
        np.testing.assert_allclose(mine.weights, ref_weights.numpy(), rtol=2e-6, atol=1e-8)


def test_logits_topk_matches_gpt_oss_and_llama4_routers() -> None:
    from transformers import GptOssConfig, Llama4TextConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((2048, 16)) * 2).astype(np.float32)

    gpt = GptOssTopKRouter(GptOssConfig(hidden_size=16, num_local_experts=16, num_experts_per_tok=4))
    with torch.no_grad():
        gpt.weight.copy_(torch.eye(16))
        gpt.bias.zero_()
    _, ref_w, ref_idx = _router_logits(gpt, logits)
    mine = reroute(logits, top_k=4, scoring="softmax_topk")
    assert np.array_equal(mine.experts, ref_idx.numpy())
    np.testing.assert_allclose(mine.weights, ref_w.numpy(), rtol=2e-6)

    llama = Llama4Router(Llama4TextConfig(hidden_size=16, num_local_experts=16, num_experts_per_tok=2))
    with torch.no_grad():
        llama.weight.copy_(torch.eye(16))
    ref_scores, _ = _router_logits(llama, logits)  # (T, E): sigmoid of the top-k logits, 0 elsewhere
    mine = reroute(logits, top_k=2, scoring="sigmoid_topk")
    dense = np.zeros_like(logits)
    np.put_along_axis(dense, mine.experts.astype(np.int64), mine.weights, axis=1)
    np.testing.assert_allclose(dense, ref_scores.numpy(), rtol=2e-6)


def test_rerouting_reproduces_given_choices() -> None:
    """Choices made by a router (here softmax top-2 with known logits) come back from the logits alone."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((500, 8)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = np.argsort(-probs, axis=1)[:, :2]
    routed = reroute(logits, top_k=2, scoring="softmax")
    assert np.array_equal(routed.experts, given)
