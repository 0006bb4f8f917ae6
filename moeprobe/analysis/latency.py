"""Router and MoE block time per layer (p50, p90, p99, max), prefill vs decode, and how block time follows the
step's busiest expert. Timings are whatever clock the capture used (``cuda_event`` or ``perf_counter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .context import Context
from .load import steps_load


@dataclass(frozen=True)
class Quantiles:
    n: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass
class LatencyLayer:
    layer: int
    router: Quantiles
    block: Quantiles
    by_phase: dict[str, tuple[Quantiles, Quantiles]] = field(default_factory=dict)  # phase -> (router, block)
    load_r: float = math.nan  # Pearson r of block_ms with the step's max expert load
    load_slope_ms: float = math.nan  # ms per extra assignment on the busiest expert
    load_n: int = 0
    load_by_phase: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # phase -> (r, slope_ms, n)


@dataclass(frozen=True)
class Latency:
    layers: list[LatencyLayer]
    clocks: list[str]
    steps: int
    moe_ms_per_step: Quantiles  # sum of block time over layers, per forward call
    router_ms_per_step_p50: float

    def layer(self, index: int) -> LatencyLayer:
        return next(item for item in self.layers if item.layer == index)

    def _repr_html_(self) -> str:  # Jupyter
        from .display import latency_html

        return latency_html(self)


def _quantiles(cols: dict[str, np.ndarray], prefix: str, i: int) -> Quantiles:
    def get(name: str) -> float:
        return float(cols[f"{prefix}_{name}"][i])

    return Quantiles(int(cols[f"{prefix}_n"][i]), get("p50"), get("p90"), get("p99"), get("max"))


def compute(ctx: Context) -> Latency:
    # The filtered latency rows are small but the tag filter behind them scans routing: do it once.
    timed = ctx.materialize("latency", f"SELECT * FROM {ctx.filters.latency()} AS l")
    got = ctx.query("latency_layers", latency=timed)
    layers: dict[int, LatencyLayer] = {}
    for i in range(len(got["layer"])):
        index = int(got["layer"][i])
        if index not in ctx.layers:
            continue
        router, block = _quantiles(got, "router", i), _quantiles(got, "block", i)
        if int(got["all_phases"][i]):
            layers[index] = LatencyLayer(index, router, block)
        else:
            layers[index].by_phase[str(got["phase"][i])] = (router, block)
    if layers:
        fit = ctx.query("latency_load", latency=timed, steps_load=steps_load(ctx))
        for index, phase, whole, n, r, slope in zip(fit["layer"], fit["phase"], fit["all_phases"], fit["n"], fit["r"], fit["slope"], strict=True):
            if int(index) in layers:
                item = layers[int(index)]
                if int(whole):
                    item.load_r, item.load_slope_ms, item.load_n = float(r), float(slope), int(n)
                else:
                    item.load_by_phase[str(phase)] = (float(r), float(slope), int(n))
    per_step = ctx.query("latency_steps", latency=timed)
    clocks = str(per_step["clocks"][0] or "") if len(per_step["clocks"]) else ""
    return Latency(
        layers=[layers[i] for i in sorted(layers)],
        clocks=[c for c in clocks.split(",") if c],
        steps=int(per_step["steps"][0]) if len(per_step["steps"]) else 0,
        moe_ms_per_step=Quantiles(
            int(per_step["steps"][0]) if len(per_step["steps"]) else 0,
            *(float(per_step[f"moe_{q}"][0]) if len(per_step["steps"]) else math.nan for q in ("p50", "p90", "p99", "max")),
        ),
        router_ms_per_step_p50=float(per_step["router_p50"][0]) if len(per_step["steps"]) else math.nan,
    )
