"""SIGKILL a recording job at random moments and prove every trace it leaves is usable.

    .venv/bin/python -m stress.kill_recording --kills 50 --flush-interval 0.5

Each round starts a job that runs a tiny Mixtral forward in a loop and, after every completed step, appends
"step wall-time" to a side log with fsync (so the log survives the kill). Half the rounds record through
``moeprobe.record`` in the job itself (the reader must then say ``stale``: the writer vanished), half through
``moeprobe record -- python job.py`` (which finalises the trace as ``aborted``). The job is killed with SIGKILL
after a random delay; then the trace must open, ``moeprobe report`` and ``moeprobe inspect`` must succeed on it,
the TUI must open it and show its state, and the data lost (wall time between the newest step completed before
the kill and the newest step on disk) is printed; no step completed more than the flush interval (plus the
writer's poll and write time, ``--slack``) before the kill may be missing. Not part of the test suite (it takes minutes); tests/integration/test_kill_stress.py runs three rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The job logs after each *completed* forward call; step numbers match the probe's (one step per forward).
JOB = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from tests.tiny_models import build
log = open({log!r}, "a", buffering=1)

def note(text):
    log.write(text + "\\n")
    log.flush()
    os.fsync(log.fileno())

model = build("mixtral")
ids = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(0))

def loop():
    note(f"start {{time.time()}} {{os.getpid()}}")
    step = 0
    while True:
        model(ids)
        note(f"{{step}} {{time.time()}}")
        step += 1
        time.sleep(0.01)

if {direct!r}:
    import moeprobe
    with moeprobe.record(model, {trace!r}, flush_interval={flush!r}):
        loop()
else:
    loop()  # under `moeprobe record`, the model was instrumented when it was built
"""


@dataclass
class Round:
    mode: str  # "direct" (moeprobe.record in the job) or "cli" (moeprobe record -- python job.py)
    delay_s: float
    status: str
    completed: int  # steps completed before the kill
    on_disk: int  # steps whose routing is in complete segments
    lost_s: float  # wall time spanned by completed steps that are not on disk (newest done - newest kept)
    lost_age_s: float  # how long before the kill the oldest lost step had completed (0 when none was lost)
    report_rc: int
    inspect_rc: int
    tui_state: str


def _python() -> str:
    return sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MOEPROBE_DEBUG", None)
    return env


def _read_log(log: Path) -> tuple[float, int, dict[int, float]]:
    start, pid, steps = 0.0, 0, {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[0] == "start":
            start, pid = float(parts[1]), int(parts[2])
        elif len(parts) == 2:  # a line cut by the kill has fewer fields (it cannot, after fsync, but be safe)
            steps[int(parts[0])] = float(parts[1])
    return start, pid, steps


def _wait_for_start(log: Path, process: subprocess.Popen[bytes], timeout: float = 120.0, steps: int = 0) -> tuple[float, int]:
    """Wait until the job logged its start and, with ``steps``, that many completed steps (on a loaded machine
    the first step, which attaches the probe under ``moeprobe record``, can take seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            start, pid, done = _read_log(log)
            if pid and len(done) >= steps:
                return start, pid
        if process.poll() is not None:
            raise RuntimeError(f"job ended before starting (exit {process.returncode})")
        time.sleep(0.02)
    raise RuntimeError("job did not start in time")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """Run a moeprobe command in this process (the same code path as the console script), capturing output."""
    from moeprobe.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


async def _tui_state(trace: Path) -> str:
    """Open the trace in the real app, headless, and return the run header's text once the overview shows."""
    from moeprobe.tui.app import MoeprobeApp

    app = MoeprobeApp([trace])
    async with app.run_test(size=(120, 36)) as pilot:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            screen = app.screen
            if getattr(screen, "shown_generation", None) is not None and not getattr(screen, "_busy", False):
                header = screen.query_one("#run").render()
                return getattr(header, "plain", str(header))
    raise RuntimeError(f"{trace}: the TUI did not show the overview in time")


def run_round(workdir: Path, mode: str, delay_s: float, flush_interval: float, *, tui: bool = True) -> Round:
    """One job, one SIGKILL after ``delay_s`` seconds of recording, and every check on what it leaves."""
    import moeprobe

    workdir.mkdir(parents=True, exist_ok=True)
    trace, log, job = workdir / "trace", workdir / "steps.log", workdir / "job.py"
    job.write_text(textwrap.dedent(JOB.format(root=str(ROOT), log=str(log), trace=str(trace),
                                              flush=flush_interval, direct=mode == "direct")))
    if mode == "direct":
        command = [_python(), str(job)]
    else:
        command = [_python(), "-m", "moeprobe", "record", "-o", str(trace), "--flush-interval", str(flush_interval),
                   "--", _python(), str(job)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A kill late in recording comes after the first step, whatever the machine's load.
        _, pid = _wait_for_start(log, process, steps=1 if delay_s > 1 else 0)
        time.sleep(delay_s)
        kill_at = time.time()
        os.kill(pid, signal.SIGKILL)
        process.wait(timeout=120)  # under `moeprobe record` this is the recorder finalising the trace
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    start, _, steps = _read_log(log)

    opened = moeprobe.open_trace(trace)
    routing_steps = opened.sql("select max(step) from routing").column(0)[0].as_py()
    status = opened.status
    opened.close()
    on_disk = -1 if routing_steps is None else int(routing_steps)
    completed = max(steps, default=-1)
    newest_done = steps.get(completed, start)
    newest_kept = steps.get(on_disk, start)
    lost_s = max(0.0, newest_done - newest_kept) if completed > on_disk else 0.0
    # The promise is about age: a step completed more than one flush interval (plus the writer's poll and write
    # time) before the kill must be on disk. The oldest lost step is the first one after the newest kept.
    lost_age_s = max(0.0, kill_at - steps[on_disk + 1]) if completed > on_disk else 0.0
    report_rc, _, report_err = _cli(["report", str(trace)])
    inspect_rc, inspect_out, inspect_err = _cli(["inspect", str(trace)])
    if report_rc != 0 or inspect_rc != 0:
        raise AssertionError(f"{trace}: report {report_rc} {report_err!r}, inspect {inspect_rc} {inspect_err!r}")
    tui_state = asyncio.run(_tui_state(trace)) if tui else ""
    return Round(mode, delay_s, status, completed + 1, on_disk + 1, lost_s, lost_age_s, report_rc, inspect_rc,
                 tui_state)


def check_round(r: Round, flush_interval: float, slack_s: float) -> list[str]:
    """The promises a killed recording must keep; returns what was broken (empty when all held)."""
    problems = []
    expected = "stale" if r.mode == "direct" else "aborted"
    if r.status != expected:
        problems.append(f"status {r.status!r}, expected {expected!r}")
    if r.tui_state and expected not in r.tui_state:
        problems.append(f"TUI header does not say {expected}: {r.tui_state!r}")
    if r.on_disk > r.completed:
        problems.append(f"{r.on_disk} steps on disk but only {r.completed} completed")
    if r.lost_age_s > flush_interval + slack_s:
        problems.append(f"lost a step completed {r.lost_age_s:.3f} s before the kill, more than the flush interval "
                        f"{flush_interval} s + {slack_s} s")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--flush-interval", type=float, default=0.5)
    parser.add_argument("--max-delay", type=float, default=3.0, help="kill up to this many seconds into recording")
    parser.add_argument("--slack", type=float, default=0.5, help="allowed for the writer's poll and write time")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-tui", action="store_true", help="skip opening each trace in the headless TUI")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    failures = 0
    rounds: list[Round] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moeprobe-kill-") as tmp:
        for i in range(args.kills):
            mode = "direct" if i % 2 == 0 else "cli"
            delay = rng.uniform(0.0, args.max_delay)
            r = run_round(Path(tmp) / f"round{i:03d}", mode, delay, args.flush_interval, tui=not args.no_tui)
            problems = check_round(r, args.flush_interval, args.slack)
            failures += bool(problems)
            rounds.append(r)
            print(f"kill {i + 1:3d}/{args.kills} {mode:6s} after {delay:5.2f} s: {r.status:7s} "
                  f"{r.on_disk:4d}/{r.completed:4d} steps on disk, lost {r.lost_s * 1000:5.0f} ms of steps, "
                  f"oldest lost {r.lost_age_s * 1000:5.0f} ms old"
                  + (f"  FAIL: {'; '.join(problems)}" if problems else ""), flush=True)
    worst = max(rounds, key=lambda r: r.lost_s)
    oldest = max(rounds, key=lambda r: r.lost_age_s)
    lost_steps = max(r.completed - r.on_disk for r in rounds)
    print(f"\n{len(rounds)} SIGKILLs in {time.monotonic() - began:.0f} s, flush interval {args.flush_interval} s: "
          f"{len(rounds) - failures} passed every check, {failures} failed")
    print(f"worst data lost: {worst.lost_s * 1000:.0f} ms of steps ({worst.completed - worst.on_disk} steps, "
          f"{worst.mode} mode); oldest lost step: completed {oldest.lost_age_s * 1000:.0f} ms before its kill "
          f"(bound: flush interval {args.flush_interval * 1000:.0f} ms + slack {args.slack * 1000:.0f} ms); "
          f"most steps lost in one kill: {lost_steps}; "
          f"statuses: {sorted({r.status for r in rounds})}; report/inspect/TUI opened all {len(rounds)} traces")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
