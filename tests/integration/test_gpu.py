"""GPU-only checks: capture never synchronises the host, latency comes from CUDA events, and the
captured routing still equals the model's. Skipped where there is no CUDA device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moeprobe
from tests.tiny_models import build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_no_host_sync_inside_capture(family: str, tmp_path: Path) -> None:
    model = build(family).cuda()
    ids = torch.randint(3, 96, (2, 8), device="cuda")
    mask = torch.ones_like(ids)
    forward_kwargs = {"attention_mask": mask}
    if family == "switch_transformers":
        forward_kwargs["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    # check_sync runs every hook (and the end-of-step transfer) under torch's sync debug mode "error": a
    # host sync inside capture raises there and is counted as an anomaly, so no anomaly means no sync.
    # (The model's own code may sync, e.g. nonzero() in the experts loop; that is not ours to judge.)
    from moeprobe.hooks.probe import Probe

    with Probe(model, tmp_path / "t", logits=True, check_sync=True) as probe:
        for _ in range(3):
            model(ids, **forward_kwargs)
    assert probe.anomalies == {}
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.sql("select count(distinct step) from routing").column(0)[0].as_py() == 3
    latency = trace.sql("select min(block_ms) lo, any_value(clock) c from latency").to_pylist()[0]
    assert latency["c"] == "cuda_event" and latency["lo"] > 0


def test_cuda_capture_equals_cpu_capture(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with moeprobe.record(model, tmp_path / "cpu"):
        model(ids)
    with moeprobe.record(model.cuda(), tmp_path / "gpu"):
        model(ids.cuda())
    q = "select list(expert order by layer, sequence, position, k) from routing"
    assert moeprobe.open_trace(tmp_path / "cpu").sql(q).to_pylist() == moeprobe.open_trace(tmp_path / "gpu").sql(q).to_pylist()


# -- graph-safe capture on CUDA (issue 12) ----------------------------------------------------------------


def _static_decode_inputs(model: torch.nn.Module, batch: int, prompt: int, steps: int) -> tuple[Any, torch.Tensor]:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 1)
    ids = torch.randint(3, 96, (batch, prompt), generator=torch.Generator().manual_seed(5)).cuda()
    return cache, ids


@torch.no_grad()
def _eager_decode(model: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    """Greedy static-cache decoding, eagerly: the truth the CUDA graph run must reproduce."""
    cache, ids = _static_decode_inputs(model, 2, 5, steps)
    out = model(input_ids=ids, position_ids=torch.arange(5, device="cuda").expand(2, 5), past_key_values=cache, use_cache=True)
    tokens = []
    for i in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        pos = torch.full((2, 1), 5 + i, device="cuda")
        out = model(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True)
    return tokens


@torch.no_grad()
def _graph_decode(model: torch.nn.Module, steps: int) -> None:
    """The same decoding with every decode step replayed from one captured CUDA graph (static input buffers)."""
    cache, ids = _static_decode_inputs(model, 2, 5, steps)
    out = model(input_ids=ids, position_ids=torch.arange(5, device="cuda").expand(2, 5), past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    static_ids = token.clone()
    static_pos = torch.full((2, 1), 5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    # No warm-up call: it would write one more step into the cache and the trace. The capture does not run the
    # ops, it records them.
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        static_out = model(input_ids=static_ids, position_ids=static_pos, past_key_values=cache, use_cache=True)
    torch.cuda.current_stream().wait_stream(side)
    for i in range(steps):
        static_ids.copy_(token)
        static_pos.fill_(5 + i)
        graph.replay()
        token = static_out.logits[:, -1:].argmax(-1)


def test_cuda_graph_replay_with_graph_capture_equals_eager(tmp_path: Path) -> None:
    """A CUDA graph captured over a decode step replays the capture ops: the trace equals the eager one."""
    model = build("mixtral").cuda().eval()
    # The default experts loop picks experts with a data-dependent host loop, which no CUDA graph can capture.
    model.set_experts_implementation("batched_mm")
    steps = 4
    with moeprobe.record(model, tmp_path / "eager", capture="graph"):
        _eager_decode(model, steps)
    with moeprobe.record(model, tmp_path / "graph", capture="graph") as probe:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")  # neither the ops nor the drain may synchronise the host
        try:
            _graph_decode(model, steps)
            probe._graph.drain()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    q = "select step, sequence, position, phase, layer, k, expert, round(weight, 4) w from routing order by all"
    want = moeprobe.open_trace(tmp_path / "eager").sql(q).to_pylist()
    got = moeprobe.open_trace(tmp_path / "graph").sql(q).to_pylist()
    assert got == want and {r["step"] for r in got} == set(range(steps + 1))
    assert moeprobe.open_trace(tmp_path / "graph").manifest["counters"]["anomalies"] == {}


def test_counts_mode_on_cuda_equals_token_counts(tmp_path: Path) -> None:
    model = build("deepseek_v3").cuda().eval()
    ids = torch.randint(3, 96, (4, 7), device="cuda")
    with moeprobe.record(model, tmp_path / "t", sample=1), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    trace = moeprobe.open_trace(tmp_path / "t")
    loads = trace.sql("select step, layer, expert, tokens from loads order by all").to_pylist()
    counted = trace.sql("select step, layer, expert, count(*)::bigint tokens from routing group by all order by all").to_pylist()
    assert loads == counted and loads


def test_cuda_event_latency_is_sane_against_wall_time(tmp_path: Path) -> None:
    """Per-layer block latency from CUDA events is positive and, summed over a step's layers, no more than the
    step's wall time (the events time GPU work inside the forward call)."""
    model = build("mixtral").cuda().eval()
    ids = torch.randint(3, 96, (8, 16), device="cuda")
    with moeprobe.record(model, tmp_path / "t"), torch.no_grad():
        for _ in range(5):
            model(ids)
            torch.cuda.synchronize()
    trace = moeprobe.open_trace(tmp_path / "t")
    rows = trace.sql(
        "select s.step, s.wall_ms, sum(l.block_ms) blocks, min(l.block_ms) lo, min(l.router_ms) rlo from steps s "
        "join latency l using (step) group by all order by step"
    ).to_pylist()
    assert len(rows) == 5
    for row in rows:
        assert row["lo"] > 0 and row["rlo"] > 0
        assert row["blocks"] <= row["wall_ms"] * 1.05 + 0.05


def test_hook_capture_refuses_a_cuda_graph_capture(tmp_path: Path) -> None:
    """Hooks do not run in a CUDA graph's replays: hook capture stops loudly at the captured step, never a trace
    that silently lacks the replayed steps."""
    from moeprobe.hooks.spec import UnsupportedModelError

    model = build("mixtral").cuda().eval()
    model.set_experts_implementation("batched_mm")
    ids = torch.randint(3, 96, (2, 4), device="cuda")
    probe = moeprobe.record(model, tmp_path / "t")
    assert probe.capture == "hooks"
    with torch.no_grad():
        model(ids)  # recorded
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            model(ids)
        torch.cuda.current_stream().wait_stream(side)
        graph.replay()
    with pytest.raises(UnsupportedModelError, match="CUDA graph"):
        probe.close()
    assert moeprobe.open_trace(tmp_path / "t").manifest["status"] == "aborted"


def test_the_host_transfer_never_widens_captures_on_the_device() -> None:
    # bf16 scores and weights are concatenated in bf16 (one device copy the size of the sources), not cast to
    # float32 per tensor and again by the cat (4x the sources before); the host gets the same values.
    from moeprobe.hooks.capture import LayerCapture, StepBuffer, move_to_host

    step = StepBuffer(step=0)
    for layer in range(8):
        step.layers.append(LayerCapture(
            layer=layer, context=None,
            indices=torch.randint(0, 64, (4096, 8), device="cuda"),
            weights=torch.rand(4096, 8, device="cuda", dtype=torch.bfloat16),
            scores=torch.rand(4096, 64, device="cuda", dtype=torch.bfloat16),
            dropped=None,
        ))
    expected = [(c.indices.cpu(), c.weights.cpu(), c.scores.cpu()) for c in step.layers]
    largest_kind = sum(c.scores.numel() * c.scores.element_size() for c in step.layers)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    move_to_host(step)
    assert step.ready is not None
    step.ready.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= largest_kind + (1 << 20)
    for capture, (indices, weights, scores) in zip(step.layers, expected, strict=True):
        assert not capture.scores.is_cuda and capture.scores.dtype == torch.bfloat16
        assert torch.equal(capture.indices, indices) and torch.equal(capture.weights, weights) and torch.equal(capture.scores, scores)
