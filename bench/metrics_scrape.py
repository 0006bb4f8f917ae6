"""What the metrics endpoint costs for a DeepSeek-V3-shaped model (58 MoE layers x 256 experts, top-8).

    python bench/metrics_scrape.py [--steps 128] [--tokens 64] [--repeat 10]

Two figures, neither on the model's thread:
  counting   LiveCounts.add for one flush worth of routing (STEPS decode steps of TOKENS tokens): the work the
             capture pipeline's writer thread adds per flush interval;
  (for scale, the time to write the same rows as a Parquet segment, which the writer thread does anyway)
  scrape     one full exposition (snapshot + collector + prometheus_client text format), default options and
             --metrics-per-expert: the work of the endpoint's HTTP thread per scrape.
Fastest of --repeat runs, in milliseconds, with the process CPU time beside the wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from moeprobe.metrics.collector import MoeCollector  # noqa: E402
from moeprobe.metrics.counts import LiveCounts  # noqa: E402
from moeprobe.metrics.options import Health, MetricsOptions, ShardView  # noqa: E402
from moeprobe.traces.schema import TABLES  # noqa: E402

LAYERS, EXPERTS, TOP_K = 58, 256, 8


def routing(steps: int, tokens: int, first_step: int) -> pa.Table:
    rng = np.random.default_rng(first_step)
    n = steps * LAYERS * tokens * TOP_K
    per_step = LAYERS * tokens * TOP_K
    return pa.table(
        {
            "step": np.repeat(np.arange(first_step, first_step + steps, dtype=np.int32), per_step),
            "sequence": np.zeros(n, np.int64),
            "position": np.zeros(n, np.int32),
            "token_id": np.zeros(n, np.int32),
            "phase": pa.DictionaryArray.from_arrays(pa.array(np.ones(n, np.int8)), pa.array(["prefill", "decode"])).cast(pa.string()),
            "layer": np.tile(np.repeat(np.arange(LAYERS, dtype=np.int16), tokens * TOP_K), steps),
            "k": np.tile(np.arange(TOP_K, dtype=np.int8), steps * LAYERS * tokens),
            "expert": rng.integers(0, EXPERTS, n).astype(np.int16),
            "weight": np.ones(n, np.float32),
            "dropped": np.zeros(n, bool),
        },
        schema=TABLES["routing"],
    )


def fastest(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls) * 1000, min(cpus) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128, help="decode steps per flush (default 128)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per decode step (default 64)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    layers = [{"index": i, "num_experts": EXPERTS, "top_k": TOP_K} for i in range(LAYERS)]
    counts = LiveCounts(layers)
    batches = [routing(args.steps, args.tokens, i * args.steps) for i in range(args.repeat + 1)]
    counts.add("routing", batches[0])
    it = iter(batches[1:])
    wall, cpu = fastest(lambda: counts.add("routing", next(it)), args.repeat)
    rows = batches[0].num_rows
    print(f"DeepSeek-V3 shape ({LAYERS} layers x {EXPERTS} experts, top-{TOP_K}); one flush = {args.steps} steps x "
          f"{args.tokens} tokens = {rows:,} routing rows")
    print(f"  counting (writer thread, per flush):   {wall:7.1f} ms wall, {cpu:7.1f} ms CPU")
    with tempfile.TemporaryDirectory() as tmp:
        # For scale: what the writer thread already spends on the same rows (the segment write, as ShardWriter does).
        target = Path(tmp) / "segment.parquet"
        write = lambda: pq.write_table(batches[0], target, compression="zstd", compression_level=1, row_group_size=1 << 20)  # noqa: E731
        wall, cpu = fastest(write, min(args.repeat, 3))
    print(f"  for scale, writing them as a segment:  {wall:7.1f} ms wall, {cpu:7.1f} ms CPU")
    for label, options in (("default", MetricsOptions()), ("per-expert", MetricsOptions(per_expert=True))):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MoeCollector(lambda: [ShardView("m", 0, counts.snapshot(), Health(steps=1))], options))
        text = generate_latest(registry)
        series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
        wall, cpu = fastest(lambda registry=registry: generate_latest(registry), args.repeat)
        print(f"  scrape, {label:<10} ({series:>6,} series): {wall:7.1f} ms wall, {cpu:7.1f} ms CPU, {len(text) / 1024:,.0f} KiB")


if __name__ == "__main__":
    main()
