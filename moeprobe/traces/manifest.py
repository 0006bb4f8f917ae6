"""Reading, validating and atomically writing manifest.json and shard.json."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import CorruptManifestError, IncompatibleVersionError, NotATraceError
from .schema import FORMAT_VERSION, MAGIC

STATUSES = ("running", "complete", "aborted")
MAX_EXPERTS = (1 << 15) - 1  # the routing table's expert column is int16
MAX_TIMESTAMP = 253_402_300_800  # 10000-01-01T00:00:00Z, past what datetime can show
# A manifest holds one entry per MoE layer and a few counters: a few KiB for the largest models. Far more is not
# a manifest, and reading it would cost memory in proportion to what a hostile file claims.
MAX_MANIFEST_BYTES = 16 << 20

# Field -> accepted types, checked on read so that a hand-edited or damaged manifest fails with a
# clear message instead of a KeyError deep inside the analysis.
_TRACE_FIELDS: dict[str, tuple[type, ...]] = {
    "magic": (str,),
    "format_version": (int,),
    "world_size": (int,),
    "model": (dict,),
    "layers": (list,),
    "options": (dict,),
}
_SHARD_FIELDS: dict[str, tuple[type, ...]] = {
    "rank": (int,),
    "status": (str,),
    "pid": (int,),
    "host": (str,),
    "started_at": (float, int),
    "heartbeat_at": (float, int),
    "counters": (dict,),
}
_LAYER_FIELDS: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "name": (str,),
    "num_experts": (int,),
    "top_k": (int,),
}


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so that a reader sees either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, sort_keys=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def manifest_bytes(payload: dict[str, Any]) -> bytes:
    """A manifest as written to an object store: the same JSON ``write_json_atomic`` writes to disk."""
    return (json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n").encode("utf-8")


def _read_small_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; ``CorruptManifestError`` otherwise.

    A manifest is data from whoever wrote the trace: ``manifest.json -> /dev/zero`` or a sparse 1 GB file must not
    be read into memory, and a FIFO must not block the reader. O_NONBLOCK makes opening a FIFO return at once;
    the file is then checked with fstat (the object actually opened, not the name) before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError as exc:
        raise CorruptManifestError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise CorruptManifestError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CorruptManifestError(f"{path}: cannot read (Is a directory)")
        if not stat.S_ISREG(info.st_mode):
            raise CorruptManifestError(f"{path}: not a regular file ({file_kind(info.st_mode)}); refusing to read it")
        if info.st_size > limit:
            raise CorruptManifestError(f"{path}: {info.st_size:,} bytes, larger than a manifest can be ({limit:,}); refusing to read it")
        chunks = []
        remaining = limit + 1  # a file that grows while we read it is still cut off at the limit
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise CorruptManifestError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CorruptManifestError(f"{path}: larger than a manifest can be ({limit:,} bytes); refusing to read it")
    return data


def file_kind(mode: int) -> str:
    """A word for a file type that is not a regular file, for one-line refusals."""
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return word
    return "not a regular file"


def _load_json(path: Path | str, data: bytes | None = None) -> dict[str, Any]:
    """Parse a manifest read from ``path``, or given as ``data`` (read from an object store; ``path`` is its URL)."""
    if data is None:
        assert isinstance(path, Path)
        data = _read_small_regular_file(path, MAX_MANIFEST_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptManifestError(f"{path}: not UTF-8 text") from exc
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except ValueError as exc:  # an integer longer than Python's int() accepts (4,300 digits)
        raise CorruptManifestError(f"{path}: not a usable manifest ({str(exc).splitlines()[0][:80]})") from exc
    except RecursionError as exc:
        raise CorruptManifestError(f"{path}: not a usable manifest (JSON nested too deeply)") from exc
    if not isinstance(payload, dict):
        raise CorruptManifestError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    return payload


def _parent(path: Path | str) -> str:
    """The trace a manifest belongs to, for messages (a URL's parent is cut at its last slash)."""
    return str(path.parent) if isinstance(path, Path) else str(path).rsplit("/", 1)[0]


def _check_types(path: Path | str, payload: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str = "") -> None:
    for name, types in fields.items():
        if name not in payload:
            raise CorruptManifestError(f"{path}: missing field {where}{name!r}")
        value = payload[name]
        # bool is an int subclass; a manifest that says "format_version": true is damaged, not version 1.
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise CorruptManifestError(
                f"{path}: field {where}{name!r} should be {expected}, found {type(value).__name__}"
            )


def read_trace_manifest(path: Path | str, data: bytes | None = None) -> dict[str, Any]:
    """Load and validate a trace's top-level manifest.json (``data``: its bytes, already fetched from a store)."""
    payload = _load_json(path, data)
    magic = payload.get("magic")
    if magic != MAGIC:
        raise NotATraceError(f"{_parent(path)}: not a moeprobe trace (manifest magic is {magic!r})")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptManifestError(f"{path}: field 'format_version' should be int, found {type(version).__name__}")
    if version > FORMAT_VERSION or version < 1:
        raise IncompatibleVersionError(
            f"{_parent(path)}: trace format version {version} is not supported by this moeprobe "
            f"(reads version {FORMAT_VERSION}); upgrade moeprobe"
        )
    _check_types(path, payload, _TRACE_FIELDS)
    if payload["world_size"] < 1:
        raise CorruptManifestError(f"{path}: field 'world_size' should be at least 1, found {payload['world_size']}")
    for i, layer in enumerate(payload["layers"]):
        if not isinstance(layer, dict):
            raise CorruptManifestError(f"{path}: layers[{i}] should be an object")
        _check_types(path, layer, _LAYER_FIELDS, where=f"layers[{i}].")
        # The analyses size arrays by these: 0, negative or absurd values must fail here with the field named,
        # not as a numpy error (or a 16 TiB allocation) deep in a report. Expert ids are stored as int16.
        if not 0 < layer["num_experts"] <= MAX_EXPERTS:
            raise CorruptManifestError(
                f"{path}: layers[{i}].'num_experts' should be 1 to {MAX_EXPERTS}, found {layer['num_experts']}"
            )
        if not 0 < layer["top_k"] <= layer["num_experts"]:
            raise CorruptManifestError(
                f"{path}: layers[{i}].'top_k' should be 1 to num_experts ({layer['num_experts']}), found {layer['top_k']}"
            )
        if layer["index"] < 0:
            raise CorruptManifestError(f"{path}: layers[{i}].'index' should not be negative, found {layer['index']}")
    return payload


def read_shard_manifest(path: Path | str, data: bytes | None = None) -> dict[str, Any]:
    """Load and validate one shard's shard.json (``data``: its bytes, already fetched from a store)."""
    payload = _load_json(path, data)
    _check_types(path, payload, _SHARD_FIELDS)
    # shard_state() probes the writer with os.kill(pid, 0): 0 or a negative pid would address a process group
    # (and look alive), a huge one overflows. A damaged pid must fail here, not there.
    if not 0 < payload["pid"] < 1 << 31:
        raise CorruptManifestError(f"{path}: field 'pid' should be a process id, found {payload['pid']}")
    # Times are Unix seconds; NaN, infinity or a date past year 9999 cannot be shown or compared with a clock.
    for name in ("started_at", "heartbeat_at"):
        if not (math.isfinite(payload[name]) and 0 <= payload[name] < MAX_TIMESTAMP):
            raise CorruptManifestError(f"{path}: field {name!r} should be a time in Unix seconds, found {payload[name]}")
    if payload["status"] not in STATUSES:
        raise CorruptManifestError(f"{path}: status {payload['status']!r} is not one of {', '.join(STATUSES)}")
    _check_counters(path, payload["counters"])
    return payload


# Counters the reader merges over shards and the commands show: totals are numbers, breakdowns are objects of
# numbers (table -> rows, reason -> dropped decisions). Other keys are kept and ignored.
_COUNTER_TOTALS = ("steps", "tokens", "decisions", "bytes")
_COUNTER_BREAKDOWNS = ("rows", "segments", "dropped", "anomalies")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_counters(path: Path | str, counters: dict[str, Any]) -> None:
    for name in _COUNTER_TOTALS:
        if name in counters and not _is_number(counters[name]):
            raise CorruptManifestError(f"{path}: counter {name!r} should be a number, found {_short(counters[name])}")
    for name in _COUNTER_BREAKDOWNS:
        value = counters.get(name, {})
        if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
            raise CorruptManifestError(f"{path}: counter {name!r} should be an object of numbers, found {_short(value)}")
