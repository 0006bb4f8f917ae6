"""``moeprobe serve`` in a subprocess: follows a trace while it is written, and refuses bad input in one line."""

from __future__ import annotations

import json

import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from moeprobe.traces import ShardWriter, prepare_trace_dir
from moeprobe.traces.schema import TABLES
from tests.conftest import PYTHON, run_cli_env
from tests.metrics_support import Samples, expected_counts, maxvio, same, scrape, value
from tests.support import layer_meta, routing_table, write_trace

EXPERTS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _step_rows(step: int, experts: np.ndarray) -> pa.Table:
    tables = [routing_table(experts, step=np.full(len(experts), step), layer=layer) for layer in (0, 1)]
    return pa.concat_tables(tables)


def _latency(step: int, ms: float) -> pa.Table:
    return pa.table(
        {"step": [step, step], "layer": [0, 1], "router_ms": [ms, ms], "block_ms": [ms, ms], "clock": ["perf_counter"] * 2},
        schema=TABLES["latency"],
    )


def _serve(trace: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "moeprobe", "serve", str(trace), "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_cli_env(),
    )


def _scrape_when_up(url: str, process: subprocess.Popen[str], timeout: float = 60) -> Samples:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            return scrape(url)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("moeprobe serve did not answer")


def test_serve_follows_a_trace_while_it_is_written(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    prepare_trace_dir(trace, force=False)
    writer = ShardWriter(trace, model={"name": "hand-made"}, layers=layer_meta(2, EXPERTS, 2), options={})
    rng = np.random.default_rng(0)
    written = []

    def write_steps(steps: range) -> None:
        for step in steps:
            rows = _step_rows(step, rng.integers(0, EXPERTS, (5, 2)))
            written.append(rows)
            writer.append("routing", rows)
            writer.append("latency", _latency(step, 0.3))
            writer.counters["steps"] += 1
            writer.flush()

    write_steps(range(3))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    server = _serve(trace, port, "--window-steps", "2", "--top-n", "2")
    try:
        first = _scrape_when_up(url, server)
        labels = {"model": "hand-made", "rank": 0, "layer": 0}
        assert value(first, "moeprobe_routed_tokens_total", **labels) == 15
        assert value(first, "moeprobe_steps_total", model="hand-made", rank=0) == 3
        assert value(first, "moeprobe_capture_writer_lag_seconds", model="hand-made", rank=0) >= 0  # writer alive

        write_steps(range(3, 7))
        writer.count_dropped("queue_full", 12)
        writer.flush()
        second = scrape(url)
        rows = pa.concat_tables(written)
        assert value(second, "moeprobe_routed_tokens_total", **labels) == 35
        assert value(second, "moeprobe_router_latency_seconds_count", **labels) == 7
        assert same(value(second, "moeprobe_maxvio_since_start", **labels), maxvio(expected_counts(rows, 0, EXPERTS)))
        assert same(value(second, "moeprobe_maxvio_window", **labels), maxvio(expected_counts(rows, 0, EXPERTS, min_step=5)))
        assert value(second, "moeprobe_window_steps", model="hand-made", rank=0) == 2
        assert value(second, "moeprobe_capture_dropped_decisions_total", model="hand-made", rank=0, reason="queue_full") == 12

        writer.close("complete")
        third = scrape(url)
        assert not any(name == "moeprobe_capture_writer_lag_seconds" for name, _ in third), "a closed writer has no lag"
        # A file no shard manifest counts is not a segment (a writer killed between rename and manifest): ignored.
        (trace / "rank=0" / "routing" / "000999.parquet").write_bytes(b"not parquet")
        assert value(scrape(url), "moeprobe_trace_read_errors_total", model="hand-made", rank=0) == 0
        # A damaged segment the manifest does count is reported once and left out; what was counted keeps being
        # served.
        shard_file = trace / "rank=0" / "shard.json"
        shard = json.loads(shard_file.read_text())
        shard["counters"]["segments"]["routing"] += 1
        shard_file.write_text(json.dumps(shard))
        fourth = scrape(url)
        assert value(fourth, "moeprobe_routed_tokens_total", **labels) == 35
        assert value(fourth, "moeprobe_trace_read_errors_total", model="hand-made", rank=0) == 1
        assert value(scrape(url), "moeprobe_trace_read_errors_total", model="hand-made", rank=0) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
    assert sum("000999.parquet" in line for line in err.splitlines()) == 1


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "moeprobe", *args], capture_output=True, text=True, env=run_cli_env(), timeout=60)


def test_serve_refuses_bad_input_in_one_line(tmp_path: Path, good_trace: Path) -> None:
    missing = _run("serve", str(tmp_path / "nope"), "--port", "0")
    assert missing.returncode == 1 and "no such trace" in missing.stderr and len(missing.stderr.splitlines()) == 1

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = _run("serve", str(good_trace), "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 1 and "cannot serve metrics on 127.0.0.1" in taken.stderr
    assert len(taken.stderr.splitlines()) == 1, taken.stderr

    hostile = tmp_path / "hostile"
    write_trace(hostile, {}, layers=layer_meta(600, 32767, 8))  # a valid manifest whose window would take GBs
    refused = _run("serve", str(hostile), "--port", "0")
    assert refused.returncode == 1 and "fewer window steps" in refused.stderr and len(refused.stderr.splitlines()) == 1

    for args in (["--port", "70000"], ["--port", "0", "--top-n", "-1"], ["--port", "0", "--ep-size", "0"], []):
        usage = _run("serve", str(good_trace), *args)
        assert usage.returncode == 2, (args, usage.stderr)
        assert "Traceback" not in usage.stderr
