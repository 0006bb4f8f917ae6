"""moeprobe: routing profiler and expert-load observability for Mixture-of-Experts models.

``import moeprobe`` is cheap: torch is imported only when a probe is created, DuckDB only when a query runs,
and Textual never (it belongs to ``moeprobe.tui``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .traces.errors import (
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
    from .analysis.session import Trace, open_trace
    from .hooks.probe import Probe, record
    from .hooks.spec import RouterSpec, UnsupportedModelError
    from .metrics.endpoint import MetricsEndpointError
    from .metrics.options import MetricsOptions

# name -> module that defines it; loaded on first attribute access (PEP 562) so that importing the
# package does not pull in torch.
_LAZY = {
    "record": "moeprobe.hooks.probe",
    "Probe": "moeprobe.hooks.probe",
    "RouterSpec": "moeprobe.hooks.spec",
    "UnsupportedModelError": "moeprobe.hooks.spec",
    "open_trace": "moeprobe.analysis.session",
    "Trace": "moeprobe.analysis.session",
    "MetricsOptions": "moeprobe.metrics.options",
    "MetricsEndpointError": "moeprobe.metrics.endpoint",
}

__all__ = [
    "__version__",
    "record",
    "Probe",
    "RouterSpec",
    "UnsupportedModelError",
    "open_trace",
    "Trace",
    "MetricsOptions",
    "MetricsEndpointError",
    "TraceError",
    "TraceNotFoundError",
    "NotATraceError",
    "IncompatibleVersionError",
    "CorruptManifestError",
    "CorruptSegmentError",
    "QueryError",
    "TraceExistsError",
    "TraceBusyError",
    "TraceWriteError",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'moeprobe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
