"""``max_queue_bytes`` counts every stage of the capture pipeline that holds memory: steps queued on the model
side, steps taken and collected by the writer, converted rows awaiting a flush, and the tables of a flush being
written. A writer stalled in a flush therefore admits only what the budget has left beside what it holds; later
steps are dropped and counted in the manifest, never silently.

Real ``StepBuffer``s, the production ``CapturePipeline`` and ``ShardWriter``; the stall is a ShardWriter subclass
whose segment write waits on an event (the seam test_writer_faults.py uses). Snapshots of the ledger are taken
on the writer thread itself through ``submit_call`` (queue order), or while the writer is known to be stalled:
no timing assumptions.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

import moeprobe
from moeprobe.hooks.capture import LayerCapture, StepBuffer
from moeprobe.hooks.pipeline import STAGES, CapturePipeline
from moeprobe.hooks.timing import CpuClock
from moeprobe.traces import ShardWriter, prepare_trace_dir
from tests.support import layer_meta

TOKENS, K, EXPERTS = 4096, 8, 64
DECISIONS = TOKENS * K
BUDGET = 8 << 20


class StallingWriter(ShardWriter):
    """Writes like ShardWriter until ``stall`` is set; then a segment write waits for ``release``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stall = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        super().__init__(*args, **kwargs)

    def _flush_table(self, table: str) -> None:
        if self.stall.is_set() and self._pending_rows.get(table):
            self.entered.set()
            self.release.wait(60)  # bounded: the test sets it
        super()._flush_table(table)


def _step(number: int, scores: bool = False) -> StepBuffer:
    generator = torch.Generator().manual_seed(number)
    indices = torch.stack([torch.randperm(EXPERTS, generator=generator)[:K] for _ in range(16)]).repeat(TOKENS // 16, 1)
    weights = torch.linspace(0.5, 0.1, K).repeat(TOKENS, 1)
    step = StepBuffer(step=number)
    step.layers.append(LayerCapture(
        layer=0, context=None, indices=indices, weights=weights,
        scores=torch.rand(TOKENS, EXPERTS, generator=generator) if scores else None, dropped=None,
    ))
    return step


def test_a_writer_stalled_in_a_flush_keeps_everything_it_holds_within_the_budget(tmp_path: Path) -> None:
    prepare_trace_dir(tmp_path / "t", force=False)
    writer = StallingWriter(tmp_path / "t", model={"name": "m"}, layers=layer_meta(1, EXPERTS, K), options={})
    # A flush interval that never comes: the writer wakes only when the test asks (flush) or the queue fills.
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1000.0, max_queue_bytes=BUDGET)
    first = _step(0, scores=True)
    size = first.nbytes()
    assert size < BUDGET // 4  # below the wake-up threshold: nothing runs before the flush below
    snapshots: list[dict[str, int]] = []
    assert pipeline.submit(first)
    pipeline.submit_call(lambda: snapshots.append(pipeline.stage_bytes()))  # on the writer thread, after the step
    writer.stall.set()
    pipeline.flush(timeout=0)
    assert writer.entered.wait(30)  # the writer is inside the segment write, holding the flush's tables

    # Taken and collected: the routing arrays in `collected`, the scores rows already in `converted`.
    collected = snapshots[0]
    scores_bytes = TOKENS * EXPERTS * 4
    assert collected["queued"] == 0 and collected["writing"] == 0
    assert collected["collected"] >= DECISIONS * (8 + 4)  # int64 ids + float32 weights, at least
    assert collected["converted"] >= scores_bytes

    stalled = pipeline.stage_bytes()
    writing = stalled["writing"]
    assert writing >= scores_bytes and stalled == {**dict.fromkeys(STAGES, 0), "writing": writing}
    assert pipeline.held_bytes == writing

    # Later steps: admitted only while queued + what the stalled writer holds stays within the budget.
    later = _step(1)
    later_size = later.nbytes()
    accepted, refused = 0, 0
    for number in range(1, 41):
        if pipeline.submit(_step(number)):
            assert refused == 0  # nothing frees memory while the writer is stalled: no admission after a refusal
            accepted += 1
        else:
            refused += 1
        assert pipeline.held_bytes <= BUDGET
    assert accepted == (BUDGET - writing) // later_size
    assert accepted < BUDGET // later_size  # counting only the queue would have admitted more
    assert refused == 40 - accepted

    writer.release.set()
    pipeline.close("complete")
    assert pipeline.stage_bytes() == dict.fromkeys(STAGES, 0)
    trace = moeprobe.open_trace(tmp_path / "t")
    counters = trace.manifest["counters"]
    assert counters["dropped"] == {"queue_full": refused * DECISIONS}
    assert counters["decisions"] == (1 + accepted) * DECISIONS
    assert trace.routing().num_rows == (1 + accepted) * DECISIONS


def test_converted_rows_are_flushed_before_they_crowd_out_new_steps(tmp_path: Path) -> None:
    # A flush interval that never comes and a budget of a few steps: without early flushes, converted rows
    # would fill the budget and every later step would be dropped although the writer is idle.
    prepare_trace_dir(tmp_path / "t", force=False)
    writer = ShardWriter(tmp_path / "t", model={"name": "m"}, layers=layer_meta(1, EXPERTS, K), options={})
    size = _step(0).nbytes()
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1000.0, max_queue_bytes=3 * size)
    steps = 60
    for number in range(steps):
        assert pipeline.submit(_step(number))
        # Each step is over a quarter of the budget, so its submit wakes the writer; the test waits until the
        # writer is past it (queue order; bounded wait), as a model slower than the writer would.
        done = threading.Event()
        pipeline.submit_call(done.set)
        assert done.wait(30)
        assert pipeline.held_bytes <= pipeline.max_queue_bytes
    pipeline.close("complete")
    counters = moeprobe.open_trace(tmp_path / "t").manifest["counters"]
    assert counters["dropped"] == {} and counters["decisions"] == steps * DECISIONS
    assert counters["segments"]["routing"] > 1  # written in batches as the rows passed a quarter of the budget
