"""One writer per shard: an advisory ``flock`` on ``rank=R/writer.lock``, held for the writer's whole life.

Two probes on one path (both with ``force``, or a second run while the first still writes) would otherwise mix
their rows into one trace that says ``complete``. The kernel drops the lock when the process dies, however it
dies, so a killed writer never leaves a trace locked. Advisory: it binds moeprobe's writers, which all take it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from . import layout
from .errors import TraceBusyError


def _busy(shard: Path) -> TraceBusyError:
    return TraceBusyError(
        f"{shard}: another process is writing this shard (one writer per shard); wait for it to finish, "
        "or record to another path"
    )


def _flock_or_busy(fd: int, shard: Path) -> int:
    """Take an exclusive lock on ``fd`` without waiting; a held lock is TraceBusyError. Closes ``fd`` on failure."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(shard) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_shard(shard: Path) -> int:
    """Take the shard's writer lock and return its descriptor (keep it open: closing it releases the lock)."""
    fd = os.open(shard / layout.WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    return _flock_or_busy(fd, shard)


def probe_shard_lock(shard: Path) -> int | None:
    """Take the lock of an existing shard if nobody holds it (the descriptor, to release with ``os.close``);
    ``None`` when the shard has no lock file. Raises ``TraceBusyError`` when a writer holds it."""
    try:
        fd = os.open(shard / layout.WRITER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    return _flock_or_busy(fd, shard)
