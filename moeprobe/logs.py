"""What of the library's logging reaches the terminal when moeprobe runs as a command, or inside a job that
``moeprobe record`` started.

Library modules log through ``logging.getLogger(__name__)`` (all under the ``moeprobe`` logger) and never print:
an application that embeds moeprobe routes or silences them with its own logging configuration, and without
one Python's last-resort handler still shows warnings on stderr. The CLI, and the recorder that ``moeprobe
record`` installs in the job's process, show INFO and above on stderr as the message alone (each already starts
with ``moeprobe:``), so what the user sees is what moeprobe printed before it logged. Both the CLI and capture
import this module, so it sits at the package's base and imports nothing of moeprobe.
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


def show_library_messages(*, propagate: bool = True) -> None:
    """Install the stderr handler on the ``moeprobe`` logger once (idempotent).

    ``propagate=False`` is for the recorded job's process: its messages are moeprobe's, shown once by this
    handler, and a job that configures logging for itself (``basicConfig(level=INFO)``) must not see each of them
    a second time through its own root handler."""
    logger = logging.getLogger("moeprobe")
    logger.propagate = propagate
    if any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
