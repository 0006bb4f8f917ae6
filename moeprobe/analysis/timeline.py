"""Per-step series for pictures: MaxVio of every (step, layer) over time, and each latency row beside its step's
busiest-expert load (the points behind ``latency``'s r and slope).

The report JSON keeps only windows and fits; a chart of the steps themselves needs the rows. Both series are
bounded so that a long trace still gives a small page: over ``max_points`` (step, layer) rows, consecutive steps
are pooled into buckets (mean and max MaxVio per bucket, so a spike stays visible); over ``max_points`` latency
rows, a repeatable random sample is kept, and the result says how many it kept of how many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .context import Context
from .load import steps_load

DEFAULT_MAX_POINTS = 20_000


@dataclass(frozen=True)
class Timeline:
    # MaxVio over time, one entry per (bucket of steps, layer); bucket_steps = 1 means one step per bucket.
    layer: np.ndarray
    first_step: np.ndarray
    last_step: np.ndarray
    maxvio_mean: np.ndarray  # MaxVio_batch averaged over the bucket's steps
    maxvio_max: np.ndarray  # the bucket's worst step
    bucket_steps: int
    # Latency rows against the same (step, layer)'s busiest expert: one entry per latency row kept.
    lat_layer: np.ndarray
    lat_step: np.ndarray
    lat_top: np.ndarray  # assignments to the step's busiest expert in that layer
    lat_router_ms: np.ndarray
    lat_block_ms: np.ndarray
    latency_rows: int  # rows that could be joined; len(lat_step) of them were kept

    def to_json(self) -> dict[str, Any]:
        """JSON-ready columns (NaN becomes null), the form charts are built from."""

        def column(values: np.ndarray) -> list[Any]:
            if values.dtype.kind == "f":
                return [None if math.isnan(v) else round(float(v), 6) for v in values.tolist()]
            return [int(v) for v in values.tolist()]

        return {
            "bucket_steps": self.bucket_steps,
            "maxvio": {
                "layer": column(self.layer),
                "first_step": column(self.first_step),
                "last_step": column(self.last_step),
                "mean": column(self.maxvio_mean),
                "max": column(self.maxvio_max),
            },
            "latency": {
                "rows": self.latency_rows,
                "kept": len(self.lat_step),
                "layer": column(self.lat_layer),
                "step": column(self.lat_step),
                "top": column(self.lat_top),
                "router_ms": column(self.lat_router_ms),
                "block_ms": column(self.lat_block_ms),
            },
        }


def compute(ctx: Context, *, max_points: int = DEFAULT_MAX_POINTS) -> Timeline:
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    sl = steps_load(ctx)
    shape = ctx.run(f"SELECT count(DISTINCT step) AS steps, count(DISTINCT layer) AS layers FROM {sl}")
    steps, layers = int(shape["steps"][0]), int(shape["layers"][0])
    # Buckets of consecutive recorded steps (by rank of step, so gaps in step numbers do not make empty buckets).
    # Each layer gets max_points // layers buckets (at least one), so the series has at most max_points rows
    # unless there are more layers than that.
    bucket = max(1, math.ceil(steps / max(1, max_points // max(1, layers))))
    mv = ctx.run(
        f"""
        WITH ranked AS (
            SELECT layer, step, maxvio, dense_rank() OVER (ORDER BY step) - 1 AS i FROM {sl}
        )
        SELECT layer, i // {bucket} AS b, min(step) AS first_step, max(step) AS last_step,
               avg(maxvio) AS mean, max(maxvio) AS max
        FROM ranked GROUP BY layer, b ORDER BY layer, b
        """
    )
    timed = ctx.materialize("latency", f"SELECT * FROM {ctx.filters.latency()} AS l")
    joined = f"""
        SELECT l.layer, l.step, s.top, l.router_ms, l.block_ms
        FROM {timed} AS l JOIN {sl} AS s ON s.step = l.step AND s.layer = l.layer
        WHERE l.block_ms IS NOT NULL
    """
    total = int(ctx.run(f"SELECT count(*) AS n FROM ({joined})")["n"][0])
    kept = joined if total <= max_points else f"SELECT * FROM ({joined}) USING SAMPLE reservoir({max_points} ROWS) REPEATABLE (0)"
    lat = ctx.run(f"SELECT * FROM ({kept}) ORDER BY layer, step")
    ints = np.int64
    return Timeline(
        layer=mv["layer"].astype(ints),
        first_step=mv["first_step"].astype(ints),
        last_step=mv["last_step"].astype(ints),
        maxvio_mean=mv["mean"].astype(np.float64),
        maxvio_max=mv["max"].astype(np.float64),
        bucket_steps=bucket,
        lat_layer=lat["layer"].astype(ints),
        lat_step=lat["step"].astype(ints),
        lat_top=lat["top"].astype(ints),
        lat_router_ms=lat["router_ms"].astype(np.float64),
        lat_block_ms=lat["block_ms"].astype(np.float64),
        latency_rows=total,
    )
