"""Reading, validating and atomically writing manifest.json and shard.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CorruptManifestError, IncompatibleVersionError, NotATraceError
from .schema import FORMAT_VERSION, MAGIC

STATUSES = ("running", "complete", "aborted")

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


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as exc:
        raise CorruptManifestError(f"{path}: permission denied") from exc
    except UnicodeDecodeError as exc:
        raise CorruptManifestError(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise CorruptManifestError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(payload, dict):
        raise CorruptManifestError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    return payload


def _check_types(path: Path, payload: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str = "") -> None:
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


def read_trace_manifest(path: Path) -> dict[str, Any]:
    """Load and validate a trace's top-level manifest.json."""
    payload = _load_json(path)
    magic = payload.get("magic")
    if magic != MAGIC:
        raise NotATraceError(f"{path.parent}: not a moeprobe trace (manifest magic is {magic!r})")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptManifestError(f"{path}: field 'format_version' should be int, found {type(version).__name__}")
    if version > FORMAT_VERSION or version < 1:
        raise IncompatibleVersionError(
            f"{path.parent}: trace format version {version} is not supported by this moeprobe "
            f"(reads version {FORMAT_VERSION}); upgrade moeprobe"
        )
    _check_types(path, payload, _TRACE_FIELDS)
    for i, layer in enumerate(payload["layers"]):
        if not isinstance(layer, dict):
            raise CorruptManifestError(f"{path}: layers[{i}] should be an object")
        _check_types(path, layer, _LAYER_FIELDS, where=f"layers[{i}].")
    return payload


def read_shard_manifest(path: Path) -> dict[str, Any]:
    """Load and validate one shard's shard.json."""
    payload = _load_json(path)
    _check_types(path, payload, _SHARD_FIELDS)
    if payload["status"] not in STATUSES:
        raise CorruptManifestError(f"{path}: status {payload['status']!r} is not one of {', '.join(STATUSES)}")
    return payload
