"""Where each file of a trace lives. Writer and reader both go through these helpers."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import TypeVar

P = TypeVar("P", bound=PurePath)  # a local Path, or a PurePosixPath naming an object in a store

MANIFEST = "manifest.json"
SHARD_MANIFEST = "shard.json"
WRITER_LOCK = "writer.lock"  # flock'ed by the shard's writer for as long as it is open
SPACE_RESERVE = ".space.reserve"  # room for the final manifests, held while the shard is being written
SEGMENT_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"

_SHARD_RE = re.compile(r"^rank=(\d+)$")
# NNNNNN.parquet: flush number N; NNNNNN-MMMMMM.parquet: flushes N..M merged into one file (compaction)
_SEGMENT_RE = re.compile(r"^(\d{6,})(?:-(\d{6,}))?\.parquet$")


def shard_dir(trace: Path, rank: int) -> Path:
    return trace / f"rank={rank}"


def table_dir(trace: Path, rank: int, table: str) -> Path:
    return shard_dir(trace, rank) / table


def segment_name(number: int) -> str:
    return f"{number:06d}{SEGMENT_SUFFIX}"


def merged_name(first: int, last: int) -> str:
    return f"{first:06d}-{last:06d}{SEGMENT_SUFFIX}"


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
    span = segment_span(path)
    return span[0] if span else None


def segment_span(path: PurePath | str) -> tuple[int, int] | None:
    """The flush numbers a segment holds: (N, N) for NNNNNN.parquet, (N, M) for a merged NNNNNN-MMMMMM.parquet.
    ``path``: a local path, or an object's URL (a str) in an ``s3://`` trace."""
    match = _SEGMENT_RE.match(path.name if isinstance(path, PurePath) else path.rsplit("/", 1)[-1])
    if not match:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    return (first, last) if last >= first else None


def segments(trace: Path, rank: int, table: str) -> list[Path]:
    """Complete segments of one table in one shard, in write order; see :func:`visible`."""
    directory = table_dir(trace, rank, table)
    if not directory.is_dir():
        return []
    return visible([p for p in directory.iterdir() if segment_span(p) is not None])


def visible(paths: list[P]) -> list[P]:
    """The segments to read, in flush order: a merged segment hides the segments whose flushes it holds.

    Compaction renames the merged file into place and only then deletes what it merged, so a listing taken at
    any moment (or after a kill in between) shows each flush exactly once. Spans that overlap without one
    holding the other are never written; if found, the earlier-listed wider span wins and the other is hidden.
    """
    spans = sorted(((span, p) for p in paths if (span := segment_span(p)) is not None), key=lambda t: (t[0][0], -t[0][1]))
    out: list[P] = []
    covered = -1  # the last flush number already shown
    for (first, last), path in spans:
        if first > covered:
            out.append(path)
            covered = last
    return out
