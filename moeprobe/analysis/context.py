"""What every analysis works with: the trace's DuckDB connection, the filters, the layer metadata, the SQL files
and a small cache of per-filter intermediate tables.

Heavy lifting happens in SQL; results come back as column dicts of numpy arrays that are small (per layer x
expert, per step x layer) and are finished in numpy.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ..traces.schema import ROUTING
from .filters import Filters

if TYPE_CHECKING:
    from .session import Trace

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

# Analyses that are estimates look at about this many routing decisions at most (see Context.sample): count
# tables (per tag, per token id) and, much smaller, the token-level ones that join the routing with itself
# (repetition, co-activation, router scores). Load metrics always use every decision.
DEFAULT_COUNT_BUDGET = 8_000_000
DEFAULT_SAMPLE_BUDGET = 2_000_000
# A sample is this many runs of consecutive sequences, one in the middle of each quarter of the trace. More runs
# spread it further but touch more Parquet row groups: at 100 M decisions, 16 runs cost three times the CPU.
_SAMPLE_RUNS = 4


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


@dataclass(frozen=True)
class Sample:
    """A deterministic subset of whole sequences that an estimate looked at (see ``Context.sample``)."""

    table: str
    predicate: str  # SQL over columns rank and sequence that keeps the sampled sequences
    fraction: float
    decisions: int
    sequences: int
    budget: int

    def to_json(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "decisions": self.decisions,
            "sequences": self.sequences,
            "budget": self.budget,
        }


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
        from .filters import FilterError, sql_literal

        for key, value in self.filters.tags:
            got = self.run(
                f"SELECT value, count(*) AS n FROM tags WHERE key = {sql_literal(key)} GROUP BY value ORDER BY n DESC, value"
            )
            if len(got.get("value", [])) == 0:
                keys = self.run("SELECT DISTINCT key FROM tags ORDER BY key").get("key", [])
                have = f"tag keys: {_listing([str(k) for k in keys])}" if len(keys) else "this trace has no tags"
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
        a = alias
        experts = " ".join(f"WHEN {i} THEN {self.experts(i)}" for i in self.layers)
        top_k = " ".join(f"WHEN {i} THEN {self.top_k(i)}" for i in self.layers)
        if not self.layers:
            return "false"
        checks = [
            # The columns the schema declares non-null (weight is nullable: engine imports carry no gate weights).
            *(f"{a}.{c} IS NOT NULL" for c in _NON_NULL if c not in ("step", "phase", "layer", "expert", "k")),
            f"{a}.step >= 0",
            f"{a}.phase IN ('prefill', 'decode')",
            f"{a}.expert >= 0 AND {a}.expert < (CASE {a}.layer {experts} END)",
            f"{a}.k >= 0 AND {a}.k < (CASE {a}.layer {top_k} END)",
        ]
        return "coalesce(" + " AND ".join(f"({c})" for c in checks) + ", false)"

    def _has_invalid(self) -> bool:
        """Whether any routing row of this snapshot breaks the contract: one counting pass per snapshot (cached on
        the Trace, dropped by refresh), so that a clean trace, the usual case, pays no per-query predicate (it
        cost about two thirds more CPU on a 10 M decision report)."""
        if self.trace._invalid_total is None:
            whole = self if self.filters.key == Filters().key else Context(self.trace)
            got = whole.run(f"SELECT count(*)::BIGINT AS n FROM routing v WHERE NOT {whole.valid_routing('v')}")
            self.trace._invalid_total = int(got["n"][0]) if len(got.get("n", [])) else 0
        return self.trace._invalid_total > 0

    def invalid_decisions(self) -> dict[int, int]:
        """Routing rows (kept by the filters) that ``valid_routing`` leaves out, per layer (-1: layer NULL)."""
        if not self._has_invalid():
            return {}
        got = self.run(
            f"SELECT coalesce(v.layer, -1)::INTEGER AS layer, count(*)::BIGINT AS n FROM {self.filters.routing()} v "
            f"WHERE NOT {self.valid_routing('v')} GROUP BY ALL ORDER BY 1"
        )
        return {int(layer): int(n) for layer, n in zip(got.get("layer", []), got.get("n", []))}

    def query(self, name: str, **extra: str) -> dict[str, np.ndarray]:
        """Run the SQL file ``name`` with the filtered tables in place; columns as numpy arrays."""
        return self.run(render_sql(sql_text(name), {**self.sources(), **extra}))

    def run(self, sql: str) -> dict[str, np.ndarray]:
        import duckdb

        from ..traces.errors import CorruptSegmentError
        from .session import QueryError

        try:
            result = self.con.sql(sql)
            if result is None:
                return {}
            columns = result.fetchnumpy()
        except duckdb.IOException as exc:
            raise CorruptSegmentError(f"{self.trace.path}: {str(exc).splitlines()[0]}") from exc
        except duckdb.Error as exc:
            # A decoding error in a segment's column data reaches us as a bare duckdb.Error; name the file.
            # A query the user got wrong (syntax, unknown name) is not worth a full read of every segment.
            if not isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)):
                self.trace.reader.find_corrupt_segment()
            raise QueryError(str(exc).splitlines()[0]) from exc
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
        table = f"_mp_{name}_{self.filters.key}"
        cache = self.trace._temp_tables  # owned by the Trace: refresh() drops them with the old snapshot
        if table not in cache:
            self.run(f"CREATE OR REPLACE TEMP TABLE {table} AS {sql}")
            cache.add(table)
        return table

    # -- sampling for token-level analyses -----------------------------------------------------------
    def decisions(self) -> int:
        """Routing decisions kept by the filters (from the load aggregate, which every report builds anyway)."""
        from .load import aggregate

        got = self.run(f"SELECT coalesce(sum(n), 0)::BIGINT AS n FROM {aggregate(self)}")
        return int(got["n"][0])

    def sequences(self) -> str:
        """(rank, sequence, decisions) of every kept sequence, created once. Sizes come from one layer times
        the number of kept layers (every MoE layer routes every token), which keeps this pass cheap."""
        return self.materialize("sequences", self.sequences_sql())

    def sequences_sql(self) -> str:
        """The SQL behind ``sequences``: one row per (rank, sequence), so a sequence never spans two shards."""
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
        self.trace._invalid_total = int(total)

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
        self.trace._temp_tables.add(target)
        return target

    def sample(self, budget: int, *, materialize: bool = True) -> Sample:
        """The filtered routing of a deterministic subset of whole sequences, about ``budget`` decisions.

        Whole sequences are kept so that consecutive tokens stay together, in runs spread evenly over the
        trace (see ``_choose``). ``budget <= 0`` means everything. With ``materialize`` the rows are copied into
        a temporary table (for analyses that join it with itself); otherwise ``table`` is a subquery over the
        Parquet files.
        """
        if self.mode == "counts":
            from .session import QueryError

            raise QueryError(
                f"{self.trace.path}: this analysis needs per-token routing; the trace holds only expert counts "
                "(the loads table): load, EP placement and simulate --eplb work on it"
            )
        total = self.decisions()
        predicate, decisions, sequences = "true", total, 0
        if self.layers:
            seqs = self.sequences()
            if budget <= 0 or total <= budget:
                sequences = int(self.run(f"SELECT count(*) AS s FROM {seqs}")["s"][0])
            else:
                predicate, decisions, sequences = self._choose(seqs, budget)
        source = f"(SELECT * FROM {self.sources()['routing']} AS r WHERE {predicate})"
        table = source
        if materialize:
            table = self.materialize(
                f"sample_{zlib.crc32(predicate.encode())}",
                f"SELECT rank, step, sequence, position, token_id, layer, k, expert FROM {source} AS s",
            )
        return Sample(
            table=table,
            predicate=predicate,
            fraction=decisions / total if total else 1.0,
            decisions=decisions,
            sequences=sequences,
            budget=budget,
        )

    def _choose(self, seqs: str, budget: int) -> tuple[str, int, int]:
        """Evenly spaced runs of consecutive sequences (in (rank, sequence) order) worth ``budget`` decisions.

        Runs rather than scattered sequences: a range predicate lets the Parquet scan skip whole row groups
        (a capture writes a sequence's tokens close together) and costs two comparisons a row, where a long IN
        list is a hash probe for each of 100 M rows. Spreading the runs over the trace samples its whole
        duration, not its beginning.
        """
        got = self.run(f"SELECT rank, sequence, n FROM {seqs} ORDER BY rank, sequence")
        ranks, ids, sizes = got["rank"], got["sequence"], got["n"].astype(np.float64)
        cum = np.cumsum(sizes)
        # no more runs than sequences that fit, so that "at least one sequence a run" stays within budget
        runs = max(1, min(_SAMPLE_RUNS, int(budget * len(sizes) // cum[-1])))
        per_run = budget / runs
        keep = np.zeros(len(ids), dtype=bool)
        for stripe in range(runs):
            start = (stripe + 0.5) * cum[-1] / runs - per_run / 2
            first = min(int(np.searchsorted(cum, start, side="right")), len(cum) - 1)
            before = cum[first - 1] if first else 0.0
            last = int(np.searchsorted(cum, before + per_run, side="right")) - 1
            keep[first : max(first, last) + 1] = True
        parts: list[str] = []
        index = np.flatnonzero(keep)
        # consecutive kept positions of one rank form one run
        breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(ranks[index]) != 0)) + 1
        for run in np.split(index, breaks):
            if len(run):
                a, b = run[0], run[-1]
                parts.append(f"(rank = {int(ranks[a])} AND sequence BETWEEN {int(ids[a])} AND {int(ids[b])})")
        predicate = "(" + " OR ".join(parts) + ")" if parts else "false"
        return predicate, int(sizes[keep].sum()), int(keep.sum())

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
