"""Cumulative and sliding-window routing counts in numpy, fed with the trace's own tables.

The recording pipeline hands every routing and latency table it writes to :meth:`LiveCounts.add` on its writer
thread (never on the model's thread); ``moeprobe serve`` hands it the segments it reads back from disk. Either
way the numbers the endpoint shows are computed from exactly the rows the trace holds.

The sliding window is the last ``window_steps`` forward calls by step number: rows with
``step > newest_step - window_steps``. Per-step counts live in a ring of ``window_steps`` slots (slot =
step mod window), so adding a batch costs one ``bincount`` over the batch's rows and nothing proportional to the
age of the recording.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

# Latency histogram bucket bounds in seconds (Prometheus base unit). Seven finite buckets keep a 58-layer model
# under 2,000 series by default (docs/prometheus.md has the formula); they span a router call on a GPU (~0.1
# ms) to a MoE block on a CPU (tens of ms).
LATENCY_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05)
DEFAULT_WINDOW_STEPS = 128
# The window ring holds window_steps x layers x experts int64 counts: 1.9 M cells (15 MB) for DeepSeek-V3 at the
# default window. Past this many cells (128 MB) a manifest is refused rather than allowed to exhaust memory.
MAX_WINDOW_CELLS = 1 << 24


@dataclass(frozen=True)
class LayerShape:
    index: int  # MoE layer index as the trace names it
    experts: int
    top_k: int


@dataclass(frozen=True)
class Histogram:
    """Per-layer latency histogram: ``buckets[l, i]`` observations in (bound[i-1], bound[i]], the last column
    above every bound (+Inf); ``total_s`` the sum of observations in seconds."""

    buckets: np.ndarray  # (L, B + 1) int64, not cumulative
    total_s: np.ndarray  # (L,) float64

    @property
    def count(self) -> np.ndarray:
        return np.asarray(self.buckets.sum(axis=1))


@dataclass(frozen=True)
class CountsSnapshot:
    layers: tuple[LayerShape, ...]
    tokens: np.ndarray  # (L,) tokens routed (one per token, whatever k)
    dropped: np.ndarray  # (L,) tokens dropped over an expert's capacity
    assignments: np.ndarray  # (L, E_max) routing decisions per expert since the start
    window: np.ndarray  # (L, E_max) the same over the sliding window
    window_steps: int  # steps with routing rows in the window
    newest_step: int  # -1 before any routing row
    router: Histogram
    block: Histogram
    ignored_rows: int  # rows naming a layer or expert the manifest does not have


def layer_shapes(layers: Sequence[Mapping[str, Any]]) -> tuple[LayerShape, ...]:
    """The manifest's layer entries as shapes, checked: a metric over a wrong expert count would be wrong."""
    shapes = []
    for entry in layers:
        try:
            index, experts, top_k = int(entry["index"]), int(entry["num_experts"]), int(entry["top_k"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a MoE layer entry of the manifest has no usable index, num_experts and top_k ({exc!r})") from exc
        # Expert and layer columns are int16 in the trace: anything outside cannot be a real layer.
        if not (0 <= index < 1 << 15 and 1 <= experts <= 1 << 15 and top_k >= 1):
            raise ValueError(f"MoE layer entry with index {index}, {experts} experts, top-{top_k} is out of range")
        shapes.append(LayerShape(index, experts, top_k))
    if len({s.index for s in shapes}) != len(shapes):
        raise ValueError("the manifest names a MoE layer index twice")
    return tuple(shapes)


class LiveCounts:
    """Routing and latency counts of one shard (one rank). Thread-safe: one thread adds, others snapshot."""

    def __init__(self, layers: Sequence[Mapping[str, Any]], *, window_steps: int = DEFAULT_WINDOW_STEPS) -> None:
        if window_steps < 1:
            raise ValueError("window_steps must be at least 1")
        self.layers = layer_shapes(layers)
        self.window_steps = window_steps
        n = len(self.layers)
        self._experts_max = max((s.experts for s in self.layers), default=1)
        if window_steps * n * self._experts_max > MAX_WINDOW_CELLS:
            raise ValueError(
                f"a window of {window_steps} steps over {n} layers x {self._experts_max} experts needs "
                f"{window_steps * n * self._experts_max:,} counters; use fewer window steps"
            )
        max_index = max((s.index for s in self.layers), default=-1)
        self._row_of = np.full(max_index + 2, -1, np.int64)  # layer index -> row; last entry for out-of-range
        for row, shape in enumerate(self.layers):
            self._row_of[shape.index] = row
        self._experts_of = np.array([s.experts for s in self.layers], np.int64)
        self._lock = threading.Lock()
        self._tokens = np.zeros(n, np.int64)
        self._dropped = np.zeros(n, np.int64)
        self._assignments = np.zeros((n, self._experts_max), np.int64)
        self._ring = np.zeros((window_steps, n * self._experts_max), np.int64)
        self._ring_step = np.full(window_steps, -1, np.int64)
        self._newest = -1
        buckets = len(LATENCY_BUCKETS_S) + 1
        self._bounds = np.asarray(LATENCY_BUCKETS_S)
        self._lat_buckets = {name: np.zeros((n, buckets), np.int64) for name in ("router", "block")}
        self._lat_sum = {name: np.zeros(n, np.float64) for name in ("router", "block")}
        self._ignored = 0
        self._warned = False

    # -- feeding (writer thread or follower) -----------------------------------------------------------
    def add(self, table: str, data: pa.Table) -> None:
        """Count one batch of rows of ``table`` (trace schema); tables other than routing and latency are ignored."""
        if data.num_rows == 0:
            return
        try:
            if table == "routing":
                self._add_routing(data)
            elif table == "latency":
                self._add_latency(data)
        except Exception as exc:  # noqa: BLE001 - the writer thread calls this: a metrics bug must not cost records
            with self._lock:
                self._ignored += data.num_rows
            if not self._warned:
                self._warned = True
                log.warning("moeprobe: metrics could not count a %s batch (%s: %s); its rows are counted in "
                            "moeprobe_ignored_records_total", table, type(exc).__name__, exc)

    def _rows_of(self, layer: np.ndarray) -> np.ndarray:
        """Row of each layer index, -1 for an index the manifest does not have."""
        clipped = np.where((layer >= 0) & (layer < len(self._row_of) - 1), layer, len(self._row_of) - 1)
        return self._row_of[clipped]

    def _add_routing(self, data: pa.Table) -> None:
        step = data.column("step").to_numpy().astype(np.int64, copy=False)
        row = self._rows_of(data.column("layer").to_numpy().astype(np.int64))
        expert = data.column("expert").to_numpy().astype(np.int64)
        first = data.column("k").to_numpy() == 0  # one row per token carries the token-level columns
        dropped = data.column("dropped").to_numpy(zero_copy_only=False)
        known = row >= 0
        in_range = np.zeros(len(row), bool)
        in_range[known] = (expert[known] >= 0) & (expert[known] < self._experts_of[row[known]])
        ok = known & in_range
        bad = int((~ok).sum())
        if bad:
            step, row, expert, first, dropped = step[ok], row[ok], expert[ok], first[ok], dropped[ok]
        n, width = len(self.layers), self._experts_max
        cell = row * width + expert
        tokens = np.bincount(row[first], minlength=n)
        drops = np.bincount(row[first & dropped], minlength=n)
        per_expert = np.bincount(cell, minlength=n * width).reshape(n, width)
        with self._lock:
            self._ignored += bad
            self._tokens += tokens
            self._dropped += drops
            self._assignments += per_expert
            if len(step):
                self._add_window(step, cell)

    def _add_window(self, step: np.ndarray, cell: np.ndarray) -> None:
        w = self.window_steps
        self._newest = max(self._newest, int(step.max()))
        recent = step > self._newest - w
        if not recent.any():
            return
        # Steps in the window are newest - w + 1 .. newest: their offset from the oldest is a dense index, which
        # avoids sorting the batch (np.unique) on every flush.
        oldest = self._newest - w + 1
        offset = step[recent] - oldest
        width = self._ring.shape[1]
        per_step = np.bincount(offset * width + cell[recent], minlength=w * width).reshape(w, width)
        present = np.flatnonzero(np.bincount(offset, minlength=w))
        for s, counts in zip((present + oldest).tolist(), per_step[present], strict=True):
            slot = s % w
            if self._ring_step[slot] != s:
                if self._ring_step[slot] > s:
                    continue  # a newer step holds the slot: s is outside the window
                self._ring[slot] = 0
                self._ring_step[slot] = s
            self._ring[slot] += counts

    def _add_latency(self, data: pa.Table) -> None:
        row = self._rows_of(data.column("layer").to_numpy().astype(np.int64))
        n, buckets = len(self.layers), len(self._bounds) + 1
        known = row >= 0
        updates = {}
        for name in ("router", "block"):
            ms = data.column(f"{name}_ms").to_numpy(zero_copy_only=False).astype(np.float64)
            ok = known & np.isfinite(ms) & (ms >= 0)  # a missing mark is NaN: no observation, not zero
            seconds = ms[ok] / 1000.0
            # side="left": a value equal to a bound belongs to that bound's bucket (le = "less or equal").
            bucket = np.searchsorted(self._bounds, seconds, side="left")
            updates[name] = (
                np.bincount(row[ok] * buckets + bucket, minlength=n * buckets).reshape(n, buckets),
                np.bincount(row[ok], weights=seconds, minlength=n),
            )
        with self._lock:
            self._ignored += int((~known).sum())
            for name, (counts, total) in updates.items():
                self._lat_buckets[name] += counts
                self._lat_sum[name] += total

    # -- reading (HTTP thread) -------------------------------------------------------------------------
    def snapshot(self) -> CountsSnapshot:
        with self._lock:
            live = (self._ring_step >= 0) & (self._ring_step > self._newest - self.window_steps)
            window = self._ring[live].sum(axis=0).reshape(len(self.layers), self._experts_max)
            return CountsSnapshot(
                layers=self.layers,
                tokens=self._tokens.copy(),
                dropped=self._dropped.copy(),
                assignments=self._assignments.copy(),
                window=window,
                window_steps=int(live.sum()),
                newest_step=self._newest,
                router=Histogram(self._lat_buckets["router"].copy(), self._lat_sum["router"].copy()),
                block=Histogram(self._lat_buckets["block"].copy(), self._lat_sum["block"].copy()),
                ignored_rows=self._ignored,
            )
