"""Load per expert-parallel rank for a placement of experts on ranks, and its balancedness.

Balancedness is mean load / max load over EP ranks, per layer (docs/metrics.md). Two systems aggregate it over
layers differently and both are reported: SGLang averages the per-layer ratios, vLLM divides the sums
(sum_l mean_l / sum_l max_l), which weights busy layers more. Each comes in a whole-window form (the loads over
all kept steps, what a static rebalancer such as EPLB sees) and a per-step form (the mean over steps of each
step's ratio: what the all-to-all of every forward call waits on).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import stats
from .context import Context, render_sql, sql_text
from .load import Load, aggregate


@dataclass(frozen=True)
class EPLayer:
    layer: int
    loads: np.ndarray  # assignments per EP rank over the whole window
    balancedness: float
    balancedness_batch: float
    random: float  # whole-window balancedness of random routing of the same tokens


@dataclass(frozen=True)
class EPLoad:
    ep_size: int
    placement: str  # "contiguous" or "custom"
    layers: list[EPLayer]
    sglang: float
    vllm: float
    sglang_batch: float
    vllm_batch: float
    random_sglang: float

    def layer(self, index: int) -> EPLayer:
        return next(item for item in self.layers if item.layer == index)

    def _repr_html_(self) -> str:  # Jupyter
        from .display import ep_load_html

        return ep_load_html(self)


@lru_cache(maxsize=256)
def _random(experts: int, k: int, tokens: int, placement: tuple[int, ...], ep_size: int) -> float:
    return stats.random_balancedness(experts, k, tokens, np.asarray(placement), ep_size)


def _placement_of(ctx: Context, ep_size: int, placement: Sequence[int] | None) -> tuple[str, dict[int, np.ndarray], str]:
    """(name, expert -> rank per layer, the same as a SQL expression over columns a.expert and m.experts)."""
    if placement is None:
        per_layer = {i: stats.contiguous_placement(ctx.experts(i), ep_size) for i in ctx.layers}
        return "contiguous", per_layer, f"(a.expert * {int(ep_size)}) // m.experts"
    mapping = np.asarray([int(x) for x in placement], dtype=np.int64)
    for i in ctx.layers:
        if len(mapping) != ctx.experts(i):
            raise ValueError(f"placement has {len(mapping)} entries but layer {i} has {ctx.experts(i)} experts")
    if mapping.min(initial=0) < 0 or mapping.max(initial=0) >= ep_size:
        raise ValueError(f"placement ranks must be in 0..{ep_size - 1}")
    literal = "[" + ", ".join(str(int(x)) for x in mapping) + "]"
    return "custom", {i: mapping for i in ctx.layers}, f"{literal}[a.expert + 1]"


def compute(ctx: Context, load: Load, *, ep_size: int = 8, placement: Sequence[int] | None = None) -> EPLoad:
    """Per-EP-rank load of every layer in ``load``; ``placement[e]`` is expert e's rank (default contiguous)."""
    if ep_size < 1:
        raise ValueError("ep_size must be at least 1")
    name, mapping, expr = _placement_of(ctx, ep_size, placement)
    sql = render_sql(
        sql_text("ep_steps"),
        {"agg": aggregate(ctx), "meta": ctx.meta_sql(), "ep_of_expert": expr, "ep_size": str(int(ep_size))},
    )
    per_step = ctx.materialize(f"ep_{name}_{ep_size}_{zlib.crc32(expr.encode())}", sql)
    batch = ctx.run(f"SELECT layer, avg(mean / top) AS b FROM {per_step} GROUP BY layer")
    batch_of = {int(layer): float(b) for layer, b in zip(batch["layer"], batch["b"], strict=True)}
    overall = ctx.run(
        f"SELECT avg(s) AS sglang, avg(v) AS vllm FROM ("
        f"SELECT step, avg(mean / top) AS s, sum(mean) / sum(top) AS v FROM {per_step} GROUP BY step)"
    )

    layers: list[EPLayer] = []
    for item in load.layers:
        where = mapping[item.layer]
        loads = stats.ep_loads(item.counts, where, ep_size)
        layers.append(
            EPLayer(
                layer=item.layer,
                loads=loads,
                balancedness=stats.balancedness(loads),
                balancedness_batch=batch_of.get(item.layer, math.nan),
                random=_random(item.experts, item.top_k, item.tokens, tuple(int(x) for x in where), ep_size),
            )
        )
    means = np.array([ep.loads.mean() for ep in layers])
    tops = np.array([ep.loads.max() for ep in layers])
    ratios = [ep.balancedness for ep in layers]
    return EPLoad(
        ep_size=ep_size,
        placement=name,
        layers=layers,
        sglang=float(np.nanmean(ratios)) if layers else math.nan,
        vllm=float(means.sum() / tops.sum()) if layers and tops.sum() > 0 else math.nan,
        sglang_batch=_scalar(overall, "sglang"),
        vllm_batch=_scalar(overall, "vllm"),
        random_sglang=float(np.nanmean([ep.random for ep in layers])) if layers else math.nan,
    )


def _scalar(columns: dict[str, np.ndarray], key: str) -> float:
    values = columns.get(key)
    return float(values[0]) if values is not None and len(values) else math.nan
