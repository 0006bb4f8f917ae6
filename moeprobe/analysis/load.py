"""Expert load and its imbalance, per layer: counts, utilisation, MaxVio (global and per batch), CV, normalised
entropy, Gini, top-N coverage, dead experts, and the same over windows of steps.

Two loads: *routed* (every choice the router made, what it asked of each expert; the default everywhere) and
*processed* (dropped choices, over capacity, excluded: what the experts actually computed). They differ only
on traces with drops (Switch Transformers, ``simulate -s capacity:... -o``).

One aggregate pass over the routing table (``sql/load_agg.sql``, per step x layer x expert) feeds all of
it; the per-expert vectors that come back are small (layers x experts) and finished with ``stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import stats, stored
from .context import Context, render_sql, sql_text


@dataclass(frozen=True)
class Window:
    index: int
    first_step: int
    last_step: int
    maxvio_global: float
    maxvio_batch: float
    cv: float
    random_maxvio_global: float = math.nan  # the same tokens routed uniformly at random
    random_cv: float = math.nan


@dataclass
class LayerLoad:
    layer: int
    name: str
    experts: int
    top_k: int
    counts: np.ndarray  # per expert, every choice rank
    first: np.ndarray | None  # per expert, first choices only (k = 0); computed when asked for
    decisions: int
    tokens: int
    dropped: int
    dropped_counts: np.ndarray  # per expert, choices dropped over capacity
    steps: int
    maxvio_global: float
    maxvio_batch_mean: float
    maxvio_batch_worst: float
    worst_step: int | None
    cv: float
    entropy_norm: float
    gini: float
    top_n: int
    top_n_coverage: float
    dead: list[int]
    random: stats.LoadBaseline
    random_maxvio_batch: float
    windows: list[Window] = field(default_factory=list)

    @property
    def processed(self) -> np.ndarray:
        """Per expert, the choices it computed: routed minus dropped."""
        return np.asarray(self.counts - self.dropped_counts)

    @property
    def maxvio_processed(self) -> float:
        return stats.maxvio(self.processed)

    @property
    def cv_processed(self) -> float:
        return stats.cv(self.processed)

    @property
    def utilisation(self) -> np.ndarray:
        """c_e / c_bar per expert, c_bar = T k / E: 1 is a fair share."""
        mean = self.decisions / self.experts
        return self.counts / mean if mean > 0 else np.full(self.experts, math.nan)


@dataclass
class Load:
    layers: list[LayerLoad]
    decisions: int
    first_step: int | None
    last_step: int | None
    window_steps: int

    def layer(self, index: int) -> LayerLoad:
        return next(item for item in self.layers if item.layer == index)

    def _repr_html_(self) -> str:  # Jupyter: the heat map and the per-layer table
        from .display import load_html

        return load_html(self)


def aggregate(ctx: Context) -> str:
    """The per (step, layer, expert) load table for these filters, created once and reused.

    A counts trace has no routing rows; its ``loads`` table holds the same aggregate, so every load metric
    (MaxVio, windows, EP placement) reads from there unchanged.
    """
    if ctx.mode == "tokens" and ctx.contract_unchecked() and not ctx.has_table("load") and not ctx.contract_checked_per_token():
        return _aggregate_checking_contract(ctx)
    return ctx.materialize("load", aggregate_sql(ctx))


def _aggregate_checking_contract(ctx: Context) -> str:
    """The load aggregate and the contract check in one pass over the routing (they were two, the check a third
    of a 100 M-decision report): per (step, layer, expert) every row and the invalid ones, so the load is their
    difference (groups of invalid rows only drop out) and the snapshot's invalid count their sum. The same table
    as ``aggregate_sql`` over the valid rows."""
    routing = ctx.filters.routing()
    counted = ctx.materialize(
        "load_checked",
        f"SELECT step, layer, expert, count(*)::BIGINT AS n, count_if(NOT {ctx.valid_routing('r')})::BIGINT AS invalid "
        f"FROM {routing} AS r GROUP BY ALL",
    )
    ctx.seed_invalid_total(int(ctx.run(f"SELECT coalesce(sum(invalid), 0)::BIGINT AS n FROM {counted}")["n"][0]))
    return ctx.materialize("load", f"SELECT step, layer, expert, (n - invalid)::BIGINT AS n FROM {counted} WHERE n > invalid")


def aggregate_sql(ctx: Context) -> str:
    """The SQL behind ``aggregate``: a sum of counts per (step, layer, expert), so that the same query over each
    shard, summed per key, gives the same table (moeprobe.distributed computes it where the shards are)."""
    name = "load_agg_counts" if ctx.mode == "counts" else "load_agg"
    return render_sql(sql_text(name), ctx.sources())


def steps_load(ctx: Context) -> str:
    """Per (step, layer): busiest expert, total, tokens and MaxVio_batch; created once and reused."""
    sql = render_sql(sql_text("load_steps"), {"agg": aggregate(ctx), "meta": ctx.meta_sql()})
    return ctx.materialize("steps_load", sql)


@lru_cache(maxsize=256)
def random_baseline(experts: int, k: int, tokens: int, top_n: int) -> stats.LoadBaseline:
    return stats.random_load_baseline(experts, k, tokens, top_n)


@lru_cache(maxsize=256)
def _batch_baseline(experts: int, k: int, sizes: tuple[int, ...], counts: tuple[int, ...]) -> float:
    return stats.random_maxvio_batch(experts, k, np.asarray(sizes), np.asarray(counts))


def _per_expert(cols: dict[str, np.ndarray], experts: int) -> np.ndarray:
    counts = np.zeros(experts, np.int64)
    # Context.valid_routing already leaves such rows out; never index out of range (or from the end) regardless.
    valid = (cols["expert"] >= 0) & (cols["expert"] < experts)
    counts[cols["expert"][valid].astype(np.int64)] = cols["n"][valid]
    return counts


def _by_layer(columns: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    layers = columns.get("layer", np.empty(0))
    out: dict[int, dict[str, np.ndarray]] = {}
    for value in np.unique(layers):
        sel = layers == value
        out[int(value)] = {key: col[sel] for key, col in columns.items()}
    return out


def compute(
    ctx: Context,
    *,
    top_n: int | None = None,
    window_steps: int | None = None,
    windows: int = 10,
    first_choice: bool = False,
) -> Load:
    """Load metrics for every kept layer that has routing decisions.

    ``top_n`` defaults to each layer's top-k (the share the k busiest experts take); ``window_steps`` defaults to
    the span of kept steps split in ``windows``; ``first_choice`` also counts first choices per expert (one
    more pass over the routing table).
    """
    agg = aggregate(ctx)
    experts = ctx.query("load_experts", agg=agg)
    # Most traces drop nothing: one look at the stored rows' flags then spares the pass over every decision.
    dropped_by_layer = {} if stored.has_no_drops(ctx) else _by_layer(ctx.query("load_dropped"))
    firsts: dict[int, dict[str, np.ndarray]] = {}
    if first_choice:  # on format 2 where the stored rows stand for the routing: one column of K, no view
        first_choices = stored.first_choices_sql(ctx, "true")
        firsts = _by_layer(ctx.query("load_first", **({"routing": first_choices} if first_choices else {})))
    sl = steps_load(ctx)
    batch = _by_layer(ctx.query("load_batch", steps_load=sl))
    sizes = _by_layer(ctx.query("load_sizes", steps_load=sl))
    span = ctx.run(f"SELECT min(step) AS lo, max(step) AS hi FROM {agg}")
    lo, hi = span["lo"][0], span["hi"][0]
    first_step = None if np.isnan(float(lo)) else int(lo)
    last_step = None if np.isnan(float(hi)) else int(hi)
    if window_steps is None:
        span_steps = 0 if first_step is None or last_step is None else last_step - first_step + 1
        window_steps = max(1, math.ceil(span_steps / max(1, windows)))
    per_window = _windows(ctx, agg, sl, first_step, window_steps)

    layers: list[LayerLoad] = []
    for index, cols in _by_layer(experts).items():
        if index not in ctx.layers:
            continue
        E, k = ctx.experts(index), ctx.top_k(index)
        counts = _per_expert(cols, E)
        drops = dropped_by_layer.get(index)
        dropped_counts = _per_expert({"expert": drops["expert"], "n": drops["dropped"]}, E) if drops else np.zeros(E, np.int64)
        first = _per_expert(firsts[index], E) if index in firsts else (np.zeros(E, np.int64) if first_choice else None)
        decisions = int(counts.sum())
        n = top_n if top_n is not None else k
        b = batch.get(index, {})
        size = sizes.get(index, {})
        tokens = decisions // k
        worst_step = b.get("worst_step", np.array([np.nan]))[0]
        layers.append(
            LayerLoad(
                layer=index,
                name=str(ctx.layers[index].get("name", index)),
                experts=E,
                top_k=k,
                counts=counts,
                first=first,
                decisions=decisions,
                tokens=tokens,
                dropped=int(dropped_counts.sum()),
                dropped_counts=dropped_counts,
                steps=int(b.get("steps", np.array([0]))[0]),
                maxvio_global=stats.maxvio(counts),
                maxvio_batch_mean=float(b.get("mean", np.array([np.nan]))[0]),
                maxvio_batch_worst=float(b.get("worst", np.array([np.nan]))[0]),
                worst_step=None if np.isnan(float(worst_step)) else int(worst_step),
                cv=stats.cv(counts),
                entropy_norm=stats.entropy_norm(counts),
                gini=stats.gini(counts),
                top_n=n,
                top_n_coverage=stats.top_n_coverage(counts, n),
                dead=[int(e) for e in np.flatnonzero(counts == 0)],
                random=random_baseline(E, k, tokens, n),
                random_maxvio_batch=_batch_baseline(
                    E, k, tuple(int(t) for t in size.get("tokens", [])), tuple(int(c) for c in size.get("steps", []))
                ),
                windows=per_window.get(index, []),
            )
        )
    return Load(
        layers=layers,
        decisions=sum(item.decisions for item in layers),
        first_step=first_step,
        last_step=last_step,
        window_steps=window_steps,
    )


def _windows(ctx: Context, agg: str, sl: str, start: int | None, size: int) -> dict[int, list[Window]]:
    if start is None:
        return {}
    extra = {"agg": agg, "steps_load": sl, "start": str(start), "size": str(size)}
    loads = ctx.query("load_windows", **extra)
    batch = ctx.query("load_windows_batch", **extra)
    if not len(batch["win"]):
        return {}
    # One dense (window, layer, expert) array, so that each window's metrics are a slice, not a search.
    layer_ids = np.array(sorted(ctx.layers))
    slot = {int(layer): i for i, layer in enumerate(layer_ids)}
    width = max(ctx.experts(int(layer)) for layer in layer_ids)
    dense = np.zeros((int(batch["win"].max()) + 1, len(layer_ids), width))
    keep = np.isin(loads["layer"], layer_ids) & (loads["expert"] < width)
    rows = np.searchsorted(layer_ids, loads["layer"][keep])
    dense[loads["win"][keep].astype(np.int64), rows, loads["expert"][keep].astype(np.int64)] = loads["n"][keep]
    out: dict[int, list[Window]] = {}
    for i in range(len(batch["win"])):
        layer, win = int(batch["layer"][i]), int(batch["win"][i])
        if layer not in slot:
            continue
        counts = dense[win, slot[layer], : ctx.experts(layer)]
        k = ctx.top_k(layer)
        baseline = random_baseline(ctx.experts(layer), k, int(counts.sum()) // k, k)
        out.setdefault(layer, []).append(
            Window(
                index=win,
                first_step=int(batch["first_step"][i]),
                last_step=int(batch["last_step"][i]),
                maxvio_global=stats.maxvio(counts),
                maxvio_batch=float(batch["maxvio_batch"][i]),
                cv=stats.cv(counts),
                random_maxvio_global=baseline.maxvio,
                random_cv=baseline.cv,
            )
        )
    return out
