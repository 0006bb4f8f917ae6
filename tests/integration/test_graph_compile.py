"""Graph-safe capture under ``torch.compile(fullgraph=True)``: the trace of a compiled model equals the eager
truth (hook capture of the same model, same inputs) for Mixtral, DeepSeek-V3 and Qwen3-MoE, in a hand-written
static-cache decode loop and in ``generate(cache_implementation="static")``.

``fullgraph=True`` makes any graph break an error, so a compile that runs through proves there is none;
``torch._dynamo.explain`` counts them once more for the record. Most cases compile with the ``aot_eager``
backend (dynamo + AOTAutograd functionalization: everything that decides whether the capture ops fit in a graph);
one case runs one forward call through inductor (its C++ compile is the slowest part of this module).

Cost: compiling is the slowest thing the suite does (2 cores in CI), so the default run covers each compile path
once with the cheapest family and each family at least once: decode loop with Qwen3-MoE and DeepSeek-V3,
static-cache generate with Mixtral, one inductor forward with Qwen3-MoE. The other family x path combinations
and inductor over a whole generate are marked ``compile_matrix`` and run on demand:

    MOEPROBE_COMPILE_MATRIX=1 python -m pytest tests/integration/test_graph_compile.py
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import moeprobe
from moeprobe.hooks.spec import UnsupportedModelError
from tests.tiny_models import build

pytestmark = pytest.mark.slow

# The full family x compile-path matrix runs on demand (see the module docstring).
compile_matrix = pytest.mark.skipif(
    os.environ.get("MOEPROBE_COMPILE_MATRIX") != "1", reason="compile matrix: set MOEPROBE_COMPILE_MATRIX=1 to run"
)

FAMILIES = ["mixtral", "deepseek_v3", "qwen3_moe"]
ROUTING = "select step, sequence, position, phase, layer, k, expert, weight from routing order by step, layer, sequence, position, k"
STEPS = "select step, phase, batch, tokens from steps order by step"


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    """Each test compiles new model objects: dynamo's per-code-object recompile limit (8) would otherwise be
    reached across tests, and fullgraph=True turns that into an error."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[0, :2] = 0  # row 0 is left-padded: padding must stay out of the trace in both captures
    mask[0, :2] = 0
    return ids, mask


def decode_loop(model: torch.nn.Module, steps: int = 3) -> None:
    """Greedy decoding with a static cache, positions and mask passed by hand, calling ``model(...)``."""
    from transformers import StaticCache

    ids, mask = _inputs()
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)


def generate_static(model: torch.nn.Module, new_tokens: int = 3) -> None:
    ids, mask = _inputs()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")


def _rows(path: Path, query: str) -> list[dict[str, Any]]:
    return moeprobe.open_trace(path).sql(query).to_pylist()


def _assert_same_trace(truth: Path, graph: Path) -> None:
    want, got = _rows(truth, ROUTING), _rows(graph, ROUTING)
    assert len(got) == len(want) > 0
    for w, g in zip(want, got, strict=True):
        assert {k: v for k, v in g.items() if k != "weight"} == {k: v for k, v in w.items() if k != "weight"}
        assert math.isclose(g["weight"], w["weight"], rel_tol=1e-5, abs_tol=1e-6)
    assert _rows(graph, STEPS) == _rows(truth, STEPS)
    assert _rows(graph, "select count(*) n from routing where position < 0")[0]["n"] == 0


def _compiled_matches_eager(family: str, run: Callable[[torch.nn.Module], None], backend: str, tmp_path: Path) -> moeprobe.Probe:
    torch.manual_seed(0)
    model = build(family).eval()
    with moeprobe.record(model, tmp_path / "truth") as truth:
        run(model)
    assert truth.capture == "hooks"
    model.forward = torch.compile(model.forward, fullgraph=True, backend=backend)
    with moeprobe.record(model, tmp_path / "graph") as probe:
        run(model)
    assert probe.capture == "graph"  # switched automatically: the model's forward is compiled
    assert probe.anomalies == {}
    _assert_same_trace(tmp_path / "truth", tmp_path / "graph")
    manifest = moeprobe.open_trace(tmp_path / "graph").manifest
    assert manifest["options"]["capture"] == "graph" and manifest["options"]["mode"] == "tokens"
    return probe


# Default run: each compile path with its cheapest family, every family at least once; the rest on demand.
DECODE_LOOP = [
    "qwen3_moe",
    "deepseek_v3",
    pytest.param("mixtral", marks=[pytest.mark.compile_matrix, compile_matrix]),
]
GENERATE_STATIC = [
    "mixtral",
    pytest.param("deepseek_v3", marks=[pytest.mark.compile_matrix, compile_matrix]),
    pytest.param("qwen3_moe", marks=[pytest.mark.compile_matrix, compile_matrix]),
]
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler (CI installs g++)"
)


def one_forward(model: torch.nn.Module) -> None:
    """One prefill call (left padding, a static cache): a single graph for inductor to compile."""
    from transformers import StaticCache

    ids, mask = _inputs()
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("family", DECODE_LOOP)
def test_compiled_decode_loop_equals_eager(family: str, tmp_path: Path) -> None:
    _compiled_matches_eager(family, decode_loop, "aot_eager", tmp_path)


@pytest.mark.parametrize("family", GENERATE_STATIC)
def test_compiled_generate_static_cache_equals_eager(family: str, tmp_path: Path) -> None:
    _compiled_matches_eager(family, generate_static, "aot_eager", tmp_path)


@needs_compiler
def test_inductor_forward_equals_eager(tmp_path: Path) -> None:
    # One graph: inductor lowers the capture ops next to the model's kernels and compiles them with the C++ compiler.
    # In this process (no pool of compile workers to start: on CI's 2 cores, shared with another test worker,
    # the pool costs more than it saves).
    with torch._inductor.config.patch(compile_threads=1):
        _compiled_matches_eager("qwen3_moe", one_forward, "inductor", tmp_path)


@needs_compiler
@pytest.mark.compile_matrix
@compile_matrix
def test_inductor_generate_static_cache_equals_eager(tmp_path: Path) -> None:
    # Two steps (a prefill graph and a decode graph): inductor compiles each with the C++ compiler.
    _compiled_matches_eager("qwen3_moe", lambda model: generate_static(model, new_tokens=2), "inductor", tmp_path)


def test_no_graph_break_from_the_capture(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    ids, mask = _inputs()
    with moeprobe.record(model, tmp_path / "t", capture="graph"):
        explanation = torch._dynamo.explain(model.forward)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes if node.op == "call_function"]
    # The capture is in the graph, as ops: one token-context record and one routing record per MoE layer.
    assert ops.count("moeprobe.record_step") == 1
    assert ops.count("moeprobe.record_routing") == 2


def test_a_compiled_module_is_recorded_through_its_wrapper(tmp_path: Path) -> None:
    """torch.compile(model) returns a wrapper module: moeprobe finds the layers inside it and drains on its calls."""
    model = build("qwen3_moe").eval()
    ids, mask = _inputs()

    def calls(fn: Callable[..., Any]) -> None:
        with torch.no_grad():
            for _ in range(3):
                fn(input_ids=ids, attention_mask=mask)

    with moeprobe.record(model, tmp_path / "truth"):
        calls(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with moeprobe.record(compiled, tmp_path / "graph", drain_every=1) as probe:
        calls(compiled)
        assert probe._graph_calls == 3  # the drain hook ran eagerly on each call of the wrapper
    assert probe.capture == "graph"
    _assert_same_trace(tmp_path / "truth", tmp_path / "graph")


def test_a_forward_compiled_after_the_stack_took_over_the_drains_gets_the_hook_back(tmp_path: Path) -> None:
    """After the first eager call the stack's wrapper counts the drains and the model's hook is gone. A forward
    compiled after that runs the stack's wrapper inside the graph: it marks that (a store dynamo replays), the
    next eager drain (flush) puts the hook back, and the compiled calls drain every call again: a ring that holds
    one call's tokens loses nothing."""
    model = build("qwen3_moe").eval()
    ids, mask = _inputs()

    def call(fn: Callable[..., Any]) -> None:
        with torch.no_grad():
            fn(input_ids=ids, attention_mask=mask)

    with moeprobe.record(model, tmp_path / "truth"):
        for _ in range(5):
            call(model)
    with moeprobe.record(model, tmp_path / "graph", capture="graph", drain_every=1, ring_tokens=ids.numel()) as probe:
        call(model)
        assert len(model._forward_hooks) == 0  # the stack counts the drains now
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        call(model)  # drained at the flush below, not by the stack (compiled) nor a hook (gone)
        assert probe.flush()
        assert len(model._forward_hooks) == 1
        for _ in range(3):
            call(model)  # one call fills the ring: each must be drained by the hook
    assert probe.anomalies == {}
    _assert_same_trace(tmp_path / "truth", tmp_path / "graph")
    assert len(model._forward_hooks) == 0


def test_hook_capture_on_a_compiled_model_refuses_in_one_line(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    with pytest.raises(UnsupportedModelError) as error:
        moeprobe.record(model, tmp_path / "t", capture="hooks")
    assert "compiled" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "t").exists()


def test_compiling_after_hooks_attached_refuses_and_leaves_the_model_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Hooks traced by dynamo do nothing (a fullgraph compile no longer dies on them) and the trace is refused
    at the next eager point, loudly: never a trace that silently lacks the compiled steps."""
    model = build("mixtral").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    probe = moeprobe.record(model, tmp_path / "t")
    assert probe.capture == "hooks"
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # one eager step, recorded
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    with pytest.raises(UnsupportedModelError, match="compiled"):
        probe.close()
    # one message, the refusal (capture logs; the CLI, or Python's last resort when nothing is configured, prints it)
    said = [r for r in caplog.records if r.name.startswith("moeprobe") and r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].levelno == logging.ERROR and "compiled" in said[0].getMessage(), said
    manifest = moeprobe.open_trace(tmp_path / "t").manifest
    assert manifest["status"] == "aborted" and "compiled" in manifest["error"]
