"""``record(..., metrics_port=)`` in process and ``moeprobe record --metrics-port``: live counts equal the trace."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest
import torch

import moeprobe
from moeprobe.hooks.probe import Probe
from moeprobe.metrics.endpoint import MetricsEndpointError
from moeprobe.metrics.options import MetricsOptions
from tests.conftest import PYTHON, run_cli_env
from tests.metrics_support import Samples, expected_counts, scrape, value, values_of
from tests.tiny_models import build


def _generate(model: torch.nn.Module, seed: int = 0) -> int:
    """Generate a few tokens; returns the model's forward calls (the probe's steps)."""
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(seed))
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return len(calls)


def _until_flushed(probe: Probe, steps: int, trace_path: Path, model: str, timeout: float = 60) -> tuple[Samples, object]:
    """The endpoint's samples once all ``steps`` forward calls are on disk and they count its routing rows."""
    url = probe.metrics_url
    assert url is not None and steps > 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trace = moeprobe.open_trace(trace_path)
        routing = trace.routing()
        written = trace.steps().num_rows
        trace.close()
        samples = scrape(url)
        served = sum(v for labels, v in values_of(samples, "moeprobe_routed_tokens_total") if labels["model"] == model)
        if written == steps and served == int((routing.column("k").to_numpy() == 0).sum()):
            return samples, routing
        time.sleep(0.05)
    raise AssertionError("the endpoint never caught up with the trace")


def test_live_counts_equal_the_trace_and_the_endpoint_stops_with_the_probe(tmp_path: Path) -> None:
    model = build("mixtral")
    options = MetricsOptions(per_expert=True)
    with moeprobe.record(model, tmp_path / "t", metrics_port=0, metrics=options, flush_interval=0.1) as probe:
        assert probe.metrics_url is not None and probe.metrics_url.startswith("http://127.0.0.1:")
        steps = _generate(model)
        samples, routing = _until_flushed(probe, steps, tmp_path / "t", "MixtralForCausalLM")
        url = probe.metrics_url
    for layer in (0, 1):
        labels = {"model": "MixtralForCausalLM", "rank": 0, "layer": layer}
        assert value(samples, "moeprobe_routed_tokens_total", **labels) == 16  # 2 x 5 prefill + 3 x 2 decode
        counts = expected_counts(routing, layer, 6)
        for expert in range(6):
            assert value(samples, "moeprobe_expert_assignments_total", expert=expert, **labels) == counts[expert]
        assert value(samples, "moeprobe_router_latency_seconds_count", **labels) == 4
    assert value(samples, "moeprobe_capture_queue_bytes", model="MixtralForCausalLM", rank=0) >= 0
    with pytest.raises(urllib.error.URLError):
        scrape(url, timeout=5)


def test_two_models_in_one_process_share_one_endpoint(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first, second = build("mixtral"), build("qwen3_moe")
    a = moeprobe.record(first, tmp_path / "a", metrics_port=port, name="first", flush_interval=0.1)
    b = moeprobe.record(second, tmp_path / "b", metrics_port=port, name="second", flush_interval=0.1)
    try:
        assert a.metrics_url == b.metrics_url
        steps_a = _generate(first)
        steps_b = _generate(second, seed=1)
        _until_flushed(a, steps_a, tmp_path / "a", "first")
        samples, _ = _until_flushed(b, steps_b, tmp_path / "b", "second")
        assert {labels["model"] for labels, _ in values_of(samples, "moeprobe_steps_total")} == {"first", "second"}
        a.close()
        after = scrape(b.metrics_url)
        assert {labels["model"] for labels, _ in values_of(after, "moeprobe_steps_total")} == {"second"}
    finally:
        a.close()
        b.close()
    c = moeprobe.record(first, tmp_path / "c", metrics_port=port, metrics=MetricsOptions(top_n=1))
    try:
        # Other options on a port this process already serves would change the other model's series.
        with pytest.raises(MetricsEndpointError, match="other metric options"):
            moeprobe.record(second, tmp_path / "d", metrics_port=port)
        assert not (tmp_path / "d").exists()
    finally:
        c.close()


def test_a_busy_port_refuses_before_recording_and_leaves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build("mixtral")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsEndpointError, match="cannot serve metrics"):
            moeprobe.record(model, tmp_path / "t", metrics_port=port)
        assert not (tmp_path / "t").exists()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

        # What `moeprobe record` does when the port is taken after its own check: record, without the endpoint.
        with Probe(model, tmp_path / "kept", metrics_port=port, metrics_optional=True) as probe:
            assert probe.metrics_url is None
            _generate(model)
        warned = [r for r in caplog.records if r.name.startswith("moeprobe") and r.levelno == logging.WARNING]
        assert any("not serving metrics: cannot serve metrics on 127.0.0.1" in r.getMessage() for r in warned)
        kept = moeprobe.open_trace(tmp_path / "kept")
        assert kept.status == "complete" and kept.manifest["counters"]["tokens"] == 16

        job = tmp_path / "job.py"
        job.write_text("raise SystemExit('the job must not run')\n")
        result = subprocess.run(
            [PYTHON, "-m", "moeprobe", "record", "-o", str(tmp_path / "cli"), "--metrics-port", str(port), "--", PYTHON, str(job)],
            capture_output=True, text=True, env=run_cli_env(), timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("moeprobe record: cannot serve metrics on 127.0.0.1:")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "cli").exists()
    with pytest.raises(ValueError, match="needs a trace path"):
        moeprobe.record(model, None, metrics_port=0)
