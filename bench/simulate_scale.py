"""Scale check for the balancing lab (issue 6): DeepSeek-V3-sized EPLB and re-routing on this machine.

1. EPLB + per-GPU load: 58 MoE layers x 256 experts, a load of 10 M routing decisions (top-8, skewed,
   over 100 steps, 4 source ranks). Timed: counting the decisions into per-step loads, EPLB (hierarchical:
   288 slots, 8 groups, 4 nodes, 32 GPUs; and global: 3 nodes, 24 GPUs), per-GPU load and balancedness,
   and the whole ``evaluate_placement`` path the CLI runs (counting, plan, contiguous baseline, traffic).
2. Re-routing 1 M tokens x 256 experts from logits: DeepSeek-V3 sigmoid with bias and group-limited top-8,
   and softmax top-8; plus the online bias replay over 256 steps.
3. With ``--trace``: the same 10 M decisions written as a trace, then read back into numpy by ``replay``.

Run:  .venv/bin/python bench/simulate_scale.py [--trace] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moeprobe.simulate.bias import route_with_online_bias
from moeprobe.simulate.data import LayerData
from moeprobe.simulate.deployment import EplbOptions, evaluate_placement
from moeprobe.simulate.eplb import plan_eplb
from moeprobe.simulate.metrics import step_loads
from moeprobe.simulate.placement import balancedness, gpu_load
from moeprobe.simulate.routing import RouterConfig, reroute

LAYERS, EXPERTS, TOP_K, STEPS, RANKS = 58, 256, 8, 100, 4
DECISIONS = 10_000_000
REROUTE_TOKENS = 1_000_000


def timed(label: str, fn: Callable[[], Any], repeat: int, results: list[tuple[str, float]]) -> Any:
    """Best wall time of ``repeat`` runs, with the CPU time of that run (all threads): on a shared machine
    the CPU time says how much work it was, the wall time what a user waited."""
    best, cpu = float("inf"), 0.0
    value = None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        wall = time.perf_counter() - start
        if wall < best:
            best, cpu = wall, time.process_time() - start_cpu
    results.append((label, best))
    print(f"  {label:<62} {best:8.3f} s wall {cpu:8.3f} s cpu", flush=True)
    return value


def skewed_choices(rng: np.random.Generator, tokens: int) -> np.ndarray:
    """(LAYERS, tokens, TOP_K) distinct experts per token, drawn with a per-layer Zipf-like popularity."""
    out = np.empty((LAYERS, tokens, TOP_K), dtype=np.int32)
    for layer in range(LAYERS):
        popularity = rng.permutation(1.0 / np.arange(1, EXPERTS + 1) ** 0.8)
        # Gumbel top-k: k distinct experts per token, each chosen in proportion to its popularity.
        keys = np.log(popularity)[None, :] - np.log(-np.log(rng.random((tokens, EXPERTS))))
        out[layer] = np.argpartition(-keys, TOP_K - 1, axis=1)[:, :TOP_K]
    return out


def layer_data(choices: np.ndarray) -> list[LayerData]:
    tokens = choices.shape[1]
    step = np.repeat(np.arange(STEPS), -(-tokens // STEPS))[:tokens].astype(np.int64)
    rank = np.arange(tokens, dtype=np.int64) % RANKS
    sequence = np.arange(tokens, dtype=np.int64) // 512
    position = np.arange(tokens, dtype=np.int64) % 512
    meta = {"index": 0, "name": "mlp", "num_experts": EXPERTS, "top_k": TOP_K, "scoring": "sigmoid", "n_group": 8}
    zeros = np.zeros(tokens, np.int64)
    return [
        LayerData(index=i, meta={**meta, "index": i}, step=step, sequence=sequence, position=position, rank=rank,
                  token_id=zeros, phase=zeros.astype(np.int8), experts=choices[i],
                  weights=np.full(choices[i].shape, 1.0 / TOP_K, np.float32),
                  dropped=np.zeros(choices[i].shape, bool))
        for i in range(LAYERS)
    ]


def bench_eplb(rng: np.random.Generator, repeat: int, results: list[tuple[str, float]]) -> list[LayerData]:
    tokens = DECISIONS // (LAYERS * TOP_K)
    print(f"EPLB: {LAYERS} layers x {EXPERTS} experts, {tokens:,} tokens x top-{TOP_K} = "
          f"{LAYERS * tokens * TOP_K:,} decisions, {STEPS} steps, {RANKS} source ranks")
    layers = layer_data(skewed_choices(rng, tokens))
    step_index = layers[0].step

    def count() -> np.ndarray:
        return np.stack([step_loads(layer.experts, step_index, STEPS, EXPERTS) for layer in layers], axis=1)

    per_step = timed("count 10 M decisions into per-step loads (S, L, E)", count, repeat, results)
    load = per_step.sum(axis=0)
    plan = timed("EPLB hierarchical: 288 slots, 8 groups, 4 nodes, 32 GPUs",
                 lambda: plan_eplb(load, 288, 8, 4, 32), repeat, results)
    timed("per-GPU load + balancedness (58 x 32)", lambda: balancedness(gpu_load(load, plan)), repeat, results)
    plan_global = timed("EPLB global: 288 slots, 8 groups, 3 nodes, 24 GPUs",
                        lambda: plan_eplb(load, 288, 8, 3, 24), repeat, results)
    options = EplbOptions.parse("replicas=288,groups=8,nodes=4,gpus=32,plan=0:50")
    report = timed("evaluate_placement (CLI path: plan 0-49, evaluate 50-99)",
                   lambda: evaluate_placement(layers, options, world_size=RANKS), repeat, results)
    print(f"    balancedness over 32 GPUs: contiguous {report['contiguous']['balancedness_mean']:.3f}, "
          f"EPLB {report['eplb']['balancedness_mean']:.3f} (planned on other steps); same-window EPLB "
          f"{balancedness(gpu_load(load, plan)).mean():.3f}, global {balancedness(gpu_load(load, plan_global)).mean():.3f}")
    return layers


def bench_reroute(rng: np.random.Generator, repeat: int, results: list[tuple[str, float]]) -> None:
    print(f"re-routing: {REROUTE_TOKENS:,} tokens x {EXPERTS} experts (float32 logits, "
          f"{REROUTE_TOKENS * EXPERTS * 4 / 2**30:.2f} GiB)")
    logits = rng.standard_normal((REROUTE_TOKENS, EXPERTS), dtype=np.float32)
    bias = (rng.standard_normal(EXPERTS) * 0.02).astype(np.float32)
    timed("DeepSeek-V3 sigmoid + bias, 8 groups keep 4, top-8",
          lambda: reroute(logits, top_k=8, scoring="sigmoid", bias=bias, n_group=8, topk_group=4,
                          routed_scaling_factor=2.5), repeat, results)
    timed("softmax top-8", lambda: reroute(logits, top_k=8, scoring="softmax"), repeat, results)
    steps = np.repeat(np.arange(256), -(-REROUTE_TOKENS // 256))[:REROUTE_TOKENS]
    config = RouterConfig(top_k=8, scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5)
    timed("online bias replay, 256 steps of ~3.9k tokens",
          lambda: route_with_online_bias(logits, steps, config, rate=0.001), repeat, results)


def bench_trace(layers: list[LayerData], repeat: int, results: list[tuple[str, float]]) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.support's trace writer
    from moeprobe.analysis.session import open_trace
    from moeprobe.simulate import replay
    from tests.support import layer_meta, routing_table, write_trace

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        tables = [
            routing_table(layer.experts, weights=layer.weights, step=layer.step, sequence=layer.sequence,
                          position=layer.position, layer=layer.index)
            for layer in layers
        ]
        start = time.perf_counter()
        write_trace(path, {"routing": tables}, layers=layer_meta(LAYERS, EXPERTS, TOP_K))
        size = sum(f.stat().st_size for f in path.rglob("*.parquet"))
        print(f"trace: 10 M routing rows written in {time.perf_counter() - start:.1f} s ({size / 2**20:.0f} MiB)")

        def load() -> replay.ReplayInput:
            with open_trace(path) as trace:
                return replay.load_layers(trace)

        timed("read 10 M decisions from the trace into numpy (DuckDB)", load, repeat, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", action="store_true", help="also time reading a 10 M-decision trace")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, "
          f"numpy {np.__version__}, best of {args.repeat}")
    rng = np.random.default_rng(0)
    results: list[tuple[str, float]] = []
    layers = bench_eplb(rng, args.repeat, results)
    if args.trace:
        bench_trace(layers, args.repeat, results)
    del layers
    bench_reroute(rng, args.repeat, results)


if __name__ == "__main__":
    main()
