"""Signals under ``moeprobe record``: real processes, real signals, bounded waits.

SIGINT, SIGTERM and SIGHUP sent to ``moeprobe record`` reach the job; record waits for it, marks the trace
``aborted`` with the reason when the job died before closing it, and exits with the job's status (128 + signal
for a job ended by a signal). Nothing is orphaned: the job is gone when record returns.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env

# Records forever (bounded), printing the job's pid once the first routing segment is on disk and counted.
JOB = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from tests.tiny_models import build
model = build("mixtral")
ids = torch.randint(3, 96, (1, 4))
model(ids)
import json
shard = os.path.join({trace!r}, "rank=0", "shard.json")
for _ in range(600):  # until a routing segment is on disk and counted by the shard's manifest
    try:
        with open(shard) as handle:
            if json.load(handle)["counters"]["segments"]["routing"] > 0:
                break
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.05)
print("recording", os.getpid(), flush=True)
for _ in range(20000):
    model(ids)
    time.sleep(0.01)
print("job ran to the end", flush=True)
"""


def _as_a_shell_starts_it() -> None:
    """``moeprobe record`` as a shell starts a foreground command: the three signals at their default disposition
    and unblocked, whatever this test process (an xdist worker that ran other tests) has set for itself. Once, in
    a fresh clone's full run, the job under record went on recording after the SIGINT as if it never came."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    trace = tmp_path / "trace"
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB.format(root=str(ROOT), trace=str(trace))))
    record = subprocess.Popen(
        [PYTHON, "-m", "moeprobe", "record", "--flush-interval", "0.1", "-o", str(trace), "--", PYTHON, str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_cli_env(), start_new_session=True,
        preexec_fn=_as_a_shell_starts_it,  # noqa: PLW1509 - async-signal-safe calls only
    )
    selector = selectors.DefaultSelector()
    selector.register(record.stdout, selectors.EVENT_READ)
    line = ""
    if selector.select(timeout=120):  # bounded: the job prints its pid once it is recording
        line = record.stdout.readline()
    selector.close()
    if not line.startswith("recording"):
        record.kill()
        pytest.fail(f"the job did not start recording: {line!r} {record.communicate(timeout=30)}")
    return record, int(line.split()[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0): it is gone if its state is Z (reaped by init later).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("how", "signum"),
    # Each case starts a model in a job (~20 s on a loaded 2-core machine): the three that cover the paths.
    [("record", signal.SIGTERM), ("record", signal.SIGINT), ("group", signal.SIGHUP)],
)
def test_a_signal_to_record_stops_the_job_and_marks_the_trace(tmp_path: Path, how: str, signum: int) -> None:
    record, job_pid = _start(tmp_path)
    if how == "record":
        record.send_signal(signum)  # to `moeprobe record` only (kill PID)
    else:
        os.killpg(record.pid, signum)  # to the whole group, as a shell or a service manager would
    try:
        out, err = record.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(record.pid, signal.SIGKILL)
        pytest.fail("moeprobe record did not return after the signal")
    assert _gone(job_pid), "the job was orphaned"
    assert "job ran to the end" not in out
    assert record.returncode == 128 + signum, err
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "aborted", err
    shard = trace.manifest["shards"][0]
    # Either the job closed the trace itself (Python's KeyboardInterrupt) or record marked it after the job died.
    assert signal.Signals(signum).name in (shard.get("error") or "") or "KeyboardInterrupt" in (shard.get("error") or "")
    assert trace.routing().num_rows > 0  # what was recorded before the signal is kept
