"""One family of errors for everything that can be wrong with a trace on disk.

The CLI turns any ``TraceError`` into a one-line message and exit status 1, so every message here must
name the path and say what is wrong in words a user can act on.
"""

from __future__ import annotations


class TraceError(Exception):
    """Base class: something about a trace directory is unusable."""


class TraceNotFoundError(TraceError):
    """The path does not exist."""


class NotATraceError(TraceError):
    """The path exists but is not a moeprobe trace (a file, an empty or foreign directory, a wrong magic)."""


class IncompatibleVersionError(TraceError):
    """The trace was written by a newer (or unknown) format version than this moeprobe reads."""


class CorruptManifestError(TraceError):
    """manifest.json or a shard's shard.json exists but cannot be parsed or has wrong types."""


class CorruptSegmentError(TraceError):
    """A Parquet segment is truncated, unreadable or does not have the expected schema."""


class TraceExistsError(TraceError):
    """A recording would overwrite an existing trace and ``force`` was not given."""


class TraceBusyError(TraceError):
    """Another process is writing this shard (or this trace, for ``force``): a shard has one writer."""


class TraceWriteError(TraceError):
    """The trace cannot be created where asked (read-only file system, a parent that is a file, /proc, ...)."""


class QueryError(TraceError):
    """A SQL query over the trace failed (syntax, unknown column, ...)."""
