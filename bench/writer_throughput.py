"""Writer throughput: decisions per second the capture pipeline turns into trace segments, beside the peers.

DeepSeek-V3 shape (bench/dsv3.py), synthetic steps fed through the real CapturePipeline and ShardWriter (the
writer thread resolves token context, ranks the k choices, encodes format v2 and writes Parquet), at three
step shapes: prefill of 4,096 and of 16,384 tokens, and decode of 256 tokens. For each shape:

- capacity: every step queued at once, then the time until the trace is closed; decisions per second of
  wall time and per CPU second of this process (the model thread is idle, so CPU time is the writer's);
- sustained: steps submitted at a fixed rate (--rate decisions/s) for --sustain seconds with the default
  256 MiB queue budget (long enough to fill it several times over when the writer is slower than the rate);
  the decisions dropped (queue full) are counted;
- peers, same data, same run: pyarrow writing format v1's schema (one row per decision), torch.save of the
  int32 (tokens, k) ids per layer (SGLang's per_token dump), JSONL of the ids.

The machine is shared: ratios within one run are what to compare; the load average is printed.

    python bench/writer_throughput.py [--steps 6] [--rate 20e6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dsv3 import LAYERS, Routing, layer_meta, make_routing, make_step  # noqa: E402
from bench.trace_bytes import v1_table  # noqa: E402
from moeprobe.hooks.pipeline import CapturePipeline  # noqa: E402
from moeprobe.hooks.timing import CpuClock  # noqa: E402
from moeprobe.traces import ShardWriter, prepare_trace_dir  # noqa: E402

SHAPES = {  # name -> (batch, seq_len)
    "prefill 4,096": (8, 512),
    "prefill 16,384": (16, 1024),
    "decode 256": (256, 1),
}


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def run_pipeline(path: Path, routing: Routing, batch: int, seq_len: int, steps: int, rate: float | None,
                 max_queue_bytes: int) -> dict[str, float]:
    prepare_trace_dir(path, force=True)
    writer = ShardWriter(path, model={"name": "dsv3-synthetic"}, layers=layer_meta(), options={"weights": "fp16"})
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1.0, max_queue_bytes=max_queue_bytes)
    per_step = routing.decisions
    # Steps share the routing arrays: building them costs nothing, and the pipeline never writes into them.
    prepared = [make_step(i, routing, batch, seq_len, new=True) for i in range(steps)]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i, step in enumerate(prepared):
        if rate is not None:
            due = wall0 + i * per_step / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.01, due - now))
        pipeline.submit(step)
    # The rate actually offered: under load the submitting thread itself can fall behind its schedule.
    submitted = time.perf_counter() - wall0
    pipeline.close("complete", timeout=600)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    counters = writer.counters
    dropped = sum(counters["dropped"].values())
    return {"wall": wall, "cpu": cpu, "written": counters["decisions"], "dropped": dropped, "offered": per_step * steps,
            "offered_rate": per_step * steps / submitted if submitted > 0 else float("inf")}


def peers(routing: Routing, batch: int, seq_len: int, steps: int, out: Path) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per step for each peer writing the same step's routing (the v1 table is built
    beforehand and not timed: pyarrow gets its input for free)."""
    table = v1_table([(routing, batch, seq_len, True)])
    times: dict[str, tuple[float, float]] = {}

    def timed(name: str, n: int, write: Callable[[int], None]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            write(i)
        times[name] = ((time.perf_counter() - t0) / n, (time.process_time() - c0) / n)

    def jsonl(i: int) -> None:
        with (out / f"{i}.jsonl").open("w") as handle:
            for layer in range(LAYERS):
                handle.write(json.dumps({"step": i, "layer": layer, "topk_ids": routing.experts[layer].tolist()}) + "\n")

    timed("pyarrow, v1 schema (same data)", steps, lambda i: pq.write_table(
        table, out / f"v1-{i}.parquet", compression="zstd", compression_level=1, row_group_size=1 << 20))
    timed("torch.save int32 ids (SGLang per_token)", steps, lambda i: torch.save(
        {layer: torch.from_numpy(routing.experts[layer]) for layer in range(LAYERS)}, out / f"{i}.pt"))
    timed("JSONL ids", min(steps, 2), jsonl)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per shape and run (default 6)")
    parser.add_argument("--rate", type=float, default=20e6, help="offered rate of the sustained run, decisions/s")
    parser.add_argument("--sustain", type=float, default=5.0, help="seconds of offered load in the sustained run")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append", help="run only these shapes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {load()}; {os.cpu_count()} CPUs")
    out = Path(tempfile.mkdtemp(prefix="writer_throughput_"))
    try:
        for name in args.only or SHAPES:
            batch, seq_len = SHAPES[name]
            routing = make_routing(batch * seq_len, seq_len, seed=7)
            per_step = routing.decisions
            print(f"\n{name} tokens: {per_step:,} decisions per step, {args.steps} steps")
            cap = run_pipeline(out / "cap", routing, batch, seq_len, args.steps, None, 1 << 40)
            print(f"  moeprobe capacity: {cap['written'] / cap['wall'] / 1e6:6.1f} M decisions/s wall, "
                  f"{cap['written'] / cap['cpu'] / 1e6:6.1f} M/s per CPU second ({cap['wall'] / args.steps:.2f} s per step)")
            sustain_steps = max(args.steps, int(args.sustain * args.rate / per_step))
            sus = run_pipeline(out / "sus", routing, batch, seq_len, sustain_steps, args.rate, 256 << 20)
            print(f"  moeprobe sustained at {args.rate / 1e6:.0f} M/s asked ({sus['offered_rate'] / 1e6:.1f} M/s offered), "
                  f"256 MiB queue: wrote {sus['written']:,} of {sus['offered']:,}, dropped {sus['dropped']:,} "
                  f"({sus['wall']:.1f} s to close)")
            for peer, (wall, cpu) in peers(routing, batch, seq_len, min(args.steps, 3), out).items():
                print(f"  {peer:42s} {per_step / wall / 1e6:8.1f} M decisions/s wall, {per_step / cpu / 1e6:8.1f} M/s per CPU second")
            for f in out.glob("*.*"):
                f.unlink()
    finally:
        shutil.rmtree(out)
    print(f"\nload average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
