"""For every supported family: the captured expert ids and gate weights equal what the model itself used,
for every token of every MoE layer, in the prefill pass and in KV-cached decoding steps.

The ground truth comes from the model, not from moeprobe: a pre-hook on each MoE block's ``experts``
module records the indices and weights the block hands to its experts. Llama 4's experts do not receive
indices, so there the truth is recomputed from the block's input with the router's own weight matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moeprobe
from tests.tiny_models import FAMILIES, build

PROMPT_LEN = 7
NEW_TOKENS = 4


def _truth_hooks(model: torch.nn.Module, family: str) -> tuple[list[dict[str, np.ndarray]], list[Any]]:
    calls: list[dict[str, np.ndarray]] = []
    handles = []
    for module in model.modules():
        name = type(module).__name__
        if family == "llama4" and name == "Llama4TextMoe":
            def pre(mod: Any, args: Any) -> None:
                x = args[0].reshape(-1, mod.hidden_dim)
                logits = torch.nn.functional.linear(x, mod.router.weight)
                top, idx = torch.topk(logits, mod.top_k, dim=1)
                calls.append({"expert": idx.numpy(), "weight": torch.sigmoid(top.float()).numpy(), "dropped": np.zeros(len(x), bool)})
            handles.append(module.register_forward_pre_hook(pre))
        elif family == "switch_transformers" and name == "SwitchTransformersExperts":
            def pre(mod: Any, args: Any) -> None:
                one_hot, weights = args[1], args[2]  # (tokens, 1, E), (tokens, 1)
                kept = one_hot.any(-1).reshape(-1)
                calls.append({"expert": one_hot.argmax(-1).reshape(-1, 1).numpy(), "weight": weights.float().numpy(), "dropped": (~kept).numpy(), "kept": kept.numpy()})
            handles.append(module.register_forward_pre_hook(pre))
        elif name.endswith(("Experts", "NaiveMoe")) and family not in ("llama4", "switch_transformers"):
            def pre(mod: Any, args: Any) -> None:
                idx, weights = args[1], args[2]
                calls.append({"expert": idx.numpy().copy(), "weight": weights.float().numpy().copy(), "dropped": np.zeros(len(idx), bool)})
            handles.append(module.register_forward_pre_hook(pre))
    return calls, handles


def _inputs(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, PROMPT_LEN), generator=gen)
    mask = torch.ones_like(ids)
    if family == "switch_transformers":
        mask[1, -2:] = 0  # encoder inputs are right-padded
    else:
        mask[1, :3] = 0  # decoder-only batches are left-padded
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_routing_equals_model_routing(family: str, tmp_path: Path) -> None:
    model = build(family)
    ids, mask = _inputs(family)
    calls, handles = _truth_hooks(model, family)
    trace_dir = tmp_path / family
    try:
        with moeprobe.record(model, trace_dir) as probe:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(trace_dir)
    assert trace.status == "complete"
    layers = trace.layers
    assert len(layers) == (4 if family == "switch_transformers" else 2)
    assert all(layer["family"] == family for layer in layers)

    groups = trace.sql(
        "select step, layer, list(expert order by sequence, position, k) e, list(weight order by sequence, position, k) w, "
        "list(dropped order by sequence, position, k) d, count(*) n, any_value(phase) phase "
        "from routing group by step, layer order by step, layer"
    ).to_pylist()
    assert len(groups) == len(calls), "one routing group per MoE layer call"
    phases = {g["phase"] for g in groups}
    assert phases == {"prefill", "decode"}
    k = layers[0]["top_k"]
    for group, truth in zip(groups, calls, strict=True):
        expert, weight = truth["expert"], truth["weight"].reshape(truth["expert"].shape).astype(np.float32)
        # moeprobe ranks each token's choices by gate weight (k = 0 is the largest); the model's own order
        # is arbitrary for some routers (DeepSeek-V3 uses topk(sorted=False)).
        order = np.argsort(-weight, axis=1, kind="stable")
        expert, weight = np.take_along_axis(expert, order, axis=1), np.take_along_axis(weight, order, axis=1)
        tokens = expert.shape[0]
        if tokens == ids.numel():  # a pass over the padded prompt: padding is not recorded
            valid = mask.reshape(-1).bool().numpy()
            expert, weight, dropped = expert[valid], weight[valid], truth["dropped"][valid]
        else:
            dropped = truth["dropped"]
        got_e = np.array(group["e"]).reshape(-1, expert.shape[1])
        got_w = np.array(group["w"], dtype=np.float32).reshape(-1, expert.shape[1])
        assert got_e.shape == expert.shape, (family, group["step"], group["layer"])
        np.testing.assert_array_equal(got_e, expert, err_msg=f"{family} step {group['step']} layer {group['layer']}")
        # Weights are stored with half precision's 11 significant bits by default (format v2): exactly the
        # model's weight rounded to nearest, half to even.
        mantissa, exponent = np.frexp(weight.astype(np.float64))
        np.testing.assert_array_equal(got_w, np.ldexp(np.round(mantissa * 2048) / 2048, exponent).astype(np.float32))
        np.testing.assert_array_equal(np.array(group["d"]).reshape(-1, expert.shape[1])[:, 0], dropped)
        assert expert.shape[1] == k

    # Latency: one row per MoE layer call, the router inside its block.
    latency = trace.sql("select count(*) n, count(*) filter (where router_ms > 0 and router_ms <= block_ms) ok, any_value(clock) c from latency").to_pylist()[0]
    assert latency == {"n": len(calls), "ok": len(calls), "c": "perf_counter"}

    # k ranks the choices by weight: no later choice outweighs an earlier one.
    inverted = trace.sql(
        "select count(*) from routing a join routing b using (step, sequence, position, layer) "
        "where b.k = a.k + 1 and b.weight > a.weight"
    ).column(0)[0].as_py()
    assert inverted == 0

    # Token ids and positions: the prompt's valid tokens in prefill, then each generated token in decode.
    first_layer = trace.sql(
        "select step, sequence, position, token_id from routing where layer = (select max(layer) from routing) and k = 0 order by step, sequence, position"
    ).to_pylist()
    if family != "switch_transformers":
        prefill = [r for r in first_layer if r["step"] == 0]
        expected = [(b, p, int(t)) for b in range(2) for p, t in enumerate(ids[b][mask[b].bool()].tolist())]
        assert [(r["sequence"], r["position"], r["token_id"]) for r in prefill] == expected
        for step in range(1, NEW_TOKENS):
            rows = [r for r in first_layer if r["step"] == step]
            assert [r["token_id"] for r in rows] == out[:, PROMPT_LEN + step - 1].tolist()
            assert [r["position"] for r in rows] == [PROMPT_LEN + step - 1, int(mask[1].sum()) + step - 1]
    else:
        decoder_steps = sorted({r["step"] for r in first_layer})
        assert len(decoder_steps) == NEW_TOKENS  # decoder start token + 3 generated tokens
        for i, step in enumerate(decoder_steps):
            rows = [r for r in first_layer if r["step"] == step]
            assert [r["position"] for r in rows] == [i, i]
            assert [r["token_id"] for r in rows] == out[:, i].tolist()
        # Encoder rows and decoder rows of a batch row share its sequence id.
        seqs = trace.sql("select layer, list(distinct sequence order by sequence) s from routing group by layer order by layer").to_pylist()
        assert all(s["s"] == [0, 1] for s in seqs)


def test_deepseek_bias_and_scores_are_recorded(tmp_path: Path) -> None:
    model = build("deepseek_v3")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    with moeprobe.record(model, tmp_path / "t", logits=True):
        model(ids)
        model(ids)
    trace = moeprobe.open_trace(tmp_path / "t")
    bias = trace.bias().to_pylist()
    # Recorded once per layer (it did not change between the two steps).
    assert [(b["step"], b["layer"]) for b in bias] == [(0, 0), (0, 1)]
    np.testing.assert_allclose(bias[0]["bias"], np.linspace(-0.05, 0.05, 8), rtol=1e-6)
    layer = trace.layers[0]
    assert (layer["scoring"], layer["n_group"], layer["topk_group"], layer["has_bias"]) == ("sigmoid", 4, 2, True)
    assert layer["routed_scaling_factor"] == 2.5 and layer["num_shared_experts"] == 1
    scores = trace.sql("select count(*) n, min(len(scores)) lo, max(len(scores)) hi from scores").to_pylist()[0]
    assert scores == {"n": 2 * 5 * 2, "lo": 8, "hi": 8}
    # Replaying DeepSeek-V3 routing from the recorded logits and bias gives the recorded choice.
    rows = trace.sql("select s.scores, list(r.expert order by r.expert) e from scores s join routing r using (step, sequence, position, layer) where s.layer = 0 and s.step = 0 group by s.scores, s.position order by s.position").to_pylist()
    router = model.model.layers[1].mlp.gate
    for row in rows:
        logits = torch.tensor(row["scores"])[None]
        biased = logits.sigmoid() + router.e_score_correction_bias
        groups = biased.view(1, 4, 2).topk(2, dim=-1)[0].sum(-1).topk(2, dim=-1)[1]
        allowed = torch.zeros(1, 4).scatter_(1, groups, 1).repeat_interleave(2, dim=1).bool()
        chosen = biased.masked_fill(~allowed, float("-inf")).topk(2, dim=-1)[1]
        assert sorted(chosen[0].tolist()) == row["e"]


def test_a_bias_change_in_a_dropped_step_is_written_with_the_next_step(tmp_path: Path) -> None:
    """Biases are read at each step's end and kept as written only when the step is queued: a step dropped over the
    byte budget leaves its bias change to the next step written, never lost."""
    model = build("deepseek_v3")
    long = torch.randint(3, 96, (2, 48), generator=torch.Generator().manual_seed(3))
    short = long[:, :1]
    router = model.model.layers[1].mlp.gate
    with moeprobe.record(model, tmp_path / "t", max_queue_mb=4096 / 2**20) as probe, torch.no_grad():
        model(short)  # written: both layers' biases at step 0
        assert probe.flush()
        router.e_score_correction_bias.add_(0.01)
        model(long)  # over the budget: dropped, with its changed bias
        assert probe.flush()
        model(short)  # written: the change goes with it
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["dropped"].get("step_over_budget", 0) > 0
    assert [s["step"] for s in trace.steps().to_pylist()] == [0, 2]
    bias = trace.bias().to_pylist()
    assert [(b["step"], b["layer"]) for b in bias] == [(0, 0), (0, 1), (2, 0)]  # decoder layer 1 is MoE layer 0
    np.testing.assert_allclose(np.array(bias[2]["bias"]) - np.array(bias[0]["bias"]), 0.01, rtol=1e-4)


def test_step_bias_updates_are_recorded_when_they_change(tmp_path: Path) -> None:
    model = build("deepseek_v3")
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    router = model.model.layers[1].mlp.gate
    with moeprobe.record(model, tmp_path / "t"):
        model(ids)
        with torch.no_grad():
            router.e_score_correction_bias.add_(0.01)
        model(ids)
        model(ids)
    bias = moeprobe.open_trace(tmp_path / "t").bias().to_pylist()
    assert [(b["step"], b["layer"]) for b in bias] == [(0, 0), (0, 1), (1, 0)]
    np.testing.assert_allclose(np.array(bias[2]["bias"]) - np.array(bias[0]["bias"]), 0.01, rtol=1e-4)


@pytest.mark.parametrize("replacement", ["buffer", "parameter"])
def test_a_bias_replaced_by_another_tensor_is_recorded(replacement: str, tmp_path: Path) -> None:
    """The bias is looked up where it lives at every step's end (the router's buffer dict, or the family's reader
    once it is no longer there): a new tensor in its place, or a parameter instead of the buffer, is written with
    the next step."""
    model = build("deepseek_v3")
    ids = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    router = model.model.layers[1].mlp.gate
    with moeprobe.record(model, tmp_path / "t"), torch.no_grad():
        model(ids)
        new = router.e_score_correction_bias.detach().clone() + 0.01
        router.e_score_correction_bias = torch.nn.Parameter(new, requires_grad=False) if replacement == "parameter" else new
        assert ("e_score_correction_bias" in router._buffers) == (replacement == "buffer")
        model(ids)
        model(ids)
    bias = moeprobe.open_trace(tmp_path / "t").bias().to_pylist()
    assert [(b["step"], b["layer"]) for b in bias] == [(0, 0), (0, 1), (1, 0)]
    np.testing.assert_allclose(np.array(bias[2]["bias"]) - np.array(bias[0]["bias"]), 0.01, rtol=1e-4)
