"""``moeprobe record -o DIR -- python job.py ARGS``: run an unmodified job and record its MoE routing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .args import Parser, parse_tags

HELP = "run a command and record the routing of every MoE model it runs"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moeprobe record",
        description="Run COMMAND (e.g. python job.py ARGS) and record every supported MoE model it builds or loads.",
    )
    parser.add_argument("-o", "--output", default="traces/run", help="trace directory (default: traces/run); "
                        "a second model in the same job goes to OUTPUT-2, and so on")
    parser.add_argument("--force", action="store_true", help="overwrite an existing trace")
    parser.add_argument("--logits", action="store_true", help="also record the full router scores (for replay)")
    parser.add_argument("--flush-interval", type=float, default=1.0, metavar="S", help="write segments at least every S "
                        "seconds: the most a killed job can lose (default: 1)")
    parser.add_argument("--max-queue-mb", type=float, default=256, metavar="MB", help="memory the capture queue may hold; "
                        "beyond it steps are dropped and counted, never blocking the model (default: 256)")
    parser.add_argument("--weights", choices=("fp16", "fp32", "u8"), default="fp16", help="how gate weights are "
                        "stored (default fp16; fp32 exact, u8 smallest; error bounds in docs/trace-format.md)")
    parser.add_argument("--redact-tokens", action="store_true", help="store no token ids, only their routing")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="label every sequence of the "
                        "job (repeatable), as probe.tag(KEY=VALUE) would; filter with report --tag KEY=VALUE")
    parser.add_argument("--routers", metavar="FILE|MODULE", help="custom routers: a Python file or importable module "
                        "defining ROUTERS, a dict of moeprobe.RouterSpec (see README, Recording)")
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


def _written(base: Path | str) -> list[Path | str]:
    from ..traces.remote_writer import remote_trace_exists
    from ..traces.storage import is_remote

    found: list[Path | str] = []
    n = 1
    while True:
        if isinstance(base, str):  # an s3:// URL: the job names a second model's trace URL-2 (autoattach.path_for)
            path: Path | str = base if n == 1 else f"{base}-{n}"
            exists = is_remote(path) and remote_trace_exists(path)
        else:
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            exists = (path / "manifest.json").exists()
        if not exists:
            break
        found.append(path)
        n += 1
    return found


def _routers_source(source: str | None) -> str | None:
    """A file is checked (and made absolute, the job may change directory) here; a module name is imported by
    the job, on its own sys.path."""
    from .main import UsageError

    if source is None:
        return None
    if source.endswith(".py") or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--routers {source}: no such file (give a .py file or an importable module name)")
        return str(path.resolve())
    if not all(part.isidentifier() for part in source.split(".")):
        raise UsageError(f"--routers {source!r}: not a .py file or a module name like mypkg.routers")
    return source


def _read_status(path: str) -> str | None:
    """The interpreter that reported it cannot import moeprobe, if one did; removes the file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return text or None


def _run_live(
    command: list[str], env: dict[str, str], output: Path | str, preexec: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Start the job with its output in OUTPUT.log (the terminal belongs to the TUI), then run the TUI on the
    trace it writes. Returns once the TUI is closed; the job may still be running."""
    # An s3:// trace has no directory beside it: the log goes to the working directory, named after the prefix.
    log_path = output.with_name(output.name + ".log") if isinstance(output, Path) else Path(output.rsplit("/", 1)[-1] + ".log")
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        # No stdin: a job that reads the terminal would fight the TUI for keystrokes.
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec  # noqa: PLW1509
        )
    from ..tui.app import MoeprobeApp

    MoeprobeApp([output]).run()
    print(f"moeprobe record: job output is in {log_path}", file=sys.stderr)
    if process.poll() is None:
        print("moeprobe record: the TUI is closed; waiting for the job to finish (Ctrl-C stops it)", file=sys.stderr)
    return process


# The signals `moeprobe record` passes on to the job, so that stopping it stops the job (and not only it); one that
# record was started with ignored is not passed on (see _ignored_at_start).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# si_code of a signal the kernel sent (for SIGINT: the terminal's Ctrl-C, which reaches the whole foreground
# process group, the job included, by itself).
_SI_KERNEL = 0x80
_POLL_S = 0.5


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ignored_at_start() -> frozenset[int]:
    """The FORWARDED signals this process was started with ignored (SIG_IGN): SIGINT and SIGQUIT for a background
    job of a non-interactive shell (``cmd &``), SIGHUP under nohup. Read before the job starts; nothing in record
    has changed these dispositions by then, and Python keeps a SIGINT it inherited ignored as it is (it puts its
    KeyboardInterrupt handler only over SIG_DFL)."""
    return frozenset(s for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN)


def _run_forwarding_signals(
    command: list[str], env: dict[str, str], output: Path | str, *, live: bool, forwarded: list[int]
) -> int:
    """Run the job and wait for it, passing SIGINT, SIGTERM and SIGHUP sent to us on to it.

    The signals are blocked here and taken with sigtimedwait, so none can end this process before the job has
    ended. A Ctrl-C from the terminal already reaches the job (same process group): that one is not sent a
    second time.

    A signal record was started with ignored stays ignored, here and in the job, as if the job had been run
    directly: it is neither blocked nor waited for (a blocked signal is queued even when ignored, and
    sigtimedwait would take it and pass it on to a job that ignores it too), so the kernel discards it. The job
    starts with the signal mask and the dispositions record was started with, set explicitly in the child:
    SIG_IGN where record inherited SIG_IGN, SIG_DFL otherwise, never a handler of record's own.
    """
    ignored = _ignored_at_start()
    dispositions = {s: signal.SIG_IGN if s in ignored else signal.SIG_DFL for s in FORWARDED}
    watched = {*(s for s in FORWARDED if s not in ignored), signal.SIGCHLD}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)

    def as_record_was_started() -> None:
        # In the child, between fork and exec, with the signals still blocked: the dispositions first, so that a
        # signal sent to the child since the fork meets the job's disposition, not record's, once unblocked.
        for signum, disposition in dispositions.items():
            signal.signal(signum, disposition)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    try:
        if live:
            process = _run_live(command, env, output, as_record_was_started)
        else:
            process = subprocess.Popen(command, env=env, preexec_fn=as_record_was_started)  # noqa: PLW1509 - no threads yet
        while process.poll() is None:
            info = signal.sigtimedwait(watched, _POLL_S)  # bounded: the job's end is also seen by poll()
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL:
                continue  # the terminal sent it to the job too
            forwarded.append(info.si_signo)
            try:
                process.send_signal(info.si_signo)
            except ProcessLookupError:
                pass
        return process.returncode
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


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
    if args.max_queue_mb <= 0:
        raise UsageError("--max-queue-mb must be positive")
    tags = parse_tags(args.tag)
    routers = _routers_source(args.routers)
    metrics = None
    if args.metrics_port is not None:
        from .serve import metric_options

        options = metric_options(args)
        problem = _check_port(args.metrics_port)
        if problem is not None:
            print(f"moeprobe record: {problem}", file=sys.stderr)
            return 1
        metrics = {"port": args.metrics_port, **options.__dict__}
    from ..traces.storage import location

    output = location(args.output)  # a directory, or an s3:// URL the job's ranks write into
    prepare_trace_dir(output, force=args.force)  # refuse early, before the job spends any time
    if isinstance(output, Path):
        output.rmdir()  # the job's probe creates it; an empty directory left behind would look like a failed trace

    # The job's start-up hook writes here when it cannot import moeprobe, so that we can say why nothing was recorded.
    status_fd, status_file = tempfile.mkstemp(prefix="moeprobe-record-", suffix=".txt")
    os.close(status_fd)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_bootstrap_dir(), *filter(None, [env.get("PYTHONPATH")])])
    env["MOEPROBE_RECORD"] = json.dumps(
        {
            "path": str(output.resolve()) if isinstance(output, Path) else output,
            "logits": args.logits,
            "force": args.force,
            "flush_interval": args.flush_interval,
            "max_queue_mb": args.max_queue_mb,
            "redact_tokens": args.redact_tokens,
            "tags": tags,
            "routers": routers,
            "python": sys.executable,
            "status_file": status_file,
            "metrics": metrics,
            "weights": args.weights,
        }
    )
    forwarded: list[int] = []
    try:
        rc = _run_forwarding_signals(command, env, output, live=args.live, forwarded=forwarded)
    except OSError as exc:
        _read_status(status_file)  # removes it
        raise UsageError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc
    if forwarded:
        names = ", ".join(dict.fromkeys(_signal_name(s) for s in forwarded))
        print(f"moeprobe record: passed {names} on to the job", file=sys.stderr)

    if rc < 0:
        try:
            how = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"killed by signal {-rc}"
        rc = 128 - rc  # the shell's convention for a job ended by a signal
    else:
        how = f"exit status {rc}"
    job_python = _read_status(status_file)
    traces = _written(output)
    if not traces:
        # The job's status passes through, also when it is 0: the job did its work, it just had nothing to record.
        if job_python is not None:
            print(
                f"moeprobe record: no trace was written: the job's Python ({job_python}) cannot import moeprobe; "
                f"run the job with {sys.executable} (moeprobe record -o {output} -- {sys.executable} SCRIPT ...) "
                f"or install moeprobe for it (job {how})",
                file=sys.stderr,
            )
        else:
            print(
                f"moeprobe record: warning: no trace was written: the job ran no MoE model moeprobe could "
                f"instrument (job {how}); a custom PyTorch model needs --routers FILE",
                file=sys.stderr,
            )
        return rc
    for trace in traces:
        reason = f"the recording process ended without closing the trace ({how})"
        if isinstance(trace, Path):
            mark_abandoned(trace, reason)
        else:
            from ..traces.remote_writer import mark_remote_abandoned

            mark_remote_abandoned(trace, reason)
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
