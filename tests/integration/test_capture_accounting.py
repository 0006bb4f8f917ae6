"""The GPU path's accounting, proven on CPU: clock marks of dropped steps go back to the pool, an exhausted pool
is reported, the drop decision comes before the device-to-host copy, context tensors count in the byte budget,
and steps that captured nothing are counted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

import moeprobe
from moeprobe.hooks.capture import LayerCapture, StepBuffer
from moeprobe.hooks.token_context import TokenContext
from moeprobe.hooks.pipeline import CapturePipeline
from moeprobe.hooks.probe import Probe
from moeprobe.hooks.timing import CpuClock, CudaClock
from moeprobe.traces.writer import ShardWriter, prepare_trace_dir
from tests.tiny_models import build


class HostEvent:
    """What CudaClock needs of a torch.cuda.Event (record, query, elapsed_time), on the host clock."""

    def __init__(self) -> None:
        self.t = 0

    def record(self) -> None:
        self.t = time.perf_counter_ns()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) / 1e6


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))


def test_marks_of_dropped_steps_go_back_to_the_pool(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    clock = CudaClock(pool_size=64, event_factory=HostEvent)
    # A zero byte budget: every step is dropped. 2 layers x 4 marks a step: without the release the 64-event
    # pool would run dry on the 9th step and latency would vanish for the rest of the run.
    with Probe(model, tmp_path / "t", max_queue_mb=0, clock=clock), torch.no_grad():
        for _ in range(40):
            model(_ids())
            assert clock.outstanding == 0
    assert clock.exhausted == 0
    counters = moeprobe.open_trace(tmp_path / "t").manifest["counters"]
    assert counters["steps"] == 0 and sum(counters["dropped"].values()) == 40 * 2 * 12 * 2


def test_kept_steps_release_their_marks_and_time_with_them(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    clock = CudaClock(pool_size=64, event_factory=HostEvent)
    with Probe(model, tmp_path / "t", clock=clock) as probe, torch.no_grad():
        for _ in range(20):
            model(_ids())
            # Waiting for the writer each step keeps this test's 64-event pool from running dry on a loaded
            # machine (a writer behind by 8 steps holds all 64): that case is the next test's.
            assert probe.flush()
            assert clock.outstanding == 0
    assert clock.exhausted == 0
    trace = moeprobe.open_trace(tmp_path / "t")
    latency = trace.sql("select count(*) n, count(*) filter (where not isnan(block_ms)) timed, min(block_ms) lo, any_value(clock) c from latency").to_pylist()[0]
    assert latency == {**latency, "n": 40, "timed": 40, "c": "cuda_event"} and latency["lo"] > 0


def test_an_exhausted_event_pool_is_reported(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    clock = CudaClock(pool_size=6, event_factory=HostEvent)  # one step needs 8 marks
    with Probe(model, tmp_path / "t", clock=clock), torch.no_grad():
        model(_ids())
    assert clock.exhausted == 2
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["anomalies"]["latency:events_exhausted"] == 2
    # The layer whose marks were missing has no latency (NaN), never a made-up one.
    assert trace.sql("select count(*) filter (where isnan(block_ms)) missing from latency").to_pylist()[0]["missing"] == 1


def _pipeline(tmp_path: Path, budget: int) -> CapturePipeline:
    prepare_trace_dir(tmp_path / "t", force=False)
    writer = ShardWriter(tmp_path / "t", model={"name": "m"}, layers=[{"index": 0, "num_experts": 4, "top_k": 1}], options={}, rank=0, world_size=1)
    return CapturePipeline(writer, clock=CpuClock(), max_queue_bytes=budget)


def _step(tokens: int) -> StepBuffer:
    step = StepBuffer(step=0)
    step.layers.append(LayerCapture(layer=0, context=None, indices=torch.zeros(tokens, 1, dtype=torch.int64), weights=torch.ones(tokens, 1), scores=None, dropped=None))
    return step


def test_the_drop_decision_comes_before_the_copy(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, budget=1000)
    moved: list[int] = []
    try:
        assert _step(100).nbytes() > 1000
        assert pipeline.submit(_step(100), move=lambda s: moved.append(s.step)) is False
        assert moved == []  # a dropped step pays no transfer
        assert pipeline.submit(_step(10), move=lambda s: moved.append(s.step)) is True
        assert moved == [0]
    finally:
        pipeline.close("complete")


def test_context_tensors_count_in_the_byte_budget() -> None:
    step = _step(64)
    mask = torch.zeros(64, 8192, dtype=torch.int64)  # a decode step's 2-D mask: 4 MiB on its way to the host
    step.contexts.append(TokenContext(stack_id=0, batch=64, seq_len=1, continuity="continue", input_ids=None, position_ids=None, attention_mask=mask, mask_4d=None, past_len=8191))
    assert step.nbytes() >= 64 * 8192 * 8


def test_steps_that_capture_nothing_are_counted(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    with moeprobe.record(model, tmp_path / "t") as probe, torch.no_grad():
        model(_ids())
        try:
            model(input_ids=None)  # raises in the model before any MoE layer or token context
        except Exception:  # noqa: BLE001 - the model's own error; the probe must only count the empty step
            pass
        model(_ids())
    assert probe.anomalies.get("empty_step") == 1
    manifest: dict[str, Any] = moeprobe.open_trace(tmp_path / "t").manifest
    assert manifest["counters"]["anomalies"]["empty_step"] == 1
    assert manifest["counters"]["steps"] == 2


def test_a_step_whose_captures_pass_the_budget_releases_them_and_counts_its_decisions() -> None:
    # The in-flight step's router outputs (on the GPU for a CUDA model) count against the byte budget while
    # the step runs: past it the step keeps nothing more and releases what it kept. Same code on CPU tensors.
    step = StepBuffer(step=0)
    captures = [LayerCapture(layer=i, context=None, indices=torch.zeros(100, 2, dtype=torch.int64),
                             weights=torch.ones(100, 2, dtype=torch.bfloat16), scores=None, dropped=None) for i in range(3)]
    per_layer = 100 * 2 * 8 + 100 * 2 * 2
    assert captures[0].nbytes() == per_layer
    assert step.keep(captures[0], limit=2 * per_layer) and step.keep(captures[1], limit=2 * per_layer)
    assert step.held_bytes == 2 * per_layer and not step.over_budget
    assert not step.keep(captures[2], limit=2 * per_layer)
    assert step.over_budget and step.layers == [] and step.held_bytes == 0 and step.lost == 3 * 200
    assert not step.keep(captures[0], limit=1 << 40)  # once over, the rest of the step is only counted
    assert step.lost == 4 * 200


def test_steps_over_the_budget_while_capturing_are_dropped_and_counted(tmp_path: Path) -> None:
    model = build("mixtral").eval()
    with Probe(model, tmp_path / "ref"), torch.no_grad():
        model(_ids())
    per_step = moeprobe.open_trace(tmp_path / "ref").manifest["counters"]["decisions"]
    # A budget below one layer's router outputs: every step stops keeping its captures at its first MoE layer.
    with Probe(model, tmp_path / "t", max_queue_mb=64 / 2**20), torch.no_grad():
        for _ in range(5):
            model(_ids())
    counters = moeprobe.open_trace(tmp_path / "t").manifest["counters"]
    assert counters["dropped"] == {"step_over_budget": 5 * per_step}
    assert counters["steps"] == 0 and counters["decisions"] == 0
