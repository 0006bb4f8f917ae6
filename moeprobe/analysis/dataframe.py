"""pyarrow Table -> pandas or polars DataFrame, whichever the user has installed (moeprobe needs neither)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

LIBRARIES = ("pandas", "polars")


class MissingDataFrameLibrary(ImportError):
    """Neither pandas nor polars (or not the one asked for) can be imported."""


def to_dataframe(table: pa.Table, library: str | None = None) -> Any:
    if library is not None and library not in LIBRARIES:
        raise ValueError(f"library={library!r}: expected one of {', '.join(LIBRARIES)} (or None for the first installed)")
    for name in [library] if library else LIBRARIES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return table.to_pandas() if name == "pandas" else module.from_arrow(table)
    wanted = library or "pandas or polars"
    raise MissingDataFrameLibrary(
        f"trace.df() needs {wanted}, which is not installed: pip install {library or 'pandas'} "
        f"(or use trace.sql(), which returns a pyarrow.Table)"
    )
