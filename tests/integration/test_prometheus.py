"""A real Prometheus server scrapes a recording job's endpoint; its values must be what the trace says.

Needs the ``prometheus`` binary (Debian package ``prometheus``, installed by .ci/run); skipped without it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env
from tests.metrics_support import maxvio, same, scrape

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (Debian package prometheus)")

WINDOW = 3
# A Switch model with a small expert capacity, so that tokens are dropped; six forward calls of 2 x 6 encoder and
# 2 x 4 decoder tokens. Then it tells the test it is done and keeps its endpoint up until released.
JOB = """
import sys, time, torch
from pathlib import Path
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

torch.manual_seed(0)
config = SwitchTransformersConfig(
    vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
    encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=3, pad_token_id=0, eos_token_id=2,
    decoder_start_token_id=0,
)
model = SwitchTransformersForConditionalGeneration(config).eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for _ in range(6):
        ids = torch.randint(3, 96, (2, 6), generator=g)
        model(input_ids=ids, decoder_input_ids=ids[:, :4])
Path(sys.argv[1]).touch()
deadline = time.monotonic() + 180
while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout: float, what: str, *processes: subprocess.Popen[Any]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"{process.args[0]} exited ({process.returncode}) while waiting for {what}"
        try:
            result = predicate()
        except OSError:  # not listening yet
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _query(base: str, expr: str) -> dict[frozenset[tuple[str, str]], float]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    out = {}
    for item in body["data"]["result"]:
        labels = {k: v for k, v in item["metric"].items() if k not in ("job", "instance")}
        out[frozenset(labels.items())] = float(item["value"][1])
    return out


def _per_layer(result: dict[frozenset[tuple[str, str]], float]) -> dict[int, float]:
    return {int(dict(labels)["layer"]): v for labels, v in result.items()}


def test_prometheus_scrapes_a_recording_and_its_values_equal_the_trace(tmp_path: Path) -> None:
    metrics_port, web_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
            scrape_configs:
              - job_name: moeprobe
                static_configs:
                  - targets: ["127.0.0.1:{metrics_port}"]
            """
        )
    )
    job = tmp_path / "job.py"
    job.write_text(JOB)
    done, release, trace_dir = tmp_path / "done", tmp_path / "release", tmp_path / "trace"
    base = f"http://127.0.0.1:{web_port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    recording = subprocess.Popen(
        [PYTHON, "-m", "moeprobe", "record", "-o", str(trace_dir), "--flush-interval", "0.2",
         "--metrics-port", str(metrics_port), "--metrics-window-steps", str(WINDOW), "--metrics-ep-size", "2",
         "--", PYTHON, str(job), str(done), str(release)],
        env=run_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait(done.exists, 180, "the job to finish its forward calls", recording)
        endpoint = f"http://127.0.0.1:{metrics_port}/metrics"

        done_at = done.stat().st_mtime

        def flushed() -> bool:
            # The writer wrote the manifest after the job's last forward call: it drains its queue before every
            # write, so every step is on disk. Then the endpoint must count exactly the routing rows written there.
            trace = moeprobe.open_trace(trace_dir)
            try:
                fresh = all(shard["heartbeat_at"] > done_at for shard in trace.manifest["shards"])
                tokens = trace.sql("SELECT count(*) FROM routing WHERE k = 0").column(0)[0].as_py()
            finally:
                trace.close()
            samples = scrape(endpoint)
            served = sum(v for (name, _), v in samples.items() if name == "moeprobe_routed_tokens_total")
            return fresh and tokens > 0 and served == tokens

        _wait(flushed, 60, "the endpoint to count every flushed step", recording)
        settled = time.time()
        _wait(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200, 60, "Prometheus to be ready", prometheus)

        def two_scrapes_since_settled() -> bool:
            seconds = max(1, int(time.time() - settled))
            got = _query(base, f"count_over_time(moeprobe_steps_total[{seconds}s])")
            return bool(got) and min(got.values()) >= 2

        _wait(two_scrapes_since_settled, 60, "two Prometheus scrapes of the final values", prometheus, recording)
        got = {
            name: _query(base, name)
            for name in (
                "moeprobe_routed_tokens_total",
                "moeprobe_dropped_tokens_total",
                "moeprobe_maxvio_window",
                "moeprobe_maxvio_since_start",
                "moeprobe_ep_balancedness_since_start",
                "moeprobe_steps_total",
                "moeprobe_capture_dropped_decisions_total",
                "moeprobe_hot_expert_id",
            )
        }
        up = _query(base, 'up{job="moeprobe"}')
        # Every query of the Grafana dashboard parses and runs on a real Prometheus.
        dashboard = json.loads((ROOT / "contrib" / "grafana" / "moeprobe.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$model", ".*").replace("$layer", "0").replace("$__rate_interval", "1m")
                _query(base, expr)
        per_layer_heat = _query(base, dashboard["panels"][0]["targets"][0]["expr"].replace("$model", ".*"))
    finally:
        release.touch()
        try:
            recording.wait(timeout=120)
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            if recording.poll() is None:
                recording.kill()
    assert recording.returncode == 0, recording.stderr.read() if recording.stderr else ""
    assert list(up.values()) == [1.0]
    assert len(per_layer_heat) == 4  # one heat-map row per MoE layer

    trace = moeprobe.open_trace(trace_dir)
    assert trace.status == "complete"
    layers = {int(entry["index"]): int(entry["num_experts"]) for entry in trace.layers}
    assert len(layers) == 4
    tokens = trace.sql(
        "SELECT layer, count(*) FILTER (WHERE k = 0) AS tokens, count(*) FILTER (WHERE k = 0 AND dropped) AS dropped "
        "FROM routing GROUP BY layer"
    ).to_pydict()
    expected_tokens = dict(zip(tokens["layer"], tokens["tokens"], strict=True))
    expected_dropped = dict(zip(tokens["layer"], tokens["dropped"], strict=True))
    assert sum(expected_dropped.values()) > 0, "the job was meant to drop tokens over capacity"
    assert _per_layer(got["moeprobe_routed_tokens_total"]) == expected_tokens
    assert _per_layer(got["moeprobe_dropped_tokens_total"]) == expected_dropped

    def counts(where: str) -> dict[int, np.ndarray]:
        rows = trace.sql(f"SELECT layer, expert, count(*) AS n FROM routing {where} GROUP BY layer, expert").to_pydict()
        out = {layer: np.zeros(experts, np.int64) for layer, experts in layers.items()}
        for layer, expert, n in zip(rows["layer"], rows["expert"], rows["n"], strict=True):
            out[layer][expert] = n
        return out

    newest = trace.sql("SELECT max(step) FROM routing").column(0)[0].as_py()
    total, window = counts(""), counts(f"WHERE step > {newest - WINDOW}")
    served_window = _per_layer(got["moeprobe_maxvio_window"])
    served_total = _per_layer(got["moeprobe_maxvio_since_start"])
    served_balance = _per_layer(got["moeprobe_ep_balancedness_since_start"])
    for layer in layers:
        assert same(served_total[layer], maxvio(total[layer])), layer
        assert same(served_window[layer], maxvio(window[layer])), layer
        ranks = np.array([total[layer][:2].sum(), total[layer][2:].sum()])  # 4 experts over 2 ranks, contiguous
        assert same(served_balance[layer], ranks.mean() / ranks.max())
    assert any(not same(served_window[layer], served_total[layer]) for layer in layers), "the window should differ"
    busiest = {
        layer: int(np.argmax(window[layer]))
        for layer in layers
    }
    slot1 = {int(dict(lb)["layer"]): v for lb, v in got["moeprobe_hot_expert_id"].items() if dict(lb)["slot"] == "1"}
    assert slot1 == busiest

    counters = trace.manifest["counters"]
    assert list(got["moeprobe_steps_total"].values()) == [counters["steps"]]
    for labels, v in got["moeprobe_capture_dropped_decisions_total"].items():
        assert v == counters["dropped"].get(dict(labels)["reason"], 0)
    # Only the documented labels, each with a bounded set of values.
    for result in got.values():
        for labels in result:
            assert {k for k, _ in labels} <= {"__name__", "model", "rank", "layer", "slot", "reason"}
    assert {dict(lb)["model"] for lb in got["moeprobe_routed_tokens_total"]} == {"SwitchTransformersForConditionalGeneration"}
    trace.close()
