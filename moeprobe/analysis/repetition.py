"""Consecutive-token repetition (Mixtral §5, Table 5): how often token t+1 of a sequence goes to the same
expert(s) as token t in the same layer, beside what random routing gives (1/E and 1 - C(E-k, k)/C(E, k)).

Runs on the sampled sequences (``Context.sample``): it joins the routing table with itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import choices as choices_mod
from . import stats
from .context import Context
from .sampling import Sample, copied


@dataclass(frozen=True)
class RepetitionLayer:
    layer: int
    pairs: int  # consecutive token pairs seen
    first: float  # share of pairs with the same first choice
    any: float  # share of pairs sharing at least one expert
    random_first: float
    random_any: float


def compute(ctx: Context, sample: Sample) -> list[RepetitionLayer]:
    found = choices_mod.choices(ctx, sample)
    if found is not None and found.regular and found.positions_unique:
        got = ctx.run(_side_by_side_sql(found))
    else:
        got = ctx.query("repetition", sample=copied(ctx, sample).table)  # joined with itself: read from a copy
    out: list[RepetitionLayer] = []
    for layer, pairs, first, any_ in zip(got["layer"], got["pairs"], got["first_same"], got["any_same"], strict=True):
        index = int(layer)
        if index not in ctx.layers:
            continue
        base_first, base_any = stats.repetition_baselines(ctx.experts(index), ctx.top_k(index))
        n = int(pairs)
        out.append(
            RepetitionLayer(
                layer=index,
                pairs=n,
                first=float(first) / n if n else math.nan,
                any=float(any_) / n if n else math.nan,
                random_first=base_first,
                random_any=base_any,
            )
        )
    return out


def _side_by_side_sql(found: choices_mod.Choices) -> str:
    """repetition.sql over one row per token and layer (each choice rank at most once, each position in one
    step: checked): the pair of consecutive tokens is one joined row, "first" compares e0, "any" any e_i with
    any e_j. Same counts, and the same layers (those with a pair of first choices), as the row-level join."""
    cols = found.columns()
    both_first = "a.e0 IS NOT NULL AND b.e0 IS NOT NULL"
    shared = " OR ".join(f"a.{x} = b.{y}" for x in cols for y in cols)
    return (
        f"SELECT a.layer, count_if({both_first}) AS pairs, count_if(a.e0 = b.e0) AS first_same, "
        f"count_if({shared}) AS any_same "
        f"FROM {found.table} AS a JOIN {found.table} AS b "
        "ON b.rank = a.rank AND b.sequence = a.sequence AND b.layer = a.layer AND b.position = a.position + 1 "
        f"GROUP BY a.layer HAVING count_if({both_first}) > 0 ORDER BY a.layer"
    )
