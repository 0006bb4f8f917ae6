"""``moeprobe record -o DIR -- python job.py ARGS``: run an unmodified job and record its MoE routing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HELP = "run a command and record the routing of every MoE model it runs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeprobe record",
        description="Run COMMAND (e.g. python job.py ARGS) and record every supported MoE model it builds or loads.",
    )
    parser.add_argument("-o", "--output", default="traces/run", help="trace directory (default: traces/run); "
                        "a second model in the same job goes to OUTPUT-2, and so on")
    parser.add_argument("--force", action="store_true", help="overwrite an existing trace")
    parser.add_argument("--logits", action="store_true", help="also record the full router scores (for replay)")
    parser.add_argument("--flush-interval", type=float, default=1.0, metavar="S", help="write segments at least every S seconds")
    parser.add_argument("--redact-tokens", action="store_true", help="store no token ids, only their routing")
    parser.add_argument("--live", action="store_true", help="open the TUI on the trace while the job runs; the job's "
                        "output goes to OUTPUT.log")
    parser.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on "
                        "http://127.0.0.1:PORT/metrics while the job records (docs/prometheus.md)")
    from .serve import add_metric_options

    add_metric_options(parser, "metrics-")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    return parser


def _check_port(port: int) -> str | None:
    """Why the job could not serve metrics on ``port``, or None; asked before the job spends any time."""
    import socket

    from ..metrics.endpoint import HOST

    if not 0 <= port <= 65535:
        return f"--metrics-port {port} is not a TCP port (0-65535)"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            return f"cannot serve metrics on {HOST}:{port}: {exc.strerror or exc}"
    return None


def _bootstrap_dir() -> str:
    return str(Path(__file__).resolve().parent.parent / "hooks" / "bootstrap")


def _written(base: Path) -> list[Path]:
    found = []
    n = 1
    while True:
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not (path / "manifest.json").exists():
            break
        found.append(path)
        n += 1
    return found


def _run_live(command: list[str], env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    """Start the job with its output in OUTPUT.log (the terminal belongs to the TUI), then run the TUI on the
    trace it writes. Returns once the TUI is closed; the job may still be running."""
    log_path = output.with_name(output.name + ".log")
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        # No stdin: a job that reads the terminal would fight the TUI for keystrokes.
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    from ..tui.app import MoeprobeApp

    MoeprobeApp([output]).run()
    print(f"moeprobe record: job output is in {log_path}", file=sys.stderr)
    if process.poll() is None:
        print("moeprobe record: the TUI is closed; waiting for the job to finish (Ctrl-C stops it)", file=sys.stderr)
    return process


def main(argv: list[str]) -> int:
    from ..traces.errors import TraceError
    from ..traces.finalize import mark_abandoned
    from ..traces.reader import TraceReader
    from ..traces.writer import prepare_trace_dir
    from .main import UsageError

    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command to run; usage: moeprobe record -o DIR -- python job.py ARGS")
    if args.flush_interval <= 0:
        raise UsageError("--flush-interval must be positive")
    metrics = None
    if args.metrics_port is not None:
        from .serve import metric_options

        options = metric_options(args)
        problem = _check_port(args.metrics_port)
        if problem is not None:
            print(f"moeprobe record: {problem}", file=sys.stderr)
            return 1
        metrics = {"port": args.metrics_port, **options.__dict__}
    output = Path(args.output)
    prepare_trace_dir(output, force=args.force)  # refuse early, before the job spends any time
    output.rmdir()  # the job's probe creates it; an empty directory left behind would look like a failed trace

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_bootstrap_dir(), *filter(None, [env.get("PYTHONPATH")])])
    env["MOEPROBE_RECORD"] = json.dumps(
        {
            "path": str(output.resolve()),
            "logits": args.logits,
            "force": args.force,
            "flush_interval": args.flush_interval,
            "redact_tokens": args.redact_tokens,
            "metrics": metrics,
        }
    )
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the job; we report after it
    try:
        try:
            if args.live:
                process = _run_live(command, env, output)
            else:
                process = subprocess.Popen(command, env=env)
        except OSError as exc:
            raise UsageError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc
        rc = process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)

    if rc < 0:
        try:
            how = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"killed by signal {-rc}"
        rc = 128 - rc  # the shell's convention for a job ended by a signal
    else:
        how = f"exit status {rc}"
    traces = _written(output)
    if not traces:
        print(
            f"moeprobe record: no trace was written: the job ran no MoE model moeprobe could instrument "
            f"(job {how})",
            file=sys.stderr,
        )
        return rc if rc != 0 else 1
    for trace in traces:
        reason = f"the recording process ended without closing the trace ({how})"
        mark_abandoned(trace, reason)
        try:
            reader = TraceReader(trace)
        except TraceError as exc:
            print(f"moeprobe record: {exc}", file=sys.stderr)
            continue
        counters = reader.manifest["counters"]
        print(
            f"moeprobe: {trace}: {reader.status}, {counters.get('steps', 0)} steps, {counters.get('tokens', 0)} tokens, "
            f"{counters.get('decisions', 0)} routing decisions; next: moeprobe inspect {trace}",
            file=sys.stderr,
        )
    return rc
