"""Layer: one layer in depth: load per expert, load over time, latency, co-activation and the router bias."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...analysis import coactivation, sampling, stats
from ...analysis import load as load_mod
from ...analysis.filters import Filters
from ...analysis.latency import Quantiles
from ...analysis.session import Trace

TIME_WINDOWS = 48
# Co-activation joins the routing with itself; a sample of whole sequences keeps it interactive on big traces.
COACTIVATION_SAMPLE = 400_000


@dataclass(frozen=True)
class Timing:
    n: int
    p50: float
    p99: float


@dataclass(frozen=True)
class LayerDetail:
    layer: int
    name: str
    experts: int
    top_k: int
    scoring: str
    counts: np.ndarray
    maxvio: float
    cv: float
    dead: tuple[int, ...]
    random_maxvio: float  # the same tokens routed at random (the report's baseline)
    random_cv: float
    over_time: np.ndarray  # experts x windows: utilisation within each window of steps
    window_steps: int
    first_step: int | None
    last_step: int | None
    router: Timing | None
    block: Timing | None
    clock: str
    coactivation: np.ndarray | None  # E x E, P(j | i)
    coactivation_random: float
    bias: np.ndarray | None
    bias_step: int | None
    counts_only: bool = False  # a counts trace: loads per step only, no per-token co-activation

    @property
    def utilisation(self) -> np.ndarray:
        total = float(self.counts.sum())
        return self.counts * self.experts / total if total > 0 else np.full(self.experts, math.nan)


def _timing(q: Quantiles) -> Timing | None:
    n = int(q.n)
    if not n:
        return None
    return Timing(n, float(q.p50), float(q.p99))


def layer_detail(trace: Trace, index: int) -> LayerDetail:
    meta = next(m for m in trace.layers if int(m["index"]) == index)
    experts, top_k = int(meta["num_experts"]), int(meta["top_k"])
    ctx = trace.context(Filters(layers=(index,)))
    routing = ctx.sources()["routing"]  # valid rows only (see Context.valid_routing)

    counts_only = ctx.mode == "counts"
    # A counts trace has per-step expert loads (the loads table), not one row per routing choice.
    table, n = ("loads", "sum(tokens)") if counts_only else (routing, "count(*)")
    got = ctx.run(f"SELECT expert, {n} AS n FROM {table} WHERE layer = {index} GROUP BY ALL")
    counts = np.zeros(experts, np.int64)
    ok = got["expert"] < experts
    counts[got["expert"][ok].astype(np.int64)] = got["n"][ok]

    span = ctx.run(f"SELECT min(step) AS lo, max(step) AS hi FROM {table} WHERE layer = {index}")
    lo, hi = float(span["lo"][0]), float(span["hi"][0])
    over_time = np.zeros((experts, 0))
    size, first, last = 1, None, None
    if not math.isnan(lo):
        first, last = int(lo), int(hi)
        size = max(1, math.ceil((int(hi) - first + 1) / TIME_WINDOWS))
        win = ctx.run(
            f"SELECT (step - {first}) // {size} AS win, expert, {n} AS n FROM {table} "
            f"WHERE layer = {index} GROUP BY ALL"
        )
        n_win = int(win["win"].max()) + 1 if len(win["win"]) else 0
        grid = np.zeros((experts, n_win))
        keep = win["expert"] < experts
        grid[win["expert"][keep].astype(np.int64), win["win"][keep].astype(np.int64)] = win["n"][keep]
        totals = grid.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            over_time = np.where(totals > 0, grid * experts / totals, np.nan)

    router = block = None
    clock = ""
    latency = trace.latency_summary(Filters(layers=(index,)))
    if latency.layers:
        item = latency.layer(index)
        router, block = _timing(item.router), _timing(item.block)
        clock = ",".join(latency.clocks)

    matrix = None
    random = stats.coactivation_baseline(experts, top_k)
    baseline = load_mod.random_baseline(experts, top_k, int(counts.sum()) // top_k, top_k)
    if counts.sum() and not counts_only:  # co-activation needs the choices of each token
        co = coactivation.compute(ctx, sampling.sample(ctx, COACTIVATION_SAMPLE))
        if co:
            matrix = co[0].matrix

    bias = bias_step = None
    got = ctx.run(f"SELECT step, bias FROM bias WHERE layer = {index} ORDER BY step DESC, rank LIMIT 1")
    if len(got.get("step", [])):
        bias_step = int(got["step"][0])
        bias = np.asarray(got["bias"][0], dtype=np.float64)

    return LayerDetail(
        layer=index,
        name=str(meta.get("name", index)),
        experts=experts,
        top_k=top_k,
        scoring=str(meta.get("scoring", "")),
        counts=counts,
        maxvio=stats.maxvio(counts),
        cv=stats.cv(counts),
        dead=tuple(int(e) for e in np.flatnonzero(counts == 0)) if counts.sum() else (),
        random_maxvio=baseline.maxvio,
        random_cv=baseline.cv,
        over_time=over_time,
        window_steps=size,
        first_step=first,
        last_step=last,
        router=router,
        block=block,
        clock=clock,
        coactivation=matrix,
        coactivation_random=random,
        bias=bias,
        bias_step=bias_step,
        counts_only=counts_only,
    )
