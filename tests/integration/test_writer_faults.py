"""The writer thread under bad input and a sink that hangs: one malformed step costs that step only, expert ids
outside their layer are never written (nor wrapped), drops are counted in constant memory, and closing over a
stuck sink marks the trace ``aborted`` in bounded time.

Steps are real ``StepBuffer``s handed to the production ``CapturePipeline`` and ``ShardWriter``; the stuck sink is
a ShardWriter subclass through Probe's ``writer_class`` seam (as in test_slow_sink.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.compute as pc
import torch

import moeprobe
from moeprobe.hooks.capture import LayerCapture, StepBuffer
from moeprobe.hooks.pipeline import CapturePipeline
from moeprobe.hooks.probe import Probe
from moeprobe.hooks.timing import CpuClock
from moeprobe.traces import ShardWriter, prepare_trace_dir
from tests.support import layer_meta
from tests.tiny_models import build

TOKENS, K, EXPERTS = 4, 2, 8


def _step(number: int, indices: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> StepBuffer:
    step = StepBuffer(step=number)
    if indices is None:
        indices = torch.arange(TOKENS * K).reshape(TOKENS, K) % EXPERTS
    if weights is None:
        weights = torch.full(tuple(indices.shape), 0.5)
    step.layers.append(LayerCapture(layer=0, context=None, indices=indices, weights=weights, scores=None, dropped=None))
    return step


def _pipeline(path: Path) -> CapturePipeline:
    prepare_trace_dir(path, force=False)
    writer = ShardWriter(path, model={"name": "m"}, layers=layer_meta(1, EXPERTS, K), options={})
    return CapturePipeline(writer, clock=CpuClock(), flush_interval=0.05)


def test_one_malformed_step_is_dropped_alone_and_the_rest_is_recorded(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path / "t")
    for number in range(31):
        # Step 3 has gate weights of the wrong width (the bug that used to end the recording).
        weights = torch.full((TOKENS, K + 1), 0.5) if number == 3 else None
        assert pipeline.submit(_step(number, weights=weights))
    pipeline.close("complete")
    trace = moeprobe.open_trace(tmp_path / "t")
    counters = trace.manifest["counters"]
    assert counters["dropped"] == {"bad_step": TOKENS * K}
    # (token_count_mismatch: these hand-made steps carry no token context, which is counted too)
    assert {k: v for k, v in counters["anomalies"].items() if k != "token_count_mismatch"} == {"bad_step:ValueError": 1}
    steps = sorted(set(trace.routing().column("step").to_pylist()))
    assert steps == [n for n in range(31) if n != 3]
    assert trace.status == "complete" and trace.routing().num_rows == 30 * TOKENS * K


def test_expert_ids_outside_the_layer_are_counted_not_written_or_wrapped(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path / "t")
    # int16 would wrap 40000 to -25536 and 65536 to 0 (expert 0): neither may reach the table.
    indices = torch.tensor([[0, 1], [-1, 2], [300, 3], [65536, 40000]], dtype=torch.int64)
    pipeline.submit(_step(0, indices=indices))
    pipeline.close("complete")
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.manifest["counters"]["anomalies"]["expert_out_of_range"] == 4
    experts = trace.routing().column("expert")
    assert sorted(experts.to_pylist()) == [0, 1, 2, 3]
    assert pc.min(experts).as_py() >= 0


class StuckSinkWriter(ShardWriter):
    """Writes like ShardWriter until ``stuck`` is set; from then on a segment write hangs until ``release``."""

    stuck = threading.Event()
    release = threading.Event()
    entered = threading.Event()  # the writer thread is inside a hanging write

    def _flush_table(self, table: str) -> None:
        if self.stuck.is_set() and self._pending_rows.get(table):
            self.entered.set()
            self.release.wait(60)  # bounded: the test sets it at the end
        super()._flush_table(table)


def test_a_stuck_sink_drops_in_constant_memory_and_close_marks_the_trace_aborted(tmp_path: Path) -> None:
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 8))
    StuckSinkWriter.stuck.clear()
    StuckSinkWriter.release.clear()
    StuckSinkWriter.entered.clear()
    probe = Probe(model, tmp_path / "t", flush_interval=0.05, max_queue_mb=0.005, writer_class=StuckSinkWriter,
                  close_timeout=1.0)
    try:
        # Stuck from the first step on: set after it, the writer could write that step (its only rows) before the
        # flush below asks, and then never reach a hanging write (seen once under a loaded -n 2 run).
        StuckSinkWriter.stuck.set()
        model(ids)
        # Wait until the writer hangs in the sink (an event, not a sleep): from here on nothing leaves the queue.
        assert probe.pipeline is not None
        probe.pipeline.flush(timeout=0)
        assert StuckSinkWriter.entered.wait(30)
        steps = 20
        for _ in range(steps):
            model(ids)
        pipeline = probe.pipeline
        # Drops were counted, not queued: the queue holds only what the byte budget admitted, and every other
        # step is in the constant-size counter. Each step is accounted exactly once: dropped, still queued, or
        # taken by the writer before its sink got stuck (one may be in the writer's hands, not yet counted).
        per_step = 2 * 8 * 2 * 2  # tokens x layers x top-2
        assert pipeline.queued_bytes <= pipeline.max_queue_bytes
        queued = len(pipeline._queue)
        converted = pipeline.writer.counters["steps"]
        dropped = sum(pipeline._dropped.values()) + pipeline.writer.counters["dropped"].get("queue_full", 0)
        assert dropped % per_step == 0 and dropped >= per_step
        accounted = dropped // per_step + queued + converted
        assert steps <= accounted <= steps + 1
        closer = threading.Thread(target=probe.close)
        closer.start()
        closer.join(30)  # close waits close_timeout (1 s) for the stuck writer, then gives up on it
        assert not closer.is_alive()
    finally:
        StuckSinkWriter.release.set()
        StuckSinkWriter.stuck.clear()
    shard = json.loads((tmp_path / "t" / "rank=0" / "shard.json").read_text())
    assert shard["status"] == "aborted" and "did not finish within 1 s" in shard["error"]
    assert shard["counters"]["dropped"]["queue_full"] > 0
    # The stuck thread, once released, cannot turn the final status back to complete.
    probe.pipeline._thread.join(30)
    assert moeprobe.open_trace(tmp_path / "t").status == "aborted"
