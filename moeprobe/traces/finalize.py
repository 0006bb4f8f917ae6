"""Closing a shard whose writer vanished (killed job): its data stays, its status becomes ``aborted``."""

from __future__ import annotations

import time
from pathlib import Path

from . import layout
from .manifest import read_shard_manifest, read_trace_manifest, write_json_atomic
from .reader import shard_state


def mark_abandoned(trace: Path, reason: str) -> list[int]:
    """Mark every shard whose writer is gone as aborted with ``reason``; return the ranks changed."""
    changed = []
    for rank in layout.shard_ranks(trace):
        path = layout.shard_dir(trace, rank) / layout.SHARD_MANIFEST
        if not path.exists():
            continue
        shard = read_shard_manifest(path)
        if shard_state(shard) != "stale":
            continue
        shard.update({"status": "aborted", "error": reason, "ended_at": time.time()})
        write_json_atomic(path, shard)
        changed.append(rank)
        if rank == 0:
            top = read_trace_manifest(trace / layout.MANIFEST)
            top.update({"status": "aborted", "error": reason})
            write_json_atomic(trace / layout.MANIFEST, top)
    return changed
