"""Writer throughput: decisions per second the capture pipeline turns into trace segments, beside the peers.

DeepSeek-V3 shape (bench/dsv3.py), synthetic steps fed through the real CapturePipeline and ShardWriter (the
writer thread resolves token context, ranks the k choices, encodes format v2 and writes Parquet), at three
step shapes: prefill of 4,096 and of 16,384 tokens, and decode of 256 tokens. For each shape, one figure each:

- sustained (the target): steps offered at --rate decisions/s for --sustain seconds, and at least long enough
  to offer 10x what the 256 MiB budget holds (16 B a decision: 16.8 M decisions), so a writer slower than the
  rate cannot hide behind the queue. Printed: the rate actually offered, decisions written and dropped (the
  manifest's counters), and the time from the first submit until everything is on disk (the trace closed),
  with the rate that makes; the writer thread's own CPU seconds (``CapturePipeline.cpu_seconds``: per core,
  Arrow's thread pools excluded) and the process's CPU seconds (everything, the submitting thread included);
- capacity: --capacity-decisions (100 M by default, 6x what the budget holds) offered as fast as the 256 MiB
  budget admits them (the bench waits for room: nothing dropped), first submit until all on disk; and the
  marginal rate against a run a quarter as long (difference of decisions over difference of time), in which
  start-up and close (thread start, first segment, final manifest) cancel out but which is noisier on a
  loaded machine;
- peers, same data, same run: pyarrow writing format v1's schema (one row per decision), torch.save of the
  int32 (tokens, k) ids per layer (SGLang's per_token dump), JSONL of the ids.

bench/dsv3.py's choices come out in rank order (argpartition happens to sort 8 of 256 here), so the writer's
ranking pass finds nothing to sort; --unsorted shuffles each token's k choices first, as DeepSeek-V3's
topk(sorted=False) may hand them over, and so times the ranking too.

The machine is shared: the load average is printed; wall-clock rates on a loaded machine understate the
writer, its thread CPU time does not.

    python bench/writer_throughput.py [--rate 20e6] [--sustain 10] [--only "prefill 4,096"]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
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


QUEUE_BYTES = 256 << 20
BYTES_PER_DECISION = 16  # StepBuffer.nbytes's estimate: what the budget counts for a queued step


def shuffle(routing: Routing) -> None:
    """Each token's k choices in a random order (experts and weights alike), in place."""
    order = np.argsort(np.random.default_rng(11).random(routing.experts.shape, dtype=np.float32), axis=2)
    routing.experts[:] = np.take_along_axis(routing.experts, order, axis=2)
    routing.weights[:] = np.take_along_axis(routing.weights, order, axis=2)


def run_pipeline(path: Path, routing: Routing, batch: int, seq_len: int, steps: int, rate: float | None,
                 max_queue_bytes: int = QUEUE_BYTES) -> dict[str, float]:
    """Offer ``steps`` steps and close the trace; times from the first submit until the trace is closed
    (everything on disk). At ``rate`` decisions/s, or with ``rate=None`` as fast as the budget admits them: the
    submitting side waits while a step would not fit (backpressure, for capacity runs: nothing is dropped and
    the pipeline holds what it would under a real overload, not an unbounded queue)."""
    prepare_trace_dir(path, force=True)
    writer = ShardWriter(path, model={"name": "dsv3-synthetic"}, layers=layer_meta(), options={"weights": "fp16"})
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1.0, max_queue_bytes=max_queue_bytes)
    per_step = routing.decisions
    # Steps share the routing arrays: building them costs nothing, and the pipeline never writes into them.
    prepared = [make_step(i, routing, batch, seq_len, new=True) for i in range(steps)]
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i, step in enumerate(prepared):
        if rate is not None:
            due = wall0 + i * per_step / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.01, due - now))
        else:
            size = step.nbytes()
            deadline = time.monotonic() + 600
            while pipeline.held_bytes + size > max_queue_bytes and time.monotonic() < deadline:
                time.sleep(0.001)  # the writer frees budget as it converts and flushes
        pipeline.submit(step)
        prepared[i] = None  # type: ignore[call-overload]  # the pipeline's reference is the only one left
    # The rate actually offered: under load the submitting thread itself can fall behind its schedule.
    submitted = time.perf_counter() - wall0
    pipeline.close("complete", timeout=600)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    counters = writer.counters
    dropped = sum(counters["dropped"].values())
    return {"wall": wall, "cpu": cpu, "writer_cpu": pipeline.cpu_seconds, "written": counters["decisions"],
            "dropped": dropped, "offered": per_step * steps, "offered_s": submitted,
            "offered_rate": per_step * steps / submitted if submitted > 0 else float("inf")}


def capacity(path: Path, routing: Routing, batch: int, seq_len: int, decisions: float) -> dict[str, float]:
    """Steady-state capacity: (decisions of a long run - of a short one) / (their time difference)."""
    long_steps = max(4, round(decisions / routing.decisions))
    short_steps = max(1, long_steps // 4)
    short = run_pipeline(path, routing, batch, seq_len, short_steps, None)
    long = run_pipeline(path, routing, batch, seq_len, long_steps, None)
    extra = long["written"] - short["written"]
    return {
        "wall": extra / max(long["wall"] - short["wall"], 1e-9),
        "writer_cpu": extra / max(long["writer_cpu"] - short["writer_cpu"], 1e-9),
        "process_cpu": extra / max(long["cpu"] - short["cpu"], 1e-9),
        "long_decisions": long["written"],
        "long_writer_cpu": long["written"] / max(long["writer_cpu"], 1e-9),
        "dropped": long["dropped"] + short["dropped"],
        "long_rate": long["written"] / long["wall"],
        "short_rate": short["written"] / short["wall"],
    }


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
    parser.add_argument("--rate", type=float, default=20e6, help="offered rate of the sustained run, decisions/s")
    parser.add_argument("--sustain", type=float, default=10.0,
                        help="at least this many seconds of offered load (and at least 10x the budget's decisions)")
    parser.add_argument("--capacity-decisions", type=float, default=100e6, help="decisions of the long capacity run")
    parser.add_argument("--peer-steps", type=int, default=3, help="steps each peer writes")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append", help="run only these shapes")
    parser.add_argument("--unsorted", action="store_true", help="shuffle each token's k choices (the writer ranks them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {load()}; {os.cpu_count()} CPUs")
    out = Path(tempfile.mkdtemp(prefix="writer_throughput_"))
    budget_decisions = QUEUE_BYTES // BYTES_PER_DECISION
    try:
        for name in args.only or SHAPES:
            batch, seq_len = SHAPES[name]
            routing = make_routing(batch * seq_len, seq_len, seed=7)
            if args.unsorted:
                shuffle(routing)
            per_step = routing.decisions
            print(f"\n{name} tokens: {per_step:,} decisions per step{', choices shuffled' if args.unsorted else ''}")
            offered = max(args.sustain * args.rate, 10 * budget_decisions)
            steps = max(1, math.ceil(offered / per_step))
            sus = run_pipeline(out / "sus", routing, batch, seq_len, steps, args.rate, QUEUE_BYTES)
            print(f"  sustained: {sus['offered_rate'] / 1e6:.1f} M/s offered for {sus['offered_s']:.1f} s ({steps} steps, "
                  f"{args.rate / 1e6:g} M/s asked), 256 MiB budget: wrote {sus['written']:,} of {sus['offered']:,}, "
                  f"dropped {sus['dropped']:,}")
            print(f"    first submit -> all on disk {sus['wall']:.2f} s: {sus['written'] / sus['wall'] / 1e6:.1f} M decisions/s wall; "
                  f"writer thread {sus['writer_cpu']:.2f} CPU s = {sus['written'] / max(sus['writer_cpu'], 1e-9) / 1e6:.1f} M/s per core; "
                  f"process {sus['cpu']:.2f} CPU s")
            cap = capacity(out / "cap", routing, batch, seq_len, args.capacity_decisions)
            print(f"  capacity, {cap['long_decisions'] / 1e6:.0f} M decisions offered as fast as the budget admits them "
                  f"({cap['dropped']} dropped): {cap['long_rate'] / 1e6:.1f} M/s wall from first submit to all on disk, "
                  f"{cap['long_writer_cpu'] / 1e6:.1f} M/s per writer-thread CPU s")
            print(f"    marginal (that run minus one a quarter as long: start-up and close cancel): {cap['wall'] / 1e6:.1f} M/s wall, "
                  f"{cap['writer_cpu'] / 1e6:.1f} M/s per writer-thread CPU s, {cap['process_cpu'] / 1e6:.1f} M/s per process CPU s")
            for peer, (wall, cpu) in peers(routing, batch, seq_len, args.peer_steps, out).items():
                print(f"  {peer:42s} {per_step / wall / 1e6:8.1f} M decisions/s wall, {per_step / cpu / 1e6:8.1f} M/s per CPU second")
            for f in out.glob("*.*"):
                f.unlink()
    finally:
        shutil.rmtree(out)
    print(f"\nload average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
