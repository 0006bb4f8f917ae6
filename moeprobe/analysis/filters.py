"""One set of filters (steps, phase, tags, layers, ranks) applied the same way by every analysis.

Filters become SQL predicates with the values written in as literals. That is safe because every value is
typed here (ints are ints, the phase is one of two words, tag strings are quoted with doubled quotes), and it
lets a filtered table be a plain subquery that DuckDB pushes down into the Parquet scan, with no parameters to
thread through nested queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..traces.errors import TraceError
from ..traces.constants import PHASES  # not schema: filters are used where pyarrow is not (the balancing lab)
from .quoting import sql_literal


class FilterError(TraceError, ValueError):
    """A filter does not fit the trace or cannot be parsed (bad step range, unknown layer, ...).

    A ValueError too, so that a parser shared with ``simulate`` (steps, layers) fits its ValueError handling."""


def parse_steps(text: str, flag: str = "--steps") -> tuple[int | None, int | None]:
    """``A:B`` (half-open, like a Python slice), ``A:`` or ``:B``; a single ``N`` means ``N:N+1``.

    The one step-range parser: report's and simulate's ``--steps`` and simulate's ``--eplb plan=/eval=``."""
    raw = text.strip()
    try:
        if ":" not in raw:
            single = int(raw)
            return single, single + 1
        left, right = raw.split(":", 1)
        start = int(left) if left.strip() else None
        stop = int(right) if right.strip() else None
    except ValueError:
        raise FilterError(f"{flag} {text!r}: expected A:B, A: or :B with whole numbers") from None
    if start is not None and stop is not None and stop <= start:
        raise FilterError(f"{flag} {text!r}: the range is empty (B must be greater than A; B is excluded)")
    return start, stop


def parse_indices(values: list[str], flag: str) -> tuple[int, ...] | None:
    """Repeated and comma-separated indices (``--layers 0,3 --layers 5``), sorted and unique; None when none
    were given, so that the filter keeps everything."""
    if not values:
        return None
    out: set[int] = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                out.add(int(part))
            except ValueError:
                raise FilterError(f"{flag} {value!r}: expected whole numbers separated by commas, like 0,3,5") from None
    if not out:
        raise FilterError(f"{flag}: no index given")
    return tuple(sorted(out))


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise FilterError(f"--tag {text!r}: expected key=value, e.g. domain=code")
    return key.strip(), value.strip()


@dataclass(frozen=True)
class Filters:
    """What part of a trace an analysis looks at. The default looks at everything.

    ``steps`` is half-open ``[start, stop)``; either end may be open. ``tags`` are ANDed: a sequence is kept
    when it carries every ``key=value`` given. Steps are numbered per rank (each rank's forward calls).
    """

    steps: tuple[int | None, int | None] | None = None
    phase: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    layers: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise FilterError(f"phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if self.layers is not None and not self.layers:
            raise FilterError("an empty layer list selects nothing; leave it out to keep every layer")

    @property
    def key(self) -> str:
        """A short stable name for caching per-filter intermediate tables."""
        import hashlib

        return hashlib.sha1(repr((self.steps, self.phase, self.tags, self.layers, self.ranks)).encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps) if self.steps else None,
            "phase": self.phase,
            "tags": {k: v for k, v in self.tags},
            "layers": list(self.layers) if self.layers is not None else None,
            "ranks": list(self.ranks) if self.ranks is not None else None,
        }

    # -- SQL --------------------------------------------------------------------------------------
    def _step_layer_rank(self, alias: str, *, layer: bool = True) -> list[str]:
        p = f"{alias}." if alias else ""
        out: list[str] = []
        if self.steps:
            start, stop = self.steps
            if start is not None:
                out.append(f"{p}step >= {int(start)}")
            if stop is not None:
                out.append(f"{p}step < {int(stop)}")
        if layer and self.layers is not None:
            out.append(f"{p}layer IN ({', '.join(str(int(x)) for x in self.layers)})")
        if self.ranks is not None:
            out.append(f"{p}rank IN ({', '.join(str(int(x)) for x in self.ranks)})")
        return out

    def _tagged(self, alias: str) -> list[str]:
        # One EXISTS per tag: a sequence must carry all of them. (rank, sequence) is the sequence key.
        return [
            f"EXISTS (SELECT 1 FROM tags t WHERE t.rank = {alias}.rank AND t.sequence = {alias}.sequence "
            f"AND t.key = {sql_literal(k)} AND t.value = {sql_literal(v)})"
            for k, v in self.tags
        ]

    def _phase_by_step(self, alias: str) -> list[str]:
        # Tables without a phase column take it from the steps table (one phase per forward call).
        if self.phase is None:
            return []
        return [
            f"EXISTS (SELECT 1 FROM steps st WHERE st.rank = {alias}.rank AND st.step = {alias}.step "
            f"AND st.phase = {sql_literal(self.phase)})"
        ]

    @staticmethod
    def _select(table: str, alias: str, where: list[str]) -> str:
        clause = " AND ".join(where) if where else "true"
        return f"(SELECT {alias}.* FROM {table} {alias} WHERE {clause})"

    def routing(self) -> str:
        """The filtered routing table, as a parenthesised subquery."""
        where = self._step_layer_rank("r")
        if self.phase is not None:
            where.append(f"r.phase = {sql_literal(self.phase)}")
        return self._select("routing", "r", where + self._tagged("r"))

    def loads(self) -> str:
        """The filtered loads table (counts traces). It has no sequences, so tags cannot apply (see ``check``)."""
        where = self._step_layer_rank("l")
        if self.phase is not None:
            where.append(f"l.phase = {sql_literal(self.phase)}")
        return self._select("loads", "l", where)

    def scores(self) -> str:
        where = self._step_layer_rank("s") + self._phase_by_step("s") + self._tagged("s")
        return self._select("scores", "s", where)

    def steps_table(self) -> str:
        """Steps kept by the step range, phase and rank (tags are applied where latency is, see ``latency``)."""
        where = self._step_layer_rank("st0", layer=False)
        if self.phase is not None:
            where.append(f"st0.phase = {sql_literal(self.phase)}")
        return self._select("steps", "st0", where)

    def latency(self) -> str:
        """Latency rows of the kept steps and layers.

        A step's timing covers every sequence in its batch, so a tag filter keeps only the steps whose routed
        tokens all belong to sequences that carry the tags; a mixed batch cannot be attributed.
        """
        where = self._step_layer_rank("l") + self._phase_by_step("l")
        if self.tags:
            conds = " AND ".join(
                f"EXISTS (SELECT 1 FROM tags t WHERE t.rank = r.rank AND t.sequence = r.sequence "
                f"AND t.key = {sql_literal(k)} AND t.value = {sql_literal(v)})"
                for k, v in self.tags
            )
            where.append(
                "(l.rank, l.step) IN (SELECT r.rank, r.step FROM routing r GROUP BY r.rank, r.step "
                f"HAVING bool_and({conds}))"
            )
        return self._select("latency", "l", where)

    # -- checks against the trace -------------------------------------------------------------------
    def check(self, layer_indices: list[int], ranks: list[int], mode: str = "tokens") -> None:
        """Raise ``FilterError`` for a layer or rank the trace does not have (a typo, not an empty result), or for
        a tag filter on a counts trace (its loads have no sequences to carry tags)."""
        if self.tags and mode == "counts":
            raise FilterError("tag filters need per-token routing; this trace holds only expert counts (the loads table)")
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(layer_indices))
            if missing:
                have = _ranges(layer_indices)
                raise FilterError(f"layer {', '.join(map(str, missing))} is not in this trace (layers: {have})")
        if self.ranks is not None and ranks:
            missing = sorted(set(self.ranks) - set(ranks))
            if missing:
                raise FilterError(f"rank {', '.join(map(str, missing))} is not in this trace (ranks: {_ranges(ranks)})")


def _ranges(values: list[int]) -> str:
    """0..3, 7 style listing of sorted integers."""
    values = sorted(set(values))
    if not values:
        return "none"
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
