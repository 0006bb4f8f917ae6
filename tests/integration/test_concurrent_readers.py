"""Readers while a writer writes: ``Trace.summary()``, the ``moeprobe report`` CLI and the TUI's data path
(``TraceSource``) read a trace over and over while another process appends segments to it.

Every segment holds exactly ``ROWS`` routing rows, so a reader that ever saw part of one (a file not yet
renamed into place, a footer not yet written) would either raise or count rows that are not a multiple of
``ROWS``. Neither may happen, and counts only grow.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import moeprobe
from moeprobe.tui.source import TraceSource
from tests.conftest import PYTHON, ROOT, run_cli_env

TOKENS, LAYERS, TOP_K = 64, 2, 2
ROWS = TOKENS * LAYERS * TOP_K
WRITE_S = 5.0

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from pathlib import Path
from moeprobe.traces import ShardWriter, prepare_trace_dir
from tests.support import layer_meta, routing_table
path = Path({path!r})
prepare_trace_dir(path, force=True)
writer = ShardWriter(path, model={{"name": "concurrent", "family": "test"}}, layers=layer_meta({layers}, 8, {k}), options={{}})
rng = np.random.default_rng(0)
print("ready", flush=True)
end = time.monotonic() + {seconds}
step = 0
while time.monotonic() < end:
    for layer in range({layers}):
        writer.append("routing", routing_table(rng.integers(0, 8, ({tokens}, {k})), step=np.full({tokens}, step),
                                               sequence=np.arange({tokens}), layer=layer))
    writer.counters["decisions"] += {rows}
    writer.flush()  # one segment of exactly {rows} rows, renamed into place when complete
    step += 1
    time.sleep(0.01)
writer.close()
print("segments", step, flush=True)
"""


def test_readers_never_see_a_partial_segment(tmp_path: Path) -> None:
    path = tmp_path / "live"
    script = textwrap.dedent(WRITER.format(root=str(ROOT), path=str(path), layers=LAYERS, k=TOP_K, tokens=TOKENS,
                                           rows=ROWS, seconds=WRITE_S))
    writer = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True, env=run_cli_env())
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not any((path / "rank=0" / "routing").glob("*.parquet")):
        # Bounded, and not forever on a writer that died before its first segment.
        assert writer.poll() is None, f"the writer exited ({writer.returncode}) before writing a segment"
        assert time.monotonic() < deadline, "no segment within 60 s"
        time.sleep(0.01)

    errors: list[BaseException] = []
    seen: dict[str, list[int]] = {"summary": [], "tui": [], "cli": []}

    def guarded(name: str, body: object) -> threading.Thread:
        def run() -> None:
            try:
                while writer.poll() is None:
                    seen[name].append(body())  # type: ignore[operator]
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    trace = moeprobe.open_trace(path)

    def summary() -> int:
        trace.refresh()
        return int(trace.summary()["overall"]["decisions"])

    source = TraceSource(path)

    def tui() -> int:
        source.poll()
        count = source.read(lambda t: t.sql("select count(*) from routing").column(0)[0].as_py())
        return int(count or 0)

    def cli() -> int:
        result = subprocess.run([PYTHON, "-m", "moeprobe", "report", str(path), "--json"], capture_output=True,
                                text=True, env=run_cli_env(), timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return int(json.loads(result.stdout)["overall"]["decisions"])

    threads = [guarded("summary", summary), guarded("tui", tui), guarded("cli", cli)]
    writer.wait(timeout=60)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a reader is still running 60 s after the writer"
    source.close()
    trace.close()
    assert errors == [], errors
    assert writer.stdout.readline().startswith("segments")
    for name, counts in seen.items():
        assert counts, f"{name} never read"
        assert all(c % ROWS == 0 for c in counts), f"{name} read a partial segment: {counts}"
        assert counts == sorted(counts), f"{name} saw rows disappear: {counts}"
    print("\nreads while writing: " + ", ".join(f"{k} {len(v)} (sizes {len(set(v))})" for k, v in seen.items()))
    # The readers really did overlap the writer: they saw the trace at several sizes.
    assert len(set(seen["summary"])) > 2 and len(set(seen["tui"])) > 2
    final = moeprobe.open_trace(path)
    assert final.status == "complete" and final.routing().num_rows % ROWS == 0
