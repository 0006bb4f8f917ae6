"""A small hand-made trace with something for every chart: skewed load, 3 layers x 8 experts, top-2, 6 steps,
a two-value domain tag (plus a one-value tag, which gets no chart) and one latency row per (step, layer) whose
block time follows the step's busiest expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace

LAYERS, EXPERTS, TOP_K, STEPS, TOKENS_PER_STEP = 3, 8, 2, 6, 40


def build(path: Path, *, skew: float = 2.0, seed: int = 0, domain_values: tuple[str, str] = ("code", "math")) -> Path:
    rng = np.random.default_rng(seed)
    tokens = STEPS * TOKENS_PER_STEP
    step = np.repeat(np.arange(STEPS), TOKENS_PER_STEP)
    sequence = np.tile(np.repeat([0, 1], TOKENS_PER_STEP // 2), STEPS)
    position = np.tile(np.arange(TOKENS_PER_STEP // 2), 2 * STEPS) + step * (TOKENS_PER_STEP // 2)
    routing, latency_rows = [], []
    for layer in range(LAYERS):
        popularity = np.exp(-skew * np.arange(EXPERTS) / EXPERTS)[rng.permutation(EXPERTS)]
        scores = np.log(popularity) + rng.gumbel(size=(tokens, EXPERTS))
        scores[sequence == 1, layer] += 2.0  # domain "math" prefers one expert per layer
        experts = np.argsort(-scores, axis=1)[:, :TOP_K]
        routing.append(routing_table(experts, step=step, sequence=sequence, position=position, layer=layer,
                                     token_id=rng.integers(0, 50, tokens),
                                     phase=["prefill" if s == 0 else "decode" for s in step]))
        for s in range(STEPS):
            busiest = np.bincount(experts[step == s].reshape(-1), minlength=EXPERTS).max()
            latency_rows.append((s, layer, 0.05 + 0.001 * s, 0.2 + 0.01 * busiest))
    s, layer, router_ms, block_ms = (list(col) for col in zip(*latency_rows, strict=True))
    latency = pa.table({"step": s, "layer": layer, "router_ms": router_ms, "block_ms": block_ms,
                        "clock": ["perf_counter"] * len(s)}, schema=TABLES["latency"])
    tags = pa.table({"sequence": [0, 1, 0, 1], "key": ["domain", "domain", "run", "run"],
                     "value": [*domain_values, "one", "one"]}, schema=TABLES["tags"])
    return write_trace(path, {"routing": routing, "tags": tags, "latency": latency},
                       layers=layer_meta(LAYERS, EXPERTS, TOP_K))
