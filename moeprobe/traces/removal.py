"""What ``--force`` may delete: only files moeprobe writes, recognised by name and by content, never a symlink.

A trace directory holds ``manifest.json`` (a regular file with the moeprobe magic), ``rank=R/`` directories, and
in each shard ``shard.json``, ``writer.lock``, ``.space.reserve`` (room held for the final manifest) and one directory per table holding ``NNNNNN.parquet`` segments
(regular files that start with the Parquet magic ``PAR1``); plus the hidden temporary names the writer uses while
writing (``.manifest.json.*.tmp``, ``.NNNNNN.parquet.tmp``). Anything else (a notebook kept in the trace, a CSV
dataset partitioned as ``rank=0/``, a file named ``rank=1.csv``, a symbolic link) means the directory is not only
a trace: ``--force`` refuses, names the first foreign entry, and deletes nothing.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from . import layout
from .errors import NotATraceError, TraceError
from .locking import probe_shard_lock
from .manifest import read_trace_manifest
from .schema import TABLES

_SHARD = re.compile(r"^rank=\d+$")
_SEGMENT = re.compile(r"^\d{6,}(?:-\d{6,})?\.parquet$")  # a flush, or flushes merged by compaction (layout)
_SEGMENT_TMP = re.compile(r"^\.\d{6,}(?:-\d{6,})?\.parquet\.tmp$")


def _json_tmp(name: str, target: str) -> bool:
    return name.startswith(f".{target}.") and name.endswith(".tmp")


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def _is_real_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _starts_with_parquet_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _foreign(root: Path, path: Path, why: str = "not written by moeprobe") -> NotATraceError:
    return NotATraceError(
        f"{root}: refusing to overwrite, it is not a moeprobe trace ({path} is {why}); remove it yourself or record elsewhere"
    )


_NOT_REGULAR = "not a regular file (a symbolic link or special file)"


def owned_files(trace: Path) -> list[Path]:
    """Every file and directory under ``trace`` that moeprobe wrote, deepest first; ``NotATraceError`` naming the
    first entry that is not one of them."""
    owned: list[Path] = []
    manifest = trace / layout.MANIFEST
    for entry in sorted(trace.iterdir()):
        name = entry.name
        if name == layout.MANIFEST:
            if not _is_regular(entry):
                raise _foreign(trace, entry, _NOT_REGULAR)
            owned.append(entry)
        elif _json_tmp(name, layout.MANIFEST) and _is_regular(entry):
            owned.append(entry)
        elif _SHARD.match(name) and _is_real_dir(entry):
            owned += _owned_in_shard(trace, entry)
            owned.append(entry)
        else:
            raise _foreign(trace, entry)
    if manifest in owned:
        try:
            read_trace_manifest(manifest)
        except TraceError as exc:
            raise NotATraceError(f"{trace}: refusing to overwrite, it is not a moeprobe trace ({exc})") from exc
    return owned


def _owned_in_shard(root: Path, shard: Path) -> list[Path]:
    owned: list[Path] = []
    for entry in sorted(shard.iterdir()):
        name = entry.name
        if name in (layout.SHARD_MANIFEST, layout.WRITER_LOCK, layout.SPACE_RESERVE) or _json_tmp(name, layout.SHARD_MANIFEST):
            if not _is_regular(entry):
                raise _foreign(root, entry, _NOT_REGULAR)
            owned.append(entry)
        elif name in TABLES and _is_real_dir(entry):
            for segment in sorted(entry.iterdir()):
                if _SEGMENT_TMP.match(segment.name) and _is_regular(segment):
                    owned.append(segment)
                elif _SEGMENT.match(segment.name) and _is_regular(segment) and _starts_with_parquet_magic(segment):
                    owned.append(segment)
                else:
                    raise _foreign(root, segment)
            owned.append(entry)
        else:
            raise _foreign(root, entry)
    return owned


def remove_trace(trace: Path) -> None:
    """Delete the trace directory ``trace`` if everything in it is moeprobe's and no writer holds a shard's lock;
    otherwise raise (``NotATraceError``, ``TraceBusyError``) having deleted nothing."""
    owned = owned_files(trace)
    _remove(owned, [p for p in owned if p.parent == trace and _SHARD.match(p.name)])
    trace.rmdir()


def remove_shard(shard: Path) -> None:
    """Delete one ``rank=R`` shard of a multi-process trace, under the same rules as ``remove_trace``."""
    if not _is_real_dir(shard):
        raise _foreign(shard.parent, shard, "not a directory")
    owned = _owned_in_shard(shard.parent, shard)
    _remove(owned, [shard])
    shard.rmdir()


def _remove(owned: list[Path], shards: list[Path]) -> None:
    held: list[int] = []
    try:
        for shard in shards:
            fd = probe_shard_lock(shard)  # raises TraceBusyError while a writer holds it: nothing deleted yet
            if fd is not None:
                held.append(fd)
        for path in owned:  # deepest first: files before the directories that hold them
            if stat.S_ISDIR(os.lstat(path).st_mode):
                path.rmdir()
            else:
                path.unlink()
    finally:
        for fd in held:
            os.close(fd)
