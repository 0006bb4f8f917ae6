"""``moeprobe`` entry point: dispatches to one module per command and turns errors into one line.

Each command module defines ``HELP`` (one line) and ``main(argv: list[str]) -> int``. Modules are
imported only when their command runs, so ``moeprobe inspect`` never imports torch.

Exit status, the same for every command: 0 success, 1 bad input or failure (a missing or damaged trace, a
filter that matches nothing the trace has, a job that failed), 2 usage (an unknown command or option, a
malformed value), 128+N for a recorded job killed by signal N, 130 when interrupted.
"""

from __future__ import annotations

import importlib.util
import os
import sys

COMMANDS: dict[str, str] = {
    "record": "moeprobe.cli.record",
    "inspect": "moeprobe.cli.inspect",
    "report": "moeprobe.cli.report",
    "simulate": "moeprobe.cli.simulate",
    "tui": "moeprobe.cli.tui",
    "demo": "moeprobe.cli.demo",
    "import": "moeprobe.cli.import_",
    "capture-server": "moeprobe.cli.capture_server",
    "serve": "moeprobe.cli.serve",
    "completion": "moeprobe.cli.completion",
}

DEBUG_ENV = "MOEPROBE_DEBUG"


class UsageError(Exception):
    """Bad command-line input that is not about a trace (the message is printed as is)."""


def _available() -> dict[str, str]:
    return {name: mod for name, mod in COMMANDS.items() if importlib.util.find_spec(mod) is not None}


def _usage() -> str:
    from .._version import __version__

    lines = [f"moeprobe {__version__}: routing profiler for Mixture-of-Experts models", "", "commands:"]
    for name, module_name in _available().items():
        module = importlib.import_module(module_name)
        lines.append(f"  {name:<14} {getattr(module, 'HELP', '')}")
    lines += ["", "run 'moeprobe COMMAND --help' for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from .._version import __version__

        print(f"moeprobe {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    module_name = _available().get(name)
    if module_name is None:
        from .args import nearest

        guess = nearest(name, list(_available()))
        hint = f"; did you mean {guess!r}?" if guess else ""
        print(f"moeprobe: unknown command {name!r}{hint} (commands: {', '.join(_available())})", file=sys.stderr)
        return 2
    from ..traces.errors import TraceError
    from ..logs import show_library_messages

    show_library_messages()
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except TraceError as exc:
        from ..safe_text import printable

        # The message quotes paths and file contents: keep it one line and free of terminal control codes.
        print(f"moeprobe {name}: {printable(exc)}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"moeprobe {name}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse's --help (0); a command's own explicit exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(f"moeprobe {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `moeprobe report ... | head`: the reader went away; not an error worth a message.
        _silence_stdout()
        return 0
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        print(
            f"moeprobe {name}: missing dependency {missing!r}; install moeprobe with the extras this command "
            f"needs, e.g. pip install 'moeprobe[transformers,tui]'",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        from ..safe_text import printable

        print(
            f"moeprobe {name}: internal error: {type(exc).__name__}: {printable(exc)} (set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


# Commands that only read traces and write their outputs explicitly (flushed, closed and renamed before they
# return): nothing of theirs waits for the garbage collector at exit.
_READ_ONLY = frozenset({"report"})


def entry() -> None:
    try:
        code = main()
        # Flush here, not at interpreter exit: `moeprobe --help | head -1` closes the pipe early, and a failed
        # flush at exit prints a BrokenPipeError traceback that no handler can catch.
        sys.stdout.flush()
    except BrokenPipeError:
        code = 0  # the reader went away on purpose (head, less, grep -q)
        _silence_stdout()
    if sys.argv[1:2] and sys.argv[1] in _READ_ONLY:
        import gc

        # The interpreter's last collection walks every object that numpy, pyarrow, DuckDB and the report made, to
        # free them a moment before the process ends anyway: 50 of the 70 ms a 1 M-decision report spent exiting.
        # Frozen objects are left out of it; atexit handlers and the streams' flush still run.
        gc.freeze()
    sys.exit(code)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null so that what is still buffered is flushed there, silently."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    entry()
