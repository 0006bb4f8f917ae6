"""Overview: per layer utilisation, MaxVio, CV, dead experts and MaxVio of the most recent steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...analysis import load as load_mod
from ...analysis import stats
from ...analysis.session import Trace

RECENT_STEPS = 48


@dataclass(frozen=True)
class LayerRow:
    layer: int
    name: str
    experts: int
    top_k: int
    utilisation: np.ndarray  # c_e / c_bar per expert; 1 is a fair share
    maxvio: float  # MaxVio_global over the whole trace
    maxvio_batch: float  # mean over steps of MaxVio_batch
    cv: float
    dead: tuple[int, ...]
    tokens: int
    recent: tuple[float, ...]  # MaxVio_batch of the last RECENT_STEPS steps, oldest first
    random_maxvio: float = math.nan  # MaxVio_global of the same tokens routed at random (the report's baseline)


@dataclass(frozen=True)
class Overview:
    layers: tuple[LayerRow, ...]
    decisions: int
    first_step: int | None
    last_step: int | None
    complete: bool = True  # False for the first, quick pass: per-step columns are still being computed

    def worst_first(self) -> list[LayerRow]:
        """Layers by MaxVio_global, worst first; layers without data last."""
        return sorted(self.layers, key=lambda r: (math.isnan(r.maxvio), -r.maxvio if not math.isnan(r.maxvio) else 0, r.layer))


def recent_maxvio(trace: Trace, steps: int = RECENT_STEPS) -> dict[int, tuple[float, ...]]:
    """MaxVio_batch per layer over the last ``steps`` steps, from the per-step table ``Trace.load`` already built."""
    ctx = trace.context()
    table = load_mod.steps_load(ctx)
    got = ctx.run(
        f"SELECT layer, step, maxvio FROM {table} "
        f"WHERE step > (SELECT max(step) FROM {table}) - {int(steps)} ORDER BY layer, step"
    )
    out: dict[int, list[float]] = {}
    for layer, value in zip(got.get("layer", []), got.get("maxvio", []), strict=True):
        out.setdefault(int(layer), []).append(float(value))
    return {layer: tuple(values) for layer, values in out.items()}


def _empty_row(meta: dict[str, Any]) -> LayerRow:
    """A layer with no decisions yet (the job just started)."""
    experts = int(meta["num_experts"])
    return LayerRow(int(meta["index"]), str(meta.get("name", meta["index"])), experts, int(meta["top_k"]),
                    np.full(experts, math.nan), math.nan, math.nan, math.nan, (), 0, ())


def quick_overview(trace: Trace) -> Overview:
    """The heat map and the whole-trace columns from one GROUP BY: on screen well before ``overview`` finishes.

    The same formulas (``analysis.stats``) over the same counts as ``Trace.load``, so the numbers do not change
    when the full pass arrives; only MaxVio_batch and the sparklines are left for it.
    """
    ctx = trace.context()
    # A counts trace has its per-expert loads in the loads table instead of one row per routing choice; routing
    # rows are the valid ones only (see Context.valid_routing).
    source = "SELECT layer, expert, sum(tokens) AS n FROM loads GROUP BY ALL" if ctx.mode == "counts" else \
        f"SELECT layer, expert, count(*) AS n FROM {ctx.sources()['routing']} GROUP BY ALL"
    got = ctx.run(source)
    rows = []
    for meta in trace.layers:
        index, experts, top_k = int(meta["index"]), int(meta["num_experts"]), int(meta["top_k"])
        sel = (got["layer"] == index) & (got["expert"] < experts)
        if not sel.any():
            rows.append(_empty_row(meta))
            continue
        counts = np.zeros(experts, np.int64)
        counts[got["expert"][sel].astype(np.int64)] = got["n"][sel]
        decisions = int(counts.sum())
        rows.append(
            LayerRow(index, str(meta.get("name", index)), experts, top_k, counts * experts / decisions,
                     stats.maxvio(counts), math.nan, stats.cv(counts),
                     tuple(int(e) for e in np.flatnonzero(counts == 0)), decisions // top_k, (),
                     load_mod.random_baseline(experts, top_k, decisions // top_k, top_k).maxvio)
        )
    return Overview(tuple(rows), int(got["n"].sum()) if len(got.get("n", [])) else 0, None, None, complete=False)


def overview(trace: Trace) -> Overview:
    load = trace.load()
    recent = recent_maxvio(trace) if load.decisions else {}
    by_layer = {item.layer: item for item in load.layers}
    rows = []
    for meta in trace.layers:
        index = int(meta["index"])
        item = by_layer.get(index)
        experts, top_k = int(meta["num_experts"]), int(meta["top_k"])
        if item is None:
            rows.append(_empty_row(meta))
            continue
        rows.append(
            LayerRow(
                layer=index,
                name=item.name,
                experts=experts,
                top_k=top_k,
                utilisation=item.utilisation,
                maxvio=item.maxvio_global,
                maxvio_batch=item.maxvio_batch_mean,
                cv=item.cv,
                dead=tuple(item.dead),
                tokens=item.tokens,
                recent=recent.get(index, ()),
                random_maxvio=item.random.maxvio,
            )
        )
    return Overview(tuple(rows), load.decisions, load.first_step, load.last_step)
