"""LiveCounts and the exposition against answers computed from the rows themselves."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moeprobe.metrics.collector import MoeCollector
from moeprobe.metrics.counts import LATENCY_BUCKETS_S, LiveCounts
from moeprobe.metrics.options import Health, MetricsOptions, ShardView
from moeprobe.traces.schema import TABLES
from tests.metrics_support import expected_counts, maxvio, parse, same, value, values_of
from tests.support import layer_meta

LAYERS = [
    {"index": 0, "num_experts": 4, "top_k": 2},
    {"index": 1, "num_experts": 6, "top_k": 2},
]


def _routing(steps: range, tokens_per_step: int, seed: int = 0) -> pa.Table:
    """Top-2 routing for both layers, skewed towards low expert ids, every 7th token dropped."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {name: [] for name in TABLES["routing"].names}
    for step in steps:
        for layer, experts in ((0, 4), (1, 6)):
            p = np.linspace(2, 1, experts)
            p /= p.sum()
            picks = np.stack([rng.choice(experts, 2, replace=False, p=p) for _ in range(tokens_per_step)])
            n = picks.size
            token = np.repeat(np.arange(tokens_per_step), 2)
            cols["step"].append(np.full(n, step, np.int32))
            cols["sequence"].append(np.zeros(n, np.int64))
            cols["position"].append(token.astype(np.int32))
            cols["token_id"].append(token.astype(np.int32))
            cols["phase"].append(np.full(n, "prefill"))
            cols["layer"].append(np.full(n, layer, np.int16))
            cols["k"].append(np.tile([0, 1], tokens_per_step).astype(np.int8))
            cols["expert"].append(picks.reshape(-1).astype(np.int16))
            cols["weight"].append(np.full(n, 0.5, np.float32))
            cols["dropped"].append((token + step) % 7 == 0)
    return pa.table({k: np.concatenate(v) for k, v in cols.items()}, schema=TABLES["routing"])


def _exposition(counts: LiveCounts, options: MetricsOptions, health: Health | None = None) -> str:
    registry = CollectorRegistry(auto_describe=False)
    view = ShardView("m", 0, counts.snapshot(), health or Health(steps=0))
    registry.register(MoeCollector(lambda: [view], options))
    return generate_latest(registry).decode()


def test_totals_and_window_equal_the_rows_whatever_the_batching() -> None:
    routing = _routing(range(12), tokens_per_step=5)
    counts = LiveCounts(LAYERS, window_steps=5)
    # Batches that split steps in the middle: the ring merges a step's rows wherever they arrive.
    for lo, hi in ((0, 37), (37, 200), (200, routing.num_rows)):
        counts.add("routing", routing.slice(lo, hi - lo))
    snap = counts.snapshot()
    first = routing.column("k").to_numpy() == 0
    for row, (layer, experts) in enumerate(((0, 4), (1, 6))):
        in_layer = routing.column("layer").to_numpy() == layer
        assert snap.tokens[row] == (first & in_layer).sum() == 60
        assert snap.dropped[row] == (first & in_layer & routing.column("dropped").to_numpy()).sum()
        assert list(snap.assignments[row, :experts]) == list(expected_counts(routing, layer, experts))
        assert list(snap.window[row, :experts]) == list(expected_counts(routing, layer, experts, min_step=7))
        assert snap.assignments[row, experts:].sum() == 0
    assert snap.window_steps == 5 and snap.newest_step == 11


def test_metric_values_follow_the_definitions() -> None:
    routing = _routing(range(10), tokens_per_step=8, seed=3)
    counts = LiveCounts(LAYERS, window_steps=4)
    counts.add("routing", routing)
    samples = parse(_exposition(counts, MetricsOptions(top_n=3, ep_size=2, window_steps=4)))
    for layer, experts in ((0, 4), (1, 6)):
        labels = {"model": "m", "rank": "0", "layer": layer}
        total = expected_counts(routing, layer, experts)
        window = expected_counts(routing, layer, experts, min_step=6)
        assert same(value(samples, "moeprobe_maxvio_since_start", **labels), maxvio(total))
        assert same(value(samples, "moeprobe_maxvio_window", **labels), maxvio(window))
        # Contiguous placement over 2 ranks: the first half of the experts on rank 0.
        ranks = np.array([window[: experts // 2].sum(), window[experts // 2 :].sum()])
        assert same(value(samples, "moeprobe_ep_balancedness_window", **labels), ranks.mean() / ranks.max())
        assert value(samples, "moeprobe_dead_experts", **labels) == (total == 0).sum()
        assert value(samples, "moeprobe_routed_tokens_total", **labels) == 80
        order = sorted(range(experts), key=lambda e: (-window[e], e))
        for slot in range(3):
            assert value(samples, "moeprobe_hot_expert_id", slot=slot + 1, **labels) == order[slot]
            ratio = window[order[slot]] / (window.sum() / experts)
            assert same(value(samples, "moeprobe_hot_expert_load_ratio", slot=slot + 1, **labels), ratio)
    assert not values_of(samples, "moeprobe_expert_assignments_total")


def test_per_expert_series_only_when_asked() -> None:
    routing = _routing(range(3), tokens_per_step=4)
    counts = LiveCounts(LAYERS)
    counts.add("routing", routing)
    samples = parse(_exposition(counts, MetricsOptions(per_expert=True)))
    got = values_of(samples, "moeprobe_expert_assignments_total")
    assert len(got) == 4 + 6
    for labels, v in got:
        layer, expert = int(labels["layer"]), int(labels["expert"])
        assert v == expected_counts(routing, layer, 4 if layer == 0 else 6)[expert]


def test_rows_outside_the_manifest_are_left_out_and_counted() -> None:
    good = _routing(range(2), tokens_per_step=3)
    bad_layer = good.slice(0, 4).set_column(5, "layer", pa.array(np.full(4, 9, np.int16)))
    bad_expert = good.slice(0, 2).set_column(7, "expert", pa.array(np.array([4, -1], np.int16)))  # layer 0 has 4
    counts = LiveCounts(LAYERS)
    for part in (good, bad_layer, bad_expert):
        counts.add("routing", part)
    snap = counts.snapshot()
    assert snap.ignored_rows == 6
    assert list(snap.assignments[0, :4]) == list(expected_counts(good, 0, 4))
    samples = parse(_exposition(counts, MetricsOptions()))
    assert value(samples, "moeprobe_ignored_records_total", model="m", rank=0) == 6


def test_a_batch_that_cannot_be_counted_is_left_out_counted_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    counts = LiveCounts(LAYERS)
    with caplog.at_level(logging.WARNING, logger="moeprobe"):
        counts.add("routing", pa.table({"step": [0, 1, 2]}))  # not the routing schema
        counts.add("routing", pa.table({"step": [3]}))
    assert counts.snapshot().ignored_rows == 4
    assert counts.snapshot().tokens.sum() == 0
    # One warning through the library's logger (the CLI shows it on stderr), however many batches failed.
    warned = [r for r in caplog.records if "metrics could not count a routing batch" in r.getMessage()]
    assert len(warned) == 1 and warned[0].name == "moeprobe.metrics.counts" and warned[0].levelno == logging.WARNING


def test_manifests_that_cannot_be_counted_are_refused() -> None:
    for layers in ([{"index": 0}], [{"index": 0, "num_experts": "x", "top_k": 2}], [{"index": 0, "num_experts": 10**6, "top_k": 2}]):
        with pytest.raises(ValueError):
            LiveCounts(layers)
    with pytest.raises(ValueError, match="fewer window steps"):
        LiveCounts(layer_meta(600, 32768, 8))


def test_latency_buckets_are_less_or_equal_and_skip_missing_marks() -> None:
    bound_ms = LATENCY_BUCKETS_S[3] * 1000  # exactly on a bound: belongs to that bucket (le)
    latency = pa.table(
        {
            "step": np.arange(5, dtype=np.int32),
            "layer": np.array([0, 0, 0, 1, 1], np.int16),
            "router_ms": np.array([bound_ms, 0.01, np.nan, 1000.0, 0.2]),
            "block_ms": np.array([1.0, 2.0, 3.0, np.nan, np.nan]),
            "clock": ["perf_counter"] * 5,
        },
        schema=TABLES["latency"],
    )
    counts = LiveCounts(LAYERS)
    counts.add("latency", latency)
    samples = parse(_exposition(counts, MetricsOptions()))
    l0 = {"model": "m", "rank": "0", "layer": "0"}
    name = "moeprobe_router_latency_seconds"
    assert value(samples, f"{name}_bucket", le=str(LATENCY_BUCKETS_S[0]), **l0) == 1  # 0.01 ms
    assert value(samples, f"{name}_bucket", le=str(LATENCY_BUCKETS_S[2]), **l0) == 1
    assert value(samples, f"{name}_bucket", le=str(LATENCY_BUCKETS_S[3]), **l0) == 2
    assert value(samples, f"{name}_count", **l0) == 2  # the NaN row is no observation
    assert same(value(samples, f"{name}_sum", **l0), (bound_ms + 0.01) / 1000)
    l1 = {**l0, "layer": "1"}
    assert value(samples, f"{name}_bucket", le=str(LATENCY_BUCKETS_S[-1]), **l1) == 1  # 1 s is above every bound
    assert value(samples, f"{name}_bucket", le="+Inf", **l1) == 2
    assert value(samples, "moeprobe_moe_block_latency_seconds_count", **l1) == 0


def test_no_load_yet_is_nan_not_zero() -> None:
    samples = parse(_exposition(LiveCounts(LAYERS), MetricsOptions()))
    labels = {"model": "m", "rank": "0", "layer": "0"}
    for name in ("moeprobe_maxvio_window", "moeprobe_ep_balancedness_since_start", "moeprobe_dead_experts"):
        assert math.isnan(value(samples, name, **labels))
    assert math.isnan(value(samples, "moeprobe_hot_expert_id", slot=1, **labels))


def _deepseek_v3_exposition(options: MetricsOptions) -> str:
    """58 MoE layers x 256 routed experts, top-8, after some routing and latency rows."""
    layers = layer_meta(58, 256, 8)
    counts = LiveCounts(layers)
    rng = np.random.default_rng(0)
    tokens = 64
    n = 58 * tokens * 8
    counts.add(
        "routing",
        pa.table(
            {
                "step": np.zeros(n, np.int32),
                "sequence": np.zeros(n, np.int64),
                "position": np.zeros(n, np.int32),
                "token_id": np.zeros(n, np.int32),
                "phase": ["decode"] * n,
                "layer": np.repeat(np.arange(58), tokens * 8).astype(np.int16),
                "k": np.tile(np.arange(8), 58 * tokens).astype(np.int8),
                "expert": rng.integers(0, 256, n).astype(np.int16),
                "weight": np.ones(n, np.float32),
                "dropped": np.zeros(n, bool),
            },
            schema=TABLES["routing"],
        ),
    )
    health = Health(steps=1, dropped={"queue_full": 3, "mystery": 1}, anomalies=2, queue_bytes=0, heartbeat_age_s=0.5)
    return _exposition(counts, options, health)


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_deepseek_v3_series_count_stays_under_2000_by_default() -> None:
    default = _series(_deepseek_v3_exposition(MetricsOptions()))
    per_expert = _series(_deepseek_v3_exposition(MetricsOptions(per_expert=True)))
    print(f"DeepSeek-V3 shape (58 layers x 256 experts, top-8): {default} series by default, {per_expert} with per-expert")
    # docs/prometheus.md: 58 x (7 + 2 x 10 + 2 x 3) per-layer series + 13 per shard (with the "other" drop reason).
    assert default == 58 * 33 + 13 == 1927
    assert default < 2000
    assert per_expert == default + 58 * 256


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_exposition_passes_promtool_check_metrics() -> None:
    text = _deepseek_v3_exposition(MetricsOptions(per_expert=True))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", "promtool lint findings: " + result.stdout + result.stderr


def test_the_openmetrics_exposition_parses_strictly() -> None:
    """Prometheus asks for OpenMetrics first; prometheus_client's strict parser must accept what we send."""
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    counts = LiveCounts(LAYERS)
    counts.add("routing", _routing(range(3), tokens_per_step=4))
    view = ShardView("m", 0, counts.snapshot(), Health(steps=3, dropped={"new_reason": 2}, queue_bytes=0, heartbeat_age_s=0.1))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MoeCollector(lambda: [view], MetricsOptions(per_expert=True)))
    families = {f.name: f for f in text_string_to_metric_families(openmetrics(registry).decode())}
    assert families["moeprobe_routed_tokens"].type == "counter"
    assert families["moeprobe_router_latency_seconds"].type == "histogram"
    other = [s for s in families["moeprobe_capture_dropped_decisions"].samples if s.labels["reason"] == "other"]
    assert [s.value for s in other] == [2]


def test_options_refuse_nonsense() -> None:
    for bad in ({"top_n": -1}, {"ep_size": 0}, {"window_steps": 0}):
        with pytest.raises(ValueError):
            MetricsOptions(**bad)
