"""What of the library's logging reaches the terminal when moeprobe runs as a command.

Library modules log through ``logging.getLogger(__name__)`` (all under the ``moeprobe`` logger) and never print:
an application that embeds moeprobe routes or silences them with its own logging configuration, and without
one Python's last-resort handler still shows warnings on stderr. The CLI shows INFO and above on stderr, as
the message alone (each already starts with ``moeprobe:``), so the command's output is what it always was.
"""

from __future__ import annotations

import logging
import sys


class _CurrentStderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when the record comes (tests replace it; a StreamHandler would keep
    the one it was created with)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: a failed message must not fail the caller
            self.handleError(record)


def show_library_messages() -> None:
    """Install the CLI's stderr handler on the ``moeprobe`` logger once (idempotent)."""
    logger = logging.getLogger("moeprobe")
    if any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
