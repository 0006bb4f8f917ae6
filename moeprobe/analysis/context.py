"""What every analysis works with: the trace's DuckDB connection, the filters, the layer metadata, the SQL files
and the per-snapshot cache of per-filter intermediate tables (``analysis.snapshot``, owned by the ``Trace``).
Sampling for the estimates lives in ``analysis.sampling``.

Heavy lifting happens in SQL; results come back as column dicts of numpy arrays that are small (per layer x
expert, per step x layer) and are finished in numpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ..traces.schema import ROUTING
from .duckdb_errors import duckdb_errors
from .filters import FilterError, Filters
from .quoting import sql_literal
from .views import stored_routing_any_invalid_sql, stored_routing_invalid_sql

if TYPE_CHECKING:
    from .session import Trace

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

@cache
def sql_text(name: str) -> str:
    """The text of ``moeprobe/analysis/sql/<name>.sql`` (package data, read once)."""
    return resources.files("moeprobe.analysis").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def render_sql(text: str, sources: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders with table expressions; an unknown name is a programming error."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in sources:
            raise KeyError(f"SQL placeholder {{{name}}} has no source")
        return sources[name]

    return _PLACEHOLDER.sub(sub, text)


_NON_NULL = tuple(f.name for f in ROUTING if not f.nullable)


class Context:
    """A trace seen through one set of filters."""

    def __init__(self, trace: Trace, filters: Filters | None = None) -> None:
        self.trace = trace
        self.filters = filters or Filters()
        self.con = trace.connection
        meta = {int(layer["index"]): layer for layer in trace.layers}
        self.mode = trace.mode  # "tokens" or "counts" (only the loads table: no per-token analyses)
        self.filters.check(sorted(meta), sorted(trace.reader.shards), self.mode)
        if self.filters.tags or self.filters.phase:
            self._check_tags_and_phase()
        keep = self.filters.layers
        self.layers: dict[int, dict[str, Any]] = {i: m for i, m in sorted(meta.items()) if keep is None or i in keep}

    def _check_tags_and_phase(self) -> None:
        """A tag key or value, or a phase, that the trace does not have is a FilterError naming what it has
        (not an empty report that looks like a bug)."""
        for key, value in self.filters.tags:
            got = self.run(
                f"SELECT value, count(*) AS n FROM tags WHERE key = {sql_literal(key)} GROUP BY value ORDER BY n DESC, value"
            )
            if len(got.get("value", [])) == 0:
                keys = [str(k) for k in self.run("SELECT DISTINCT key FROM tags ORDER BY key").get("key", [])]
                have = f"tag keys: {_listing(keys)}" if keys else "this trace has no tags"
                raise FilterError(f"--tag {key}={value}: no sequence has the tag key {key!r} ({have})")
            values = [str(v) for v in got["value"]]
            if value not in values:
                raise FilterError(f"--tag {key}={value}: no sequence has {key}={value} ({key} values: {_listing(values)})")
        if self.filters.phase:
            # The steps table is small; a trace written without one (an importer, a test) has phases in routing.
            phases = [str(p) for p in self.run("SELECT DISTINCT phase FROM steps ORDER BY phase").get("phase", [])]
            if not phases:
                phases = [str(p) for p in self.run("SELECT DISTINCT phase FROM routing ORDER BY phase").get("phase", [])]
            if self.filters.phase not in phases:
                have = f"it has {' and '.join(phases)} steps only" if phases else "it has no steps yet"
                raise FilterError(f"--phase {self.filters.phase}: this trace has no {self.filters.phase} steps ({have})")

    # -- sources ----------------------------------------------------------------------------------
    def sources(self) -> dict[str, str]:
        f = self.filters
        return {
            "routing": f"(SELECT * FROM {f.routing()} v WHERE {self.valid_routing('v')})" if self._has_invalid() else f.routing(),
            "scores": f.scores(),
            "steps": f.steps_table(),
            "latency": f.latency(),
            "tags": "tags",
            "bias": "bias",
            "loads": f.loads(),
        }

    def valid_routing(self, alias: str) -> str:
        """SQL that is true for a routing row every analysis may use: no NULL in a column the schema declares
        non-null, a non-negative step, a layer the manifest lists, an expert id in 0..num_experts-1 of that
        layer and a choice rank below its top-k.

        A trace is data from whoever wrote it: an expert id -1 would index the last expert from the end, -32768
        or 300 past the array, a NULL becomes NaN, a step of -2**31 overflows step arithmetic. Such rows are
        left out of every analysis and counted (``invalid_decisions``), never silently used or dropped."""
        token, choice = self.contract_checks(lambda column: f"{alias}.{column}")
        return "coalesce(" + " AND ".join(f"({c})" for c in token + choice) + ", false)"

    def contract_checks(self, col: Callable[[str], str]) -> tuple[list[str], list[str]]:
        """``valid_routing``'s conditions with ``col(name)`` as each routing column's SQL, split into those of the
        token (the same for its k choices) and those of one choice (expert, rank): a format-2 trace checks the
        first once per stored row (views.stored_routing_invalid_sql). A row is valid when all are true."""
        if not self.layers:
            return ["false"], []
        shapes = {(self.experts(i), self.top_k(i)) for i in self.layers}
        layer, expert, rank = col("layer"), col("expert"), col("k")
        if len(shapes) == 1:
            # Every layer the same shape (the usual model): constants, which cost half the CASE per row below.
            ((n_experts, k),) = shapes
            indices = sorted(self.layers)
            contiguous = indices == list(range(indices[0], indices[-1] + 1))
            token_shape = [
                f"{layer} BETWEEN {indices[0]} AND {indices[-1]}" if contiguous
                else f"{layer} IN ({', '.join(str(i) for i in indices)})"
            ]
            choice = [f"{expert} >= 0 AND {expert} < {n_experts}", f"{rank} >= 0 AND {rank} < {k}"]
        else:  # a layer the manifest does not list makes the CASE NULL: invalid too
            experts = " ".join(f"WHEN {i} THEN {self.experts(i)}" for i in self.layers)
            top_k = " ".join(f"WHEN {i} THEN {self.top_k(i)}" for i in self.layers)
            token_shape = []
            choice = [
                f"{expert} >= 0 AND {expert} < (CASE {layer} {experts} END)",
                f"{rank} >= 0 AND {rank} < (CASE {layer} {top_k} END)",
            ]
        token = [
            # The columns the schema declares non-null (weight is nullable: engine imports carry no gate weights).
            *(f"{col(c)} IS NOT NULL" for c in _NON_NULL if c not in ("step", "phase", "layer", "expert", "k")),
            f"{col('step')} >= 0",
            f"{col('phase')} IN ('prefill', 'decode')",
            *token_shape,
        ]
        return token, choice

    def _has_invalid(self) -> bool:
        """Whether any routing row of this snapshot breaks the contract: one counting pass per snapshot (cached on
        the Trace, dropped by refresh), so that a clean trace, the usual case, pays no per-query predicate (it
        cost about two thirds more CPU on a 10 M decision report). A report's first load aggregate counts them
        in its own pass (``load.aggregate``); this pass runs only where something else comes first."""
        cache = self.trace.snapshot_cache
        if cache.invalid_total is None:
            whole = self if self.filters.key == Filters().key else Context(self.trace)
            # Format 2: once per stored row (per token), not once per decision through the view's K branches;
            # first whether any row is bad at all (cheaper), the exact count only if one is.
            any_bad = stored_routing_any_invalid_sql(self.trace.reader, whole.contract_checks)
            if any_bad is not None and int(whole.run(any_bad)["n"][0]) == 0:
                cache.invalid_total = 0
                return False
            stored = stored_routing_invalid_sql(self.trace.reader, whole.contract_checks)
            got = whole.run(stored or f"SELECT count(*)::BIGINT AS n FROM routing v WHERE NOT {whole.valid_routing('v')}")
            cache.invalid_total = int(got["n"][0]) if len(got.get("n", [])) else 0
        return cache.invalid_total > 0

    def routing_clean(self) -> bool:
        """Whether no routing row of this snapshot breaks the contract (counted once per snapshot, see
        ``_has_invalid``): then the analyses' routing source is the filtered view itself."""
        return not self._has_invalid()

    def contract_checked_per_token(self) -> bool:
        """Whether this snapshot's contract check runs once per stored token row (format 2), cheaper than folding
        it into a pass over the decisions (``load.aggregate``)."""
        return self.trace.reader.routing_encoding is not None

    def contract_unchecked(self) -> bool:
        """Whether this snapshot's routing rows have not been checked against the contract yet, and this context
        sees all of them (no filters): then a full pass it makes anyway can count the invalid rows too."""
        return self.trace.snapshot_cache.invalid_total is None and self.filters.key == Filters().key

    def has_table(self, name: str) -> bool:
        """Whether ``materialize(name, ...)`` (or ``seed``) already built this intermediate table for these filters."""
        return f"_mp_{name}_{self.filters.key}" in self.trace.snapshot_cache.names

    def invalid_decisions(self) -> dict[int, int]:
        """Routing rows (kept by the filters) that ``valid_routing`` leaves out, per layer (-1: layer NULL)."""
        if not self._has_invalid():
            return {}
        got = self.run(
            f"SELECT coalesce(v.layer, -1)::INTEGER AS layer, count(*)::BIGINT AS n FROM {self.filters.routing()} v "
            f"WHERE NOT {self.valid_routing('v')} GROUP BY ALL ORDER BY 1"
        )
        return {int(layer): int(n) for layer, n in zip(got.get("layer", []), got.get("n", []), strict=True)}

    def query(self, name: str, **extra: str) -> dict[str, np.ndarray]:
        """Run the SQL file ``name`` with the filtered tables in place; columns as numpy arrays."""
        return self.run(render_sql(sql_text(name), {**self.sources(), **extra}))

    def run(self, sql: str) -> dict[str, np.ndarray]:
        with duckdb_errors(self.trace.reader):
            # execute, not sql: the relation that sql() makes binds the statement once more before it runs, a
            # third of a millisecond for each of a report's few dozen queries.
            result = self.con.execute(sql)
            if result.description is None:  # a statement without a result set
                return {}
            columns = result.fetchnumpy()
        # Masked arrays (NULLs) become float arrays with NaN, so that numpy code downstream sees one kind.
        out: dict[str, np.ndarray] = {}
        for key, col in columns.items():
            if isinstance(col, np.ma.MaskedArray):
                numeric = col.dtype.kind in "iuf"
                col = np.ma.filled(col.astype(float), np.nan) if numeric else np.ma.filled(col, None)
            out[key] = np.asarray(col)
        return out

    def materialize(self, name: str, sql: str) -> str:
        """Create (once per filters) a temporary table from ``sql`` and return its name."""
        # The cache is the Trace's: refresh() drops these tables with the old snapshot.
        return self.trace.snapshot_cache.table(
            f"_mp_{name}_{self.filters.key}", lambda table: self.run(f"CREATE OR REPLACE TEMP TABLE {table} AS {sql}")
        )


    def sequences_sql(self) -> str:
        """(rank, sequence, decisions) of every kept sequence (``sampling.sequences`` materializes it): one row per
        (rank, sequence), so a sequence never spans two shards. Sizes come from one layer times the number of kept
        layers (every MoE layer routes every token), which keeps this pass cheap; on a format-2 trace it counts
        the stored rows where they stand for the view's (``analysis.stored``)."""
        from .stored import sequences_sql

        stored = sequences_sql(self)
        if stored is not None:
            return stored
        layer = next(iter(self.layers))
        return (
            f"SELECT rank, sequence, count(*) * {len(self.layers)} AS n "
            f"FROM {self.sources()['routing']} AS r WHERE layer = {layer} GROUP BY ALL"
        )

    # -- results computed elsewhere (moeprobe.distributed) ------------------------------------------
    def count_invalid(self) -> int:
        """Routing rows kept by the filters that break the contract (``valid_routing``), counted now."""
        got = self.run(f"SELECT count(*)::BIGINT AS n FROM {self.filters.routing()} v WHERE NOT {self.valid_routing('v')}")
        return int(got["n"][0])

    def seed_invalid_total(self, total: int) -> None:
        """Take the whole trace's invalid-row count from elsewhere (the sum over its shards), instead of a pass."""
        self.trace.snapshot_cache.invalid_total = int(total)

    def seed(self, name: str, table: Any) -> str:
        """Install ``table`` (pyarrow) as the intermediate table ``materialize(name, ...)`` would have created for
        these filters, so that every analysis reads it instead of scanning the trace. The caller guarantees it
        holds exactly what that SQL would return (up to row order)."""
        target = f"_mp_{name}_{self.filters.key}"
        self.con.register("_mp_seed", table)
        try:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {target} AS SELECT * FROM _mp_seed")
        finally:
            self.con.unregister("_mp_seed")
        self.trace.snapshot_cache.adopt(target)
        return target

    # -- layer metadata ---------------------------------------------------------------------------
    def meta_sql(self) -> str:
        """The kept layers' shapes as a SQL table (layer, experts, top_k) to join aggregates with."""
        rows = ", ".join(f"({i}, {self.experts(i)}, {self.top_k(i)})" for i in self.layers) or "(NULL, NULL, NULL)"
        return f"(SELECT * FROM (VALUES {rows}) AS m(layer, experts, top_k))"

    def experts(self, layer: int) -> int:
        return int(self.layers[layer]["num_experts"])

    def top_k(self, layer: int) -> int:
        return int(self.layers[layer]["top_k"])


def _listing(values: list[str], limit: int = 12) -> str:
    """``a, b, c`` or ``a, b, ... (40 in all)`` for long lists (a request-id tag has thousands)."""
    if len(values) <= limit:
        return ", ".join(values)
    return ", ".join(values[:limit]) + f", ... ({len(values)} in all)"
