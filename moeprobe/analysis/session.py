"""The object ``moeprobe.open_trace`` returns: a thin facade over the reader and a DuckDB connection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..traces.errors import QueryError
from ..traces.reader import TraceReader
from .sampling import DEFAULT_COUNT_BUDGET, DEFAULT_LOGIT_BUDGET, DEFAULT_SAMPLE_BUDGET
from .snapshot import SnapshotCache

if TYPE_CHECKING:
    from collections.abc import Sequence

    import duckdb
    import pyarrow as pa

    from .context import Context
    from .filters import Filters
    from .latency import Latency
    from .load import Load
    from .placement import EPLoad
    from .report_json import ReportOptions
    from .report_model import Report
    from .router import RouterLayer
    from .specialization import Specialization
    from .timeline import Timeline


# QueryError lives with the other trace errors; it is named here too, where users have imported it from.
__all__ = ["QueryError", "Trace", "open_trace"]


class Trace:
    """A trace opened for reading and analysis.

    ``manifest``, ``routing()`` and the other tables come straight from the Parquet files (pyarrow);
    ``sql()`` runs DuckDB over views named after the tables (routing, steps, latency, tags, scores, bias, loads).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.reader = TraceReader(path)
        self._con: duckdb.DuckDBPyConnection | None = None
        # Per-filter intermediate tables and the invalid-row count (see analysis.snapshot); they describe a
        # snapshot of the segments, so refresh() drops them.
        self.snapshot_cache = SnapshotCache()
        self._console: duckdb.DuckDBPyConnection | None = None  # see console_connection

    # -- metadata and tables (pyarrow) --------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.reader.manifest

    @property
    def status(self) -> str:
        return self.reader.status

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.reader.layers

    def routing(self) -> pa.Table:
        return self.reader.routing()

    def steps(self) -> pa.Table:
        return self.reader.steps()

    def latency(self) -> pa.Table:
        return self.reader.latency()

    def tags(self) -> pa.Table:
        return self.reader.tags()

    def scores(self) -> pa.Table:
        return self.reader.scores()

    def bias(self) -> pa.Table:
        return self.reader.bias()

    def loads(self) -> pa.Table:
        return self.reader.loads()

    @property
    def mode(self) -> str:
        """``tokens`` (per-token routing rows) or ``counts`` (only per-step expert loads, the ``loads`` table)."""
        return self.reader.mode

    def refresh(self) -> None:
        """Pick up segments written since the trace was opened (or last refreshed)."""
        self.reader.refresh()
        self._close_console()
        self.snapshot_cache.clear(self._con)
        if self._con is not None:
            from .views import create_views

            create_views(self._con, self.reader)

    # -- DuckDB -------------------------------------------------------------------------------------
    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            import duckdb

            from .views import create_views

            # DuckDB draws its own progress bar on stdout for long queries: it would corrupt `report --json`.
            con = duckdb.connect(database=":memory:")
            con.execute("SET enable_progress_bar = false")
            con.execute("SET enable_progress_bar_print = false")  # also if a user turns the bar on
            create_views(con, self.reader)
            self._con = con
        return self._con

    @property
    def console_connection(self) -> duckdb.DuckDBPyConnection:
        """A sandboxed connection for SQL typed by a person (see ``analysis.console``): its own database, views
        over this snapshot's segments, no access to any other file, configuration locked. ``refresh()`` makes
        the next use build a new one over the newer segments; the analyses' ``connection`` is never touched."""
        if self._console is None:
            from .console import sandboxed_connection

            self._console = sandboxed_connection(self.reader)
        return self._console

    def _close_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run SQL over the trace's views and return the result as a ``pyarrow.Table`` (see :meth:`df` for a
        pandas or polars DataFrame)."""
        from .duckdb_errors import duckdb_errors

        with duckdb_errors(self.reader):
            return self.connection.sql(query, params=params).to_arrow_table()

    def df(
        self,
        query: str = "SELECT * FROM routing",
        params: list[Any] | dict[str, Any] | None = None,
        *,
        library: str | None = None,
    ) -> Any:
        """Run SQL like :meth:`sql` and return a pandas DataFrame, or a polars one when pandas is not installed.

        ``library="pandas"`` or ``"polars"`` picks one. moeprobe depends on neither: ``sql()`` returns pyarrow,
        which both read without a copy where the types allow.
        """
        from .dataframe import to_dataframe

        return to_dataframe(self.sql(query, params), library)

    # -- analyses (thin: each lives in its own module) ---------------------------------------------------
    def context(self, filters: Filters | None = None) -> Context:
        """This trace seen through ``filters``; raises ``FilterError`` for a layer or rank it does not have."""
        from .context import Context

        return Context(self, filters)

    def load(
        self,
        filters: Filters | None = None,
        *,
        top_n: int | None = None,
        window_steps: int | None = None,
        first_choice: bool = False,
    ) -> Load:
        """Expert load and imbalance per layer (counts, MaxVio, CV, entropy, Gini, top-N, dead, windows)."""
        from . import load

        ctx = self.context(filters)
        return load.compute(ctx, top_n=top_n, window_steps=window_steps, first_choice=first_choice)

    def ep_load(self, filters: Filters | None = None, *, ep_size: int = 8, placement: Sequence[int] | None = None) -> EPLoad:
        """Load per expert-parallel rank and balancedness (SGLang and vLLM aggregations)."""
        from . import load, placement as placement_mod

        ctx = self.context(filters)
        return placement_mod.compute(ctx, load.compute(ctx), ep_size=ep_size, placement=placement)

    def specialization(
        self,
        filters: Filters | None = None,
        *,
        tag_keys: list[str] | None = None,
        min_count: int = 10,
        count_budget: int = DEFAULT_COUNT_BUDGET,
        sample_budget: int = DEFAULT_SAMPLE_BUDGET,
    ) -> Specialization:
        """Per-tag expert distribution and NMI, vocabulary specialization, repetition, co-activation.

        Count tables use at most ``count_budget`` decisions and the token-level joins ``sample_budget``
        (whole sequences, deterministic); 0 means every decision.
        """
        from . import specialization
        from .sampling import sample

        ctx = self.context(filters)
        counts = sample(ctx, count_budget, materialize=False)
        return specialization.compute(ctx, counts, sample(ctx, sample_budget), keys=tag_keys, min_count=min_count)

    def router(
        self,
        filters: Filters | None = None,
        *,
        sample_budget: int = DEFAULT_SAMPLE_BUDGET,
        logit_budget: int = DEFAULT_LOGIT_BUDGET,
    ) -> list[RouterLayer]:
        """Router confidence, aux losses and bias flips from captured logits; empty without logits. They read the
        sequences of the token-level sample (``sample_budget`` decisions), or fewer whole sequences when those
        hold more than ``logit_budget`` logits; 0 means no limit."""
        from . import router
        from .sampling import sample

        ctx = self.context(filters)
        return router.compute(ctx, router.choose_sample(ctx, sample(ctx, sample_budget), logit_budget))

    def latency_summary(self, filters: Filters | None = None) -> Latency:
        """Router and block time quantiles per layer, by phase, and against the step's max expert load."""
        from . import latency

        return latency.compute(self.context(filters))

    def timeline(self, filters: Filters | None = None, *, max_points: int = 20_000) -> Timeline:
        """Per-step MaxVio per layer and latency rows against the step's busiest expert (bounded, for charts)."""
        from . import timeline

        return timeline.compute(self.context(filters), max_points=max_points)

    def summary(self, filters: Filters | None = None, options: ReportOptions | None = None) -> dict[str, Any]:
        """The full report as a JSON-ready dict (the ``moeprobe report --json`` object, docs/report-json.md)."""
        from . import report_json

        return report_json.build(self, filters, options)

    def report(self, filters: Filters | None = None, options: ReportOptions | None = None) -> Report:
        """The full report as typed records (``analysis.report_model``); ``summary()`` is its JSON form."""
        from . import report_json

        return report_json.build_report(self, filters, options)

    def close(self) -> None:
        self._close_console()
        if self._con is not None:
            self._con.close()
            self._con = None
        self.snapshot_cache.clear(None)  # the tables went with the connection

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, status={self.status!r}, layers={len(self.layers)})"

    def _repr_html_(self) -> str:
        """Jupyter: what the trace is, its load heat map and per-layer load table (needs the html extra for the map)."""
        from .display import trace_html

        return trace_html(self)


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open a trace directory for reading. Raises a ``TraceError`` subclass if it is not usable."""
    return Trace(path)
