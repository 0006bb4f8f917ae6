"""Graph-safe capture run eagerly (fast): same trace as hook capture, counts mode, sampling, ring overflow,
restorable wrappers, ``inspect`` naming the capture. The compiled cases are in test_graph_compile.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env
from tests.tiny_models import build

ROUTING = "select step, sequence, position, phase, layer, k, expert, weight from routing order by step, layer, sequence, position, k"
STEPS = "select step, phase, batch, tokens from steps order by step"
TOKEN_COUNTS = "select step, phase, layer, expert, count(*)::bigint tokens from routing group by all order by all"
LOADS = "select step, phase, layer, expert, tokens from loads order by all"


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :2] = 0  # a left-padded row: padding is in neither the routing rows nor the counts
    mask[1, :2] = 0
    return ids, mask


def _generate(model: torch.nn.Module, new_tokens: int = 4, **kwargs: Any) -> None:
    ids, mask = _inputs()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def _rows(path: Path, query: str) -> list[dict[str, Any]]:
    return moeprobe.open_trace(path).sql(query).to_pylist()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_graph_capture_equals_hook_capture(family: str, cache: str, tmp_path: Path) -> None:
    model = build(family).eval()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with moeprobe.record(model, tmp_path / "hooks") as probe:
        probe.tag(domain="code")
        _generate(model, **extra)
    with moeprobe.record(model, tmp_path / "graph", capture="graph") as probe:
        probe.tag(domain="code")
        _generate(model, **extra)
    assert probe.anomalies == {}
    assert _rows(tmp_path / "graph", ROUTING) == _rows(tmp_path / "hooks", ROUTING)
    assert _rows(tmp_path / "graph", STEPS) == _rows(tmp_path / "hooks", STEPS)
    tags = "select sequence, key, value from tags order by all"
    assert _rows(tmp_path / "graph", tags) == _rows(tmp_path / "hooks", tags) != []
    manifest = moeprobe.open_trace(tmp_path / "graph").manifest
    assert manifest["counters"]["anomalies"] == {} and manifest["counters"]["dropped"] == {}


def test_counts_equal_the_token_trace_counts_on_the_same_run(tmp_path: Path) -> None:
    model = build("deepseek_v3").eval()
    # sample=1: every step's tokens and every step's device counts, in one run.
    with moeprobe.record(model, tmp_path / "both", sample=1):
        _generate(model)
    loads = _rows(tmp_path / "both", LOADS)
    assert loads == _rows(tmp_path / "both", TOKEN_COUNTS)
    assert {row["phase"] for row in loads} == {"prefill", "decode"}
    # Padding is left out of the counts: 3 rows x 5 tokens less 2 pads = 13 prefill tokens x top-2 per layer.
    prefill = [row for row in loads if row["step"] == 0 and row["layer"] == 0]
    assert sum(row["tokens"] for row in prefill) == 13 * 2

    # Counts mode alone on the same inputs: the same loads, no per-token rows, a steps row per step.
    with moeprobe.record(model, tmp_path / "counts", mode="counts") as probe:
        _generate(model)
    assert probe.capture == "graph"
    assert _rows(tmp_path / "counts", LOADS) == loads
    assert _rows(tmp_path / "counts", "select count(*) n from routing")[0]["n"] == 0
    assert _rows(tmp_path / "counts", STEPS) == _rows(tmp_path / "both", STEPS)
    manifest = moeprobe.open_trace(tmp_path / "counts").manifest
    assert manifest["options"]["mode"] == "counts" and manifest["counters"]["anomalies"] == {}


def test_sampling_keeps_exactly_the_steps_it_says(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    with moeprobe.record(model, tmp_path / "all"):
        _generate(model, new_tokens=7)
    with moeprobe.record(model, tmp_path / "sampled", sample=3):
        _generate(model, new_tokens=7)
    steps = [row["step"] for row in _rows(tmp_path / "sampled", "select distinct step from routing order by step")]
    assert steps == [0, 3, 6]
    # The sampled steps are exactly the full trace's steps 0, 3 and 6.
    keep = ROUTING.replace("from routing", "from routing where step % 3 = 0")
    assert _rows(tmp_path / "sampled", ROUTING) == _rows(tmp_path / "all", keep)
    # Counts and steps cover every step.
    assert _rows(tmp_path / "sampled", STEPS) == _rows(tmp_path / "all", STEPS)
    assert [r["step"] for r in _rows(tmp_path / "sampled", "select distinct step from loads order by step")] == list(range(7))
    assert _rows(tmp_path / "sampled", LOADS) == _rows(tmp_path / "all", TOKEN_COUNTS)
    assert moeprobe.open_trace(tmp_path / "sampled").manifest["options"]["sample"] == 3
    # mode="counts" with sample=N records the same (docs/scale.md); it once wrote no token rows at all.
    with moeprobe.record(model, tmp_path / "counts_sampled", mode="counts", sample=3):
        _generate(model, new_tokens=7)
    for query in (ROUTING, STEPS, LOADS):
        assert _rows(tmp_path / "counts_sampled", query) == _rows(tmp_path / "sampled", query)


def test_a_ring_too_small_drops_whole_steps_and_counts_them(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    # 8 token rows between drains: the 15-token prefill does not fit, the 3-token decode steps do.
    with moeprobe.record(model, tmp_path / "t", capture="graph", ring_tokens=8, drain_every=1) as probe:
        _generate(model, new_tokens=3)
    assert probe.capture == "graph"
    manifest = moeprobe.open_trace(tmp_path / "t").manifest
    counters = manifest["counters"]
    assert counters["anomalies"]["graph_ring_overflow:tokens"] == 15 - 8
    assert counters["anomalies"]["graph_incomplete_step"] == 1
    assert counters["dropped"]["ring_overflow"] > 0
    # Step 0 is left out whole (no short step), the decode steps are there whole.
    per_step = _rows(tmp_path / "t", "select step, layer, count(*) n from routing group by all order by all")
    assert {row["step"] for row in per_step} == {1, 2}
    assert all(row["n"] == 3 * 2 for row in per_step)


def test_wrappers_are_restored_and_outputs_are_bit_identical(tmp_path: Path) -> None:
    model = build("qwen3_moe").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with moeprobe.record(model, tmp_path / "t", mode="counts") as probe:
            wrapped = [name for name, module in model.named_modules() if "forward" in module.__dict__]
            got = model(input_ids=ids, attention_mask=mask).logits
    # the decoder stack, the two routers, and the experts modules read instead if a router returns bare logits
    fallbacks = sum(layer.experts_fallback is not None for layer in probe.layers)
    assert len(wrapped) == 1 + 2 + fallbacks
    assert torch.equal(got, expected)
    assert [name for name, module in model.named_modules() if "forward" in module.__dict__] == []


def test_inspect_names_the_capture(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    with moeprobe.record(model, tmp_path / "t", sample=2):
        _generate(model, new_tokens=2)
    out = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(tmp_path / "t")], capture_output=True, text=True, env=run_cli_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "capture   graph (ops in the model's graph, no latency); tokens of 1 step in 2, counts of every step" in out.stdout
    summary = json.loads(subprocess.run([PYTHON, "-m", "moeprobe", "inspect", "--json", str(tmp_path / "t")], capture_output=True, text=True, env=run_cli_env(), cwd=ROOT).stdout)
    assert summary["tables"]["loads"]["rows"] > 0


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    model = build("mixtral")
    for kwargs in ({"mode": "bogus"}, {"capture": "bogus"}, {"sample": 0}, {"mode": "counts", "capture": "hooks"}):
        with pytest.raises(ValueError):
            moeprobe.record(model, tmp_path / "t", **kwargs)
        assert not (tmp_path / "t").exists()


def test_what_graph_capture_cannot_record_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Router scores, live loads, encoder-decoder models, and the metrics endpoint with counts or sampling:
    refused in one line, and no trace directory is left behind."""
    from moeprobe.hooks.spec import UnsupportedModelError

    cases: list[tuple[str, dict[str, Any], type[Exception], str]] = [
        ("mixtral", {"capture": "graph", "logits": True}, ValueError, "router scores"),
        ("mixtral", {"mode": "counts", "live_loads": True}, ValueError, "live_loads"),
        ("switch_transformers", {"capture": "graph"}, UnsupportedModelError, "encoder-decoder"),
        ("mixtral", {"mode": "counts", "metrics_port": 0}, ValueError, "metrics_port"),
        ("mixtral", {"sample": 2, "metrics_port": 0}, ValueError, "metrics_port"),
    ]
    for family, kwargs, error, words in cases:
        with pytest.raises(error) as raised:
            moeprobe.record(build(family), tmp_path / "t", **kwargs)
        assert words in str(raised.value) and "\n" not in str(raised.value), (family, kwargs)
        assert not (tmp_path / "t").exists(), (family, kwargs)


def test_correction_bias_is_recorded_like_hook_capture(tmp_path: Path) -> None:
    """DeepSeek-V3's router bias: graph capture reads it between steps (at attach and at each drain) and it takes
    effect from the step after the last one drained. With a flush (a drain) after the update, the bias table
    equals hook capture's, the change included."""
    model = build("deepseek_v3").eval()
    ids, mask = _inputs()
    biases = [m.e_score_correction_bias for m in model.modules() if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor)]
    assert biases
    saved = [bias.clone() for bias in biases]

    def run(probe: moeprobe.Probe) -> None:
        with torch.no_grad():
            for call in range(4):
                if call == 2:
                    for bias in biases:
                        bias.add_(0.25)  # a balancing update between steps 1 and 2
                    probe.flush()
                model(input_ids=ids, attention_mask=mask)
        for bias, value in zip(biases, saved, strict=True):
            bias.copy_(value)

    with moeprobe.record(model, tmp_path / "hooks") as probe:
        run(probe)
    with moeprobe.record(model, tmp_path / "graph", capture="graph") as probe:
        run(probe)
    query = "select step, layer, bias from bias order by step, layer"
    want = _rows(tmp_path / "hooks", query)
    assert [row["step"] for row in want] == [0] * len(biases) + [2] * len(biases)
    assert _rows(tmp_path / "graph", query) == want


def test_counts_of_a_maskless_decode_loop_equal_the_token_trace(tmp_path: Path) -> None:
    """Counts mode's integer-only step path (no mask, no positions, a dynamic cache) against hook capture."""
    from transformers import DynamicCache

    model = build("qwen3_moe").eval()
    ids, _ = _inputs()

    def loop() -> None:
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(3):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

    with moeprobe.record(model, tmp_path / "hooks"):
        loop()
    with moeprobe.record(model, tmp_path / "counts", mode="counts") as probe:
        loop()
    assert probe.anomalies == {}
    assert _rows(tmp_path / "counts", LOADS) == _rows(tmp_path / "hooks", TOKEN_COUNTS) != []
    assert _rows(tmp_path / "counts", STEPS) == _rows(tmp_path / "hooks", STEPS)
    assert [row["phase"] for row in _rows(tmp_path / "counts", STEPS)] == ["prefill"] + ["decode"] * 3
    assert moeprobe.open_trace(tmp_path / "counts").manifest["counters"]["anomalies"] == {}


def test_after_the_first_call_the_stack_counts_the_drains_and_dead_wrappers_are_gone(tmp_path: Path) -> None:
    """A hook on the model puts every call on torch's slower call path: once a call shows the stack's wrapper
    running eagerly, the stack counts the drains and the hook goes; the experts' fallback wrappers go once the
    router is seen to return its top-k. Drains still come every drain_every calls; everything is restored."""
    from transformers import DynamicCache

    model = build("deepseek_v3").eval()
    ids, _ = _inputs()
    with moeprobe.record(model, tmp_path / "counts", mode="counts", drain_every=2) as probe:
        fallbacks = [layer.experts_fallback for layer in probe.layers if layer.experts_fallback is not None]
        assert fallbacks and all("forward" in m.__dict__ for m in fallbacks)
        assert len(model._forward_hooks) == 1  # the drain hook, until the first call
        outputs: list[Any] = []
        seen = probe.layers[0].router.register_forward_hook(lambda module, args, output: outputs.append(output))
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            seen.remove()
            # Its router returns its top-k (transformers >= 5.13) or bare logits (the block routes, before): the
            # experts' wrappers go in the first case, and stay to record in the second.
            k = int(probe.layers[0].meta["top_k"])
            top_k = isinstance(outputs[0], tuple) and any(
                isinstance(t, torch.Tensor) and not t.is_floating_point() and t.shape[-1] == k for t in outputs[0]
            )
            assert len(model._forward_hooks) == 0
            assert [("forward" in m.__dict__) for m in fallbacks] == [not top_k] * len(fallbacks)
            for _ in range(4):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        # 5 calls, drain_every=2: drained after calls 2 and 4, the fifth is noted and waits for the exit's drain
        assert probe._graph_calls == 4
        assert len(probe._graph.capture.deferred.steps) == 1
    assert probe.anomalies == {}
    assert [row["phase"] for row in _rows(tmp_path / "counts", STEPS)] == ["prefill"] + ["decode"] * 4
    assert [name for name, module in model.named_modules() if "forward" in module.__dict__] == []
    assert len(model._forward_hooks) == 0


@pytest.mark.parametrize("drain_every", [1, 2, 32])
def test_noted_counts_across_drains_and_a_masked_step_equal_the_token_trace(drain_every: int, tmp_path: Path) -> None:
    """Counts mode's noted path (host_counts: steps and router calls noted, written by the writer at each drain)
    over drains in the middle of the loop, and a step with a mask in between (the per-call path takes over after
    writing the notes), against hook capture on the same loop."""
    from transformers import DynamicCache

    model = build("deepseek_v3").eval()
    ids, _ = _inputs()

    def loop() -> None:
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for step in range(6):
                token = out.logits[:, -1:].argmax(-1)
                if step == 3:  # a mask covering the cache and the new token: the general path
                    mask = torch.ones((ids.shape[0], cache.get_seq_length() + 1), dtype=torch.int64)
                    out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                else:
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)

    with moeprobe.record(model, tmp_path / "hooks"):
        loop()
    with moeprobe.record(model, tmp_path / "counts", mode="counts", drain_every=drain_every) as probe:
        loop()
    assert probe.anomalies == {}
    assert _rows(tmp_path / "counts", LOADS) == _rows(tmp_path / "hooks", TOKEN_COUNTS) != []
    assert _rows(tmp_path / "counts", STEPS) == _rows(tmp_path / "hooks", STEPS)
    assert [row["phase"] for row in _rows(tmp_path / "counts", STEPS)] == ["prefill"] + ["decode"] * 6


@pytest.mark.parametrize("options", [{"capture": "graph"}, {"sample": 2}])
def test_graph_capture_of_a_maskless_decode_loop_equals_hook_capture(options: dict[str, Any], tmp_path: Path) -> None:
    """Graph capture's token path for a stack call without mask or positions (record_plain_tokens_host), with and
    without sampling, against hook capture: routing rows (positions, sequences, phases), steps, counts."""
    from transformers import DynamicCache

    model = build("mixtral").eval()
    ids, _ = _inputs()

    def loop() -> None:
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(4):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

    with moeprobe.record(model, tmp_path / "hooks"):
        loop()
    with moeprobe.record(model, tmp_path / "graph", drain_every=2, **options) as probe:
        loop()
    assert probe.anomalies == {}
    kept = [0, 2, 4] if "sample" in options else [0, 1, 2, 3, 4]
    assert _rows(tmp_path / "graph", ROUTING) == [r for r in _rows(tmp_path / "hooks", ROUTING) if r["step"] in kept] != []
    assert _rows(tmp_path / "graph", STEPS) == _rows(tmp_path / "hooks", STEPS)
    if "sample" in options:
        assert _rows(tmp_path / "graph", LOADS) == _rows(tmp_path / "hooks", TOKEN_COUNTS)
