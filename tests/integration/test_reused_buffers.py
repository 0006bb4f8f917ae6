"""Hook capture keeps a router's outputs by reference and reads them on the writer thread. A router that returns
the same buffers at every call (written in place, as code written for CUDA graphs does) must never have a step
recorded with another step's routing: a tensor written since its call is found by its version counter, counted
(``routing_changed:layerN``) and left out, and that router's outputs are copied at the call from then on; inference
tensors, which have no version counter, are copied at the call."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import torch

import moeprobe
from tests.tiny_models import VOCAB, build

ROUTING = "select step, layer, sequence, position, k, expert, weight from routing order by all"


def _buffered(module: torch.nn.Module, reused: Callable[[torch.Tensor], bool] = lambda t: True) -> None:
    """Make ``module`` return its outputs (those ``reused`` picks) in buffers it reuses for every call of the same
    shapes."""
    forward = module.forward
    buffers: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def reusing(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        kept = []
        for n, t in enumerate(out):
            if isinstance(t, torch.Tensor) and reused(t):
                buffer = buffers.setdefault((n, tuple(t.shape)), torch.empty_like(t))
                buffer.copy_(t)
                t = buffer
            kept.append(t)
        return tuple(kept)

    module.forward = reusing


def _loop(model: torch.nn.Module, guard: Any, steps: int = 8) -> None:
    from transformers import DynamicCache

    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    with guard():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_router_that_reuses_its_output_buffers_is_never_recorded_wrong(mode: str, tmp_path: Path) -> None:
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode
    model = build("qwen3_moe").eval()
    with moeprobe.record(model, tmp_path / "truth") as truth:
        _loop(model, guard)
    routers = [layer.router for layer in truth.layers]
    assert routers and all(isinstance(r, torch.nn.Module) for r in routers)
    for router in routers:
        _buffered(router)
    with moeprobe.record(model, tmp_path / "reused") as probe:
        _loop(model, guard)
    want = moeprobe.open_trace(tmp_path / "truth").sql(ROUTING).to_pylist()
    got = moeprobe.open_trace(tmp_path / "reused").sql(ROUTING).to_pylist()
    # Whatever was recorded is exactly what the router decided at that step; what was not, is counted.
    assert {(r["step"], r["layer"]) for r in got} <= {(r["step"], r["layer"]) for r in want}
    kept = {(r["step"], r["layer"]) for r in got}
    assert got == [r for r in want if (r["step"], r["layer"]) in kept]
    changed = sum(n for kind, n in probe.anomalies.items() if kind.startswith("routing_changed:"))
    steps_layers = {(r["step"], r["layer"]) for r in want}
    assert len(kept) + changed == len(steps_layers)
    if mode == "inference_mode":
        # No version counters to check by: copied at the call, so nothing is lost.
        assert changed == 0 and got == want


@pytest.mark.parametrize("reused", ["every output", "only the scores"])
def test_recorded_router_scores_written_after_their_call_are_never_recorded_wrong(reused: str, tmp_path: Path) -> None:
    """With ``logits=True`` the router's scores are kept by reference too, and checked by their version counter like
    its indices and weights: a router that reuses its logits buffer (alone, or with the rest) never has a step
    recorded with another step's scores."""
    model = build("qwen3_moe").eval()
    with moeprobe.record(model, tmp_path / "truth", logits=True) as truth:
        _loop(model, torch.no_grad)
    experts = int(truth.layers[0].meta["num_experts"])
    for layer in truth.layers:
        assert isinstance(layer.router, torch.nn.Module)
        _buffered(layer.router, (lambda t: True) if reused == "every output" else (lambda t: t.is_floating_point() and t.shape[-1] == experts))
    with moeprobe.record(model, tmp_path / "reused", logits=True) as probe:
        _loop(model, torch.no_grad)
    scores = "select step, layer, sequence, position, scores from scores order by all"
    truth_trace, reused_trace = moeprobe.open_trace(tmp_path / "truth"), moeprobe.open_trace(tmp_path / "reused")
    want, got = truth_trace.sql(scores).to_pylist(), reused_trace.sql(scores).to_pylist()
    kept = {(r["step"], r["layer"]) for r in got}
    assert got == [r for r in want if (r["step"], r["layer"]) in kept]
    assert reused_trace.sql(ROUTING).to_pylist() == [r for r in truth_trace.sql(ROUTING).to_pylist() if (r["step"], r["layer"]) in kept]
    changed = sum(n for kind, n in probe.anomalies.items() if kind.startswith("routing_changed:"))
    assert changed > 0  # the loop does write the kept buffers before the writer reads them
    assert len(kept) + changed == len({(r["step"], r["layer"]) for r in want})


@pytest.mark.parametrize("logits", [False, True])
def test_a_noted_router_call_keeps_only_what_it_records(logits: bool, tmp_path: Path) -> None:
    """A router call noted by reference keeps its indices and weights until the writer reads the step; the rest of
    its output (Mixtral's router, like DeepSeek-V3's, also returns its logits, E floats per token, which the byte
    budget does not count) is the model's to free at once, unless the scores are recorded."""
    import weakref

    model = build("mixtral").eval()  # (logits, weights, indices) from its router on every transformers 5.x
    outputs: list[list[Any]] = []
    with moeprobe.record(model, tmp_path / "t", logits=logits, flush_interval=3600.0) as probe:
        router = probe.layers[0].router
        assert isinstance(router, torch.nn.Module)
        router.register_forward_hook(lambda _m, _a, out: outputs.append([weakref.ref(t) for t in out]))
        _loop(model, torch.no_grad, steps=4)
        # The writer has not read these steps yet (no flush is due): what is still alive is what the steps keep.
        alive = [[ref() is not None for ref in refs] for refs in outputs[2:]]  # the first calls are read at once
        probe.flush()
    assert len(alive) == 3
    assert all(row == [logits, True, True] for row in alive), alive
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.sql("select count(*) n from routing where step >= 2").to_pylist()[0]["n"] > 0
