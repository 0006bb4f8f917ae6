"""The on-disk trace format: schema, manifest, segment writer, reader and errors (pyarrow only)."""

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
from .reader import TraceReader, open_reader
from .schema import FORMAT_VERSION, MAGIC, TABLES
from .writer import ShardWriter, prepare_trace_dir

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
