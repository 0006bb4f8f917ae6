"""The probe's contract with the model: it never changes outputs, never raises into the model, removes
every hook on exit (also on error), and its trace is readable while it is being written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moeprobe
from moeprobe.traces.errors import TraceExistsError
from tests.tiny_models import build


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


def _wrapped_forwards(model: nn.Module) -> int:
    """Modules whose forward is an instance attribute (capture wraps forwards that way, and must put them back)."""
    return sum("forward" in m.__dict__ for m in model.modules())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_outputs_bit_identical_and_model_left_untouched(family: str, tmp_path: Path) -> None:
    model = build(family)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    before = _state(model)
    hooks_before, wrapped_before = _hook_count(model), _wrapped_forwards(model)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}
    plain = model.generate(ids, **kwargs)
    with moeprobe.record(model, tmp_path / "t", logits=True):
        probed = model.generate(ids, **kwargs)
    assert torch.equal(plain.sequences, probed.sequences)
    for a, b in zip(plain.scores, probed.scores, strict=True):
        assert torch.equal(a, b)
    assert _hook_count(model) == hooks_before
    assert _wrapped_forwards(model) == wrapped_before
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Boom(RuntimeError):
    pass


def test_exception_in_forward_reaches_caller_hooks_removed_trace_aborted(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 5))
    calls = {"n": 0}

    def explode(module: nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("expert kernel failed")

    handle = model.model.layers[1].mlp.experts.register_forward_pre_hook(explode)
    error = Boom("placeholder")
    try:
        with pytest.raises(Boom) as caught, moeprobe.record(model, tmp_path / "t"):
            model(ids)
            model(ids)
            model(ids)  # raises inside layer 1
        error = caught.value
    finally:
        handle.remove()
    assert str(error) == "expert kernel failed"
    assert _hook_count(model) == 0
    assert _wrapped_forwards(model) == 0
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.status == "aborted"
    assert "Boom: expert kernel failed" in trace.manifest["shards"][0]["error"]
    steps = trace.sql("select distinct step from routing order by 1").column(0).to_pylist()
    assert steps[:2] == [0, 1]  # the complete steps before the failure are on disk


def test_trace_is_readable_while_the_writer_is_running(tmp_path: Path) -> None:
    model = build("olmoe")
    ids = torch.randint(3, 96, (1, 4))
    with moeprobe.record(model, tmp_path / "t", flush_interval=0.05) as probe:
        model(ids)
        assert probe.flush(timeout=30)  # wait on the writer, not on files appearing
        live = moeprobe.open_trace(tmp_path / "t")
        assert live.status == "running"
        first = live.sql("select count(*) from routing").column(0)[0].as_py()
        assert first == 4 * 2 * 2  # 4 tokens x 2 layers x top-2
        model(ids)
        assert probe.flush(timeout=30)
        live.refresh()
        assert live.sql("select count(*) from routing").column(0)[0].as_py() == 2 * first
        # No temporary file is ever listed as a segment.
        assert all(not s.path.name.startswith(".") for s in live.reader.segments("routing"))
    assert probe.closed
    live.refresh()
    assert live.status == "complete"


def test_hook_failure_is_counted_not_raised(tmp_path: Path) -> None:
    """A selector that fails after the layer's first call: the model is unaffected, the calls are counted."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 4))
    reference = model(ids).logits
    calls = {"n": 0}

    def sometimes_broken(output: Any, router_input: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 2:  # both layers read fine once, then fail
            raise ValueError("cannot read this router")
        return output[2]

    spec = moeprobe.RouterSpec(indices=sometimes_broken, weights=1, num_experts=6, top_k=2)
    with moeprobe.record(model, tmp_path / "t", routers={"MixtralTopKRouter": spec}) as probe:
        model(ids)
        logits = model(ids).logits
    assert torch.equal(logits, reference)
    assert probe.anomalies == {"contract:layer0": 1, "contract:layer1": 1}
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["anomalies"] == {"contract:layer0": 1, "contract:layer1": 1}
    assert trace.sql("select list(distinct step) from routing").column(0)[0].as_py() == [0]


def test_hook_failure_on_the_first_call_refuses_without_touching_the_model(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 4))
    reference = model(ids).logits

    def broken(output: Any, router_input: Any) -> torch.Tensor:
        raise ValueError("cannot read this router")

    spec = moeprobe.RouterSpec(indices=broken, num_experts=6, top_k=2)
    logits = None
    with (
        pytest.raises(moeprobe.UnsupportedModelError, match="ValueError: cannot read this router"),
        moeprobe.record(model, tmp_path / "t", routers={"MixtralTopKRouter": spec}),
    ):
        logits = model(ids).logits
    assert logits is not None and torch.equal(logits, reference)
    assert moeprobe.open_trace(tmp_path / "t").status == "aborted"


def test_full_queue_drops_and_counts_records(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 5))
    with moeprobe.record(model, tmp_path / "t", max_queue_mb=1e-6):
        model(ids)
        model(ids)
    trace = moeprobe.open_trace(tmp_path / "t")
    counters = trace.manifest["counters"]
    # A 1-byte budget is passed while the step is still capturing: the step is dropped then (releasing its
    # router outputs), before it reaches the queue.
    assert counters["dropped"] == {"step_over_budget": 2 * (2 * 5) * 2 * 2}
    assert trace.sql("select count(*) from routing").column(0)[0].as_py() == 0


def test_tags_label_the_sequences_that_follow(tmp_path: Path) -> None:
    model = build("qwen3_moe")
    with moeprobe.record(model, tmp_path / "t") as probe:
        probe.tag(domain="code")
        model(torch.randint(3, 96, (2, 4)))
        probe.tag(domain=["prose", "math"], source="unit")
        model(torch.randint(3, 96, (2, 4)))
        probe.tag()
        model(torch.randint(3, 96, (1, 4)))
    rows = moeprobe.open_trace(tmp_path / "t").sql("select sequence, key, value from tags order by sequence, key").to_pylist()
    assert [(r["sequence"], r["key"], r["value"]) for r in rows] == [
        (0, "domain", "code"), (1, "domain", "code"),
        (2, "domain", "prose"), (2, "source", "unit"), (3, "domain", "math"), (3, "source", "unit"),
    ]


def test_live_loads_without_a_trace() -> None:
    model = build("deepseek_v3")
    ids = torch.randint(3, 96, (3, 5))
    with moeprobe.record(model, None, live_loads=True) as probe:
        model(ids)
        loads = probe.take_loads()
        assert [int(t.sum()) for t in loads] == [3 * 5 * 2, 3 * 5 * 2]
        assert all(int(t.sum()) == 0 for t in probe.take_loads())


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 3))
    with moeprobe.record(model, tmp_path / "t"):
        model(ids)
    with pytest.raises(TraceExistsError):
        moeprobe.record(model, tmp_path / "t")
    assert _hook_count(model) == 0
    assert _wrapped_forwards(model) == 0
    with moeprobe.record(model, tmp_path / "t", force=True):
        model(ids)
        model(ids)
    assert moeprobe.open_trace(tmp_path / "t").manifest["counters"]["steps"] == 2
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(moeprobe.TraceError, match="not a moeprobe trace"):
        moeprobe.record(model, tmp_path / "precious", force=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_flush_makes_what_was_captured_readable_while_recording(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 5))
    with moeprobe.record(model, tmp_path / "t", flush_interval=3600) as probe:
        model(ids)
        assert probe.flush(timeout=30)
        trace = moeprobe.open_trace(tmp_path / "t")
        assert trace.status == "running"
        assert trace.sql("select count(*) from routing").column(0)[0].as_py() == 2 * 5 * 2 * 2
        model(ids)
        assert probe.flush(timeout=30)
        assert moeprobe.open_trace(tmp_path / "t").sql("select count(distinct step) from routing").column(0)[0].as_py() == 2


def test_a_forward_set_on_the_instance_before_recording_is_put_back(tmp_path: Path) -> None:
    """Capture wraps forwards as instance attributes (hooks/wrapping.py): another tool's own instance forward (e.g.
    accelerate's) is wrapped in turn, still called, and is exactly what the module has again after the recording."""
    model = build("mixtral")
    stack = model.model
    calls = {"n": 0}
    original = stack.forward

    def tool_forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(*args, **kwargs)

    stack.forward = tool_forward
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        with moeprobe.record(model, tmp_path / "t"):
            probed = model(ids).logits
    assert torch.equal(plain, probed)
    assert calls["n"] == 2
    assert stack.__dict__["forward"] is tool_forward
    assert _wrapped_forwards(model) == 1
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.sql("select count(*) n from routing").to_pylist()[0]["n"] == 2 * 6 * 2 * 2  # tokens x layers x top-2
