"""Where each file of a trace lives. Writer and reader both go through these helpers."""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"
SHARD_MANIFEST = "shard.json"
WRITER_LOCK = "writer.lock"  # flock'ed by the shard's writer for as long as it is open
SPACE_RESERVE = ".space.reserve"  # room for the final manifests, held while the shard is being written
SEGMENT_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"

_SHARD_RE = re.compile(r"^rank=(\d+)$")
_SEGMENT_RE = re.compile(r"^(\d{6,})\.parquet$")


def shard_dir(trace: Path, rank: int) -> Path:
    return trace / f"rank={rank}"


def table_dir(trace: Path, rank: int, table: str) -> Path:
    return shard_dir(trace, rank) / table


def segment_name(number: int) -> str:
    return f"{number:06d}{SEGMENT_SUFFIX}"


def temp_name(number: int) -> str:
    # Leading dot and trailing .tmp: neither a glob for *.parquet nor a directory listing picks it up.
    return f".{segment_name(number)}{TMP_SUFFIX}"


def shard_ranks(trace: Path) -> list[int]:
    """Ranks that have a shard directory, in order."""
    ranks = []
    for child in trace.iterdir():
        match = _SHARD_RE.match(child.name)
        if match and child.is_dir():
            ranks.append(int(match.group(1)))
    return sorted(ranks)


def segment_number(path: Path) -> int | None:
    match = _SEGMENT_RE.match(path.name)
    return int(match.group(1)) if match else None


def segments(trace: Path, rank: int, table: str) -> list[Path]:
    """Complete segments of one table in one shard, in write order."""
    directory = table_dir(trace, rank, table)
    if not directory.is_dir():
        return []
    found = [(n, p) for p in directory.iterdir() if (n := segment_number(p)) is not None]
    return [p for _, p in sorted(found)]
