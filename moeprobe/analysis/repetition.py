"""Consecutive-token repetition (Mixtral §5, Table 5): how often token t+1 of a sequence goes to the same
expert(s) as token t in the same layer, beside what random routing gives (1/E and 1 - C(E-k, k)/C(E, k)).

Runs on the sampled sequences (``Context.sample``): it joins the routing table with itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import stats
from .context import Context
from .sampling import Sample


@dataclass(frozen=True)
class RepetitionLayer:
    layer: int
    pairs: int  # consecutive token pairs seen
    first: float  # share of pairs with the same first choice
    any: float  # share of pairs sharing at least one expert
    random_first: float
    random_any: float


def compute(ctx: Context, sample: Sample) -> list[RepetitionLayer]:
    got = ctx.query("repetition", sample=sample.table)
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
