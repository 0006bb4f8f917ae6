"""The metric families the endpoint exposes, built on every scrape from count snapshots (docs/prometheus.md).

Labels are ``model``, ``rank`` and ``layer``, plus three closed sets: ``slot`` ("1".."N" of the hottest
experts, the expert id is the value), ``reason`` (why the capture dropped records) and, only with
``per_expert``, ``expert``. Nothing grows with the length of the recording or with user input. Formulas come from
``analysis.stats``, the one definition the report and the simulator use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..analysis import stats
from .counts import LATENCY_BUCKETS_S, Histogram
from .options import MetricsOptions, ShardView

# The reasons the capture side drops records for (hooks.pipeline, traces.writer); anything else is "other",
# so a new reason can never add series without a code change here.
DROP_REASONS = ("queue_full", "step_over_budget", "writer_failed", "disk_full", "write_error")


class Families:
    """The families of one scrape, created in a fixed order so that the exposition is stable."""

    def __init__(self) -> None:
        self.items: dict[str, Metric] = {}

    def gauge(self, name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
        if name not in self.items:
            self.items[name] = GaugeMetricFamily(name, doc, labels=labels, unit=unit)
        return self.items[name]  # type: ignore[return-value]

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        if name not in self.items:
            self.items[name] = CounterMetricFamily(name, doc, labels=labels)
        return self.items[name]  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: list[str], unit: str = "") -> HistogramMetricFamily:
        if name not in self.items:
            self.items[name] = HistogramMetricFamily(name, doc, labels=labels, unit=unit)
        return self.items[name]  # type: ignore[return-value]


SHARD = ["model", "rank"]
LAYER = ["model", "rank", "layer"]


def _maxvio(counts: np.ndarray) -> float:
    return stats.maxvio(counts) if counts.sum() > 0 else math.nan


def _balancedness(counts: np.ndarray, ep_size: int) -> float:
    """Over min(ep_size, E) ranks: a layer with fewer experts than ranks leaves the rest empty, not idle."""
    if counts.sum() <= 0:
        return math.nan
    ep_size = min(ep_size, len(counts))
    placement = stats.contiguous_placement(len(counts), ep_size)
    return stats.balancedness(stats.ep_loads(counts, placement, ep_size))


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram, row: int) -> None:
    cumulative = np.cumsum(hist.buckets[row])
    buckets = [(floatToGoString(b), float(c)) for b, c in zip(LATENCY_BUCKETS_S, cumulative[:-1], strict=True)]
    buckets.append(("+Inf", float(cumulative[-1])))
    family.add_metric(labels, buckets, sum_value=float(hist.total_s[row]))


def shard_families(out: Families, view: ShardView, options: MetricsOptions) -> None:
    """Add one shard's samples to ``out``."""
    shard = [view.model, str(view.rank)]
    counts, health = view.counts, view.health
    out.counter("moeprobe_steps", "Forward calls (steps) captured.", SHARD).add_metric(shard, health.steps)
    dropped = out.counter(
        "moeprobe_capture_dropped_decisions",
        "Routing decisions the capture lost, by reason (queue_full: the writer fell behind; step_over_budget: one "
        "step's router outputs alone passed max_queue_mb; disk_full, "
        "write_error: a segment could not be written; writer_failed: the writer stopped; other).",
        [*SHARD, "reason"],
    )
    other = sum(n for reason, n in health.dropped.items() if reason not in DROP_REASONS)
    for reason in DROP_REASONS:
        dropped.add_metric([*shard, reason], int(health.dropped.get(reason, 0)))
    if other:
        dropped.add_metric([*shard, "other"], other)
    out.counter("moeprobe_capture_anomalies", "Capture hook anomalies (a hook failed; the model was unaffected).", SHARD).add_metric(
        shard, health.anomalies
    )
    out.counter(
        "moeprobe_ignored_records",
        "Routing or latency rows left out of every metric: they name a layer or expert the manifest does not have, "
        "or their batch could not be counted.",
        SHARD,
    ).add_metric(shard, counts.ignored_rows)
    if health.read_errors is not None:
        out.counter(
            "moeprobe_trace_read_errors", "Trace segments or manifests moeprobe serve could not read (left out).", SHARD
        ).add_metric(shard, health.read_errors)
    if health.queue_bytes is not None:
        out.gauge("moeprobe_capture_queue_bytes", "Bytes the capture pipeline holds in every stage (queued, collected, converted, being written): what max_queue_mb bounds.", SHARD).add_metric(
            shard, health.queue_bytes
        )
    if health.heartbeat_age_s is not None:
        out.gauge(
            "moeprobe_capture_writer_lag_seconds",
            "Seconds since the trace writer last wrote the manifest (it does at least every 2 s while alive).",
            SHARD,
        ).add_metric(shard, health.heartbeat_age_s)
    out.gauge("moeprobe_window_steps", "Steps with routing in the sliding window of the *_window metrics.", SHARD).add_metric(
        shard, counts.window_steps
    )
    out.gauge("moeprobe_ep_ranks", "Expert-parallel ranks of the placement the balancedness metrics assume.", SHARD).add_metric(
        shard, options.ep_size
    )

    routed = out.counter("moeprobe_routed_tokens", "Tokens routed by the layer's router (padding excluded).", LAYER)
    drops = out.counter("moeprobe_dropped_tokens", "Tokens the layer dropped over an expert's capacity.", LAYER)
    mv_window = out.gauge(
        "moeprobe_maxvio_window",
        "MaxVio (max expert load - mean) / mean over the sliding window of steps (Wang et al. 2024, eq. 4).",
        LAYER,
    )
    mv_start = out.gauge("moeprobe_maxvio_since_start", "MaxVio over every step since the recording started.", LAYER)
    bal_window = out.gauge(
        "moeprobe_ep_balancedness_window",
        "Mean / max load over the EP ranks of a contiguous placement, over the sliding window (1 is even).",
        LAYER,
    )
    bal_start = out.gauge("moeprobe_ep_balancedness_since_start", "EP balancedness over every step since the start.", LAYER)
    dead = out.gauge("moeprobe_dead_experts", "Experts that have received no token since the start.", LAYER)
    router = out.histogram("moeprobe_router_latency_seconds", "Time of the router (gate) call per forward step.", LAYER)
    block = out.histogram("moeprobe_moe_block_latency_seconds", "Time of the whole MoE block per forward step.", LAYER)
    hot_id = hot_load = None
    if options.top_n:
        hot_id = out.gauge(
            "moeprobe_hot_expert_id",
            "Id of the expert at rank `slot` (1 = busiest) by load over the sliding window.",
            [*LAYER, "slot"],
        )
        hot_load = out.gauge(
            "moeprobe_hot_expert_load_ratio",
            "Load of the expert at rank `slot` over the window, relative to the mean expert load (1 = its fair share).",
            [*LAYER, "slot"],
        )
    per_expert = None
    if options.per_expert:
        per_expert = out.counter(
            "moeprobe_expert_assignments", "Routing decisions per expert since the start (--metrics-per-expert).", [*LAYER, "expert"]
        )

    for row, shape in enumerate(counts.layers):
        labels = [*shard, str(shape.index)]
        total = counts.assignments[row, : shape.experts]
        window = counts.window[row, : shape.experts]
        routed.add_metric(labels, int(counts.tokens[row]))
        drops.add_metric(labels, int(counts.dropped[row]))
        mv_window.add_metric(labels, _maxvio(window))
        mv_start.add_metric(labels, _maxvio(total))
        bal_window.add_metric(labels, _balancedness(window, options.ep_size))
        bal_start.add_metric(labels, _balancedness(total, options.ep_size))
        dead.add_metric(labels, float((total == 0).sum()) if total.sum() > 0 else math.nan)
        _histogram(router, labels, counts.router, row)
        _histogram(block, labels, counts.block, row)
        if hot_id is not None and hot_load is not None:
            order = np.argsort(-window, kind="stable")  # ties: the lower expert id first
            mean = window.sum() / shape.experts
            for slot in range(min(options.top_n, shape.experts)):
                expert = int(order[slot])
                has_load = mean > 0
                hot_id.add_metric([*labels, str(slot + 1)], float(expert) if has_load else math.nan)
                hot_load.add_metric([*labels, str(slot + 1)], float(window[expert] / mean) if has_load else math.nan)
        if per_expert is not None:
            for expert in range(shape.experts):
                per_expert.add_metric([*labels, str(expert)], int(total[expert]))


class MoeCollector(Collector):
    """A prometheus_client collector over a function that returns the shards to expose at scrape time."""

    def __init__(self, shards: Callable[[], list[ShardView]], options: MetricsOptions | None = None) -> None:
        self.shards = shards
        self.options = options or MetricsOptions()

    def collect(self) -> Iterator[Metric]:
        out = Families()
        for view in self.shards():
            shard_families(out, view, self.options)
        yield from out.items.values()

