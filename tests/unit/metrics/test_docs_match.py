"""docs/prometheus.md and the Grafana dashboard name exactly the metrics the collector emits."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest

from moeprobe.metrics.collector import MoeCollector
from moeprobe.metrics.counts import LiveCounts
from moeprobe.metrics.options import Health, MetricsOptions, ShardView
from tests.conftest import ROOT
from tests.support import layer_meta

DASHBOARD = ROOT / "contrib" / "grafana" / "moeprobe.json"


def _emitted() -> set[str]:
    """Every sample name the endpoint can emit: per-expert on, both live and on-disk health fields present."""
    view = ShardView(
        "m", 0, LiveCounts(layer_meta(2, 4, 2)).snapshot(),
        Health(steps=1, dropped={"odd": 1}, queue_bytes=1, heartbeat_age_s=1.0, read_errors=0),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MoeCollector(lambda: [view], MetricsOptions(per_expert=True)))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _families(samples: set[str]) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", s) if "latency_seconds" in s else s for s in samples}


def test_the_docs_describe_every_metric_and_only_those() -> None:
    doc = (ROOT / "docs" / "prometheus.md").read_text()
    table = set(re.findall(r"^\| `(moeprobe_[a-z_]+)` \|", doc, flags=re.M))
    assert table == _families(_emitted())


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"moeprobe_[a-z_]+", expr)}
    assert used <= _emitted()
    kinds = {panel["type"] for panel in dashboard["panels"]}
    assert {"heatmap", "timeseries"} <= kinds
