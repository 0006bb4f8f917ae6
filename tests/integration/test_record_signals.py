"""Signals under ``moeprobe record``: real processes, real signals, bounded waits.

SIGINT, SIGTERM and SIGHUP sent to ``moeprobe record`` reach the job; record waits for it, marks the trace
``aborted`` with the reason when the job died before closing it, and exits with the job's status (128 + signal
for a job ended by a signal). Nothing is orphaned: the job is gone when record returns. A signal record was
started with ignored (a script's background job, nohup) stays ignored, in record and in the job, as if the job
ran directly.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import moeprobe
from tests.conftest import PYTHON, ROOT, run_cli_env

# Records until the test creates the file `finish` (bounded), printing the job's pid and how it found SIGINT,
# SIGTERM and SIGHUP at its start once the first routing segment is on disk and counted.
JOB = """
import os, signal, sys, time, torch
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
def disposition(signum):
    handler = signal.getsignal(signum)
    return {{signal.SIG_IGN: "ignored", signal.SIG_DFL: "default", signal.default_int_handler: "python"}}.get(handler, repr(handler))
print("recording", os.getpid(), *(disposition(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)), flush=True)
for _ in range(20000):
    model(ids)
    if os.path.exists({finish!r}):
        break
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


def _as_a_script_starts_a_background_job() -> None:
    """``moeprobe record ... &`` in a non-interactive shell (a script, a CI step): as above, but SIGINT ignored
    (POSIX: an asynchronous list ignores SIGINT and SIGQUIT when job control is off)."""
    _as_a_shell_starts_it()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(
    tmp_path: Path, preexec: Callable[[], None] = _as_a_shell_starts_it
) -> tuple[subprocess.Popen[str], int, list[str]]:
    """Start record on the job; once the job records: record, the job's pid, and how the job found SIGINT,
    SIGTERM and SIGHUP (ignored, default, or python: Python's KeyboardInterrupt handler over a default one)."""
    trace = tmp_path / "trace"
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB.format(root=str(ROOT), trace=str(trace), finish=str(tmp_path / "finish"))))
    record = subprocess.Popen(
        [PYTHON, "-m", "moeprobe", "record", "--flush-interval", "0.1", "-o", str(trace), "--", PYTHON, str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_cli_env(), start_new_session=True,
        preexec_fn=preexec,  # noqa: PLW1509 - async-signal-safe calls only
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
    _, pid, *dispositions = line.split()
    return record, int(pid), dispositions


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
    record, job_pid, dispositions = _start(tmp_path)
    assert dispositions == ["python", "default", "default"]  # as `python job.py` from a shell, not record's state
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


def _wait(record: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return record.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(record.pid, signal.SIGKILL)
        pytest.fail("moeprobe record did not return")


def test_a_sigint_record_was_started_ignoring_is_ignored_as_by_the_job_run_directly(tmp_path: Path) -> None:
    record, job_pid, dispositions = _start(tmp_path, _as_a_script_starts_a_background_job)
    assert dispositions == ["ignored", "default", "default"]  # the job inherits the ignored SIGINT, as run directly
    # Ignored and not blocked in record: the kernel discards it before kill() returns, so once these calls are
    # done nothing of the signal is left to take effect later.
    record.send_signal(signal.SIGINT)
    os.killpg(record.pid, signal.SIGINT)  # and to the whole group, the job included
    (tmp_path / "finish").touch()  # the job stops recording and ends normally
    out, err = _wait(record)
    assert "job ran to the end" in out, err
    assert record.returncode == 0, err
    assert "passed SIGINT" not in err  # record took nothing: there was nothing to pass on
    assert _gone(job_pid)
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "complete", err
    assert trace.manifest["shards"][0].get("error") is None


def test_sigterm_still_stops_a_job_whose_sigint_is_ignored(tmp_path: Path) -> None:
    record, job_pid, _ = _start(tmp_path, _as_a_script_starts_a_background_job)
    record.send_signal(signal.SIGINT)  # discarded (see above)
    record.send_signal(signal.SIGTERM)
    out, err = _wait(record)
    assert _gone(job_pid), "the job was orphaned"
    assert "job ran to the end" not in out
    assert record.returncode == 128 + signal.SIGTERM, err
    assert "passed SIGTERM on to the job" in err and "SIGINT" not in err
    trace = moeprobe.open_trace(tmp_path / "trace")
    assert trace.status == "aborted", err
    assert "SIGTERM" in (trace.manifest["shards"][0].get("error") or "")


# A recording closed while the job's KeyboardInterrupt is being handled (autoattach's excepthook does this), with
# the shard's first merge of segments in that close: what a SIGINT just before that merge meets under record.
INTERRUPTED_WHILE_MERGING = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {root!r})
from moeprobe.hooks.pipeline import CapturePipeline
from moeprobe.hooks.timing import CpuClock
from moeprobe.traces import ShardWriter, prepare_trace_dir
from tests.support import layer_meta, routing_table
path = Path({trace!r})
prepare_trace_dir(path, force=False)
writer = ShardWriter(path, model={{"name": "m"}}, layers=layer_meta(1, 8, 2), options={{}})
writer.compactor.fanout = 2  # the second flush is the shard's first merge
pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1000.0)
def flush(step):
    writer.append("routing", routing_table(np.array([[1, 2]] * 3), step=np.full(3, step)))
    writer.flush()
pipeline.submit_call(lambda: flush(0))  # on the writer thread, which owns the writer
assert pipeline.flush(60)
previous = sys.excepthook
def excepthook(*exc):
    pipeline.submit_call(lambda: flush(1))
    pipeline.close("aborted", "KeyboardInterrupt")
    previous(*exc)
sys.excepthook = excepthook
raise KeyboardInterrupt
"""


def test_a_keyboard_interrupt_ends_the_job_by_sigint_even_when_the_recording_closes_with_its_first_merge(
    tmp_path: Path,
) -> None:
    """CPython ends a script whose KeyboardInterrupt went unhandled by SIGINT (exit 130 in a shell), unless some
    thread runs exec() or eval() on a string after the interrupt left the script and before the interpreter
    exits: that clears its "unhandled KeyboardInterrupt" flag, and the exit status becomes 1. A namedtuple or
    dataclass being created does that, so does importing a module that defines one: the shard's first merge
    (pq.read_table) imported pyarrow.dataset on the writer thread, which, when a SIGINT landed shortly before it
    (about 1.6 s into a recording at --flush-interval 0.1), is the likely cause of a `moeprobe record` seen to
    exit 1 instead of 130 once in about 30 SIGINTs. The pipeline now imports it when it starts."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(INTERRUPTED_WHILE_MERGING.format(root=str(ROOT), trace=str(tmp_path / "trace"))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=run_cli_env())
    assert done.returncode == -signal.SIGINT, done.stderr
    assert "000000-000001.parquet" in {p.name for p in (tmp_path / "trace" / "rank=0" / "routing").iterdir()}
    assert moeprobe.open_trace(tmp_path / "trace").status == "aborted"
