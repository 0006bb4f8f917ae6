"""``moeprobe tui TRACE [OTHER]``: browse a trace live in the terminal (Textual); a second trace enables Compare."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import Parser

HELP = "browse a trace live in the terminal (load heat map, layers, tokens, SQL)"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moeprobe tui",
        description="Browse a trace in the terminal while it is being written or afterwards. "
        "Keys: 1 Overview, 2 Layer, 3 Specialization, 4 Tokens, 5 SQL, 6 Compare (with a second trace), ? every key "
        "of the screen, q quit.",
    )
    parser.add_argument("trace", help="trace directory (it may not exist yet: the TUI waits for it)")
    parser.add_argument("other", nargs="?", help="a second trace to compare with (key 6)")
    parser.add_argument("--poll", type=float, default=0.3, metavar="S", help="check for new segments every S seconds")
    return parser


def check_path(path: Path | str) -> None:
    """Raise the trace's one-line ``TraceError`` before the app starts, unless the trace may still appear.

    A missing path or an empty directory is waited for (a job is about to write it); a file, a foreign directory
    or a future format version will not fix itself, so the command fails right away with exit status 1.
    """
    from ..traces.errors import NotATraceError, TraceNotFoundError
    from ..traces.reader import open_reader

    try:
        open_reader(path)
    except TraceNotFoundError:
        return
    except NotATraceError:
        if isinstance(path, Path) and path.is_dir() and not any(path.iterdir()):
            return
        raise


def main(argv: list[str]) -> int:
    from .main import UsageError

    args = _parser().parse_args(argv)
    if args.poll <= 0:
        raise UsageError("--poll must be positive")
    from ..traces.storage import location

    paths = [location(args.trace)] + ([location(args.other)] if args.other else [])
    for path in paths:
        check_path(path)
    from ..tui.app import MoeprobeApp

    MoeprobeApp(paths, poll_interval=args.poll).run()
    return 0
