"""The on-disk trace format: schema, manifest, segment writer, reader and errors (pyarrow only).

The errors are imported with the package; everything else on first use (PEP 562), so that ``import moeprobe``
(which imports the errors from here) and ``from moeprobe.traces import layout`` cost no pyarrow or numpy, and
``moeprobe report`` never imports the writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptManifestError,
    CorruptSegmentError,
    IncompatibleVersionError,
    NotATraceError,
    QueryError,
    TraceBusyError,
    TraceError,
    TraceExistsError,
    TraceNotFoundError,
    TraceWriteError,
)

if TYPE_CHECKING:
    from .reader import TraceReader, open_reader
    from .schema import FORMAT_VERSION, MAGIC, TABLES
    from .writer import ShardWriter, prepare_trace_dir

# name -> submodule that defines it, loaded on first attribute access.
_LAZY = {
    "TraceReader": "reader",
    "open_reader": "reader",
    "FORMAT_VERSION": "schema",
    "MAGIC": "schema",
    "TABLES": "schema",
    "ShardWriter": "writer",
    "prepare_trace_dir": "writer",
}

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "TABLES",
    "CorruptManifestError",
    "CorruptSegmentError",
    "IncompatibleVersionError",
    "NotATraceError",
    "QueryError",
    "ShardWriter",
    "TraceBusyError",
    "TraceError",
    "TraceExistsError",
    "TraceNotFoundError",
    "TraceReader",
    "TraceWriteError",
    "open_reader",
    "prepare_trace_dir",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
