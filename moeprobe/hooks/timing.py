"""Clocks for router and MoE-block latency: CUDA events on GPU, a monotonic clock on CPU.

A CUDA event is recorded on the model's stream and resolved later on the writer thread, so timing never
synchronises the host. Events come from a bounded pool; when it runs dry the latency of that layer and step
is skipped and counted, not waited for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch


class CpuClock:
    name = "perf_counter"

    # The clock itself, not a method calling it: a mark is taken four times per MoE layer per step on the model's
    # thread, and a Python frame there costs more than the clock read.
    mark = staticmethod(time.perf_counter_ns)

    @staticmethod
    def elapsed_ms(start: Any, end: Any) -> float | None:
        if start is None or end is None:
            return None
        return float((end - start) / 1e6)

    def release(self, marks: Iterable[Any]) -> None:
        pass


class CudaClock:
    name = "cuda_event"

    def __init__(self, pool_size: int = 8192, event_factory: Any = None) -> None:
        # event_factory: how an event is made (torch.cuda.Event); the pool's accounting is tested on CPU with
        # host events that record, query and time the same way.
        self._new = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._free: list[Any] = [self._new() for _ in range(min(pool_size, 512))]
        self._created = len(self._free)
        self._limit = pool_size
        self.exhausted = 0  # marks the pool could not supply: reported as an anomaly in the manifest

    @property
    def outstanding(self) -> int:
        """Events handed out and not yet released."""
        return self._created - len(self._free)

    def mark(self) -> Any:
        if self._free:
            event = self._free.pop()
        elif self._created < self._limit:
            event = self._new()
            self._created += 1
        else:
            self.exhausted += 1
            return None
        event.record()
        return event

    @staticmethod
    def elapsed_ms(start: Any, end: Any) -> float | None:
        if start is None or end is None:
            return None
        while not end.query():  # writer thread only: waits for the GPU, never the model's host thread
            time.sleep(0.0002)
        return float(start.elapsed_time(end))

    def release(self, marks: Iterable[Any]) -> None:
        self._free.extend(m for m in marks if m is not None)
