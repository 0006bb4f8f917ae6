"""Writer memory under overload: the process's peak RSS against ``max_queue_mb`` when steps come faster than
the writer can write them.

DeepSeek-V3 shape (bench/dsv3.py) at the three step shapes of bench/writer_throughput.py. For each shape:

1. baseline: the RSS of a fresh process (one per shape) with torch imported, the step data built (the
   "model's" arrays, printed) and an idle pipeline attached (writer thread started, nothing submitted);
2. capacity: the writer's rate in this process, now: --capacity-decisions offered as fast as the budget
   admits them, first submit until all on disk (writer_throughput.capacity);
3. overload: steps offered at --overload x that capacity for --seconds (and at least 10x the decisions the
   budget holds), each step with fresh router outputs (int64 ids and float32 weights, as ``torch.topk``
   returns them: a real model allocates them every step, and only the pipeline's references keep them
   alive), then the trace closed. The peak RSS of the whole run (the kernel's high-water mark, VmHWM, reset
   before the run through /proc/self/clear_refs) against baseline + budget; the decisions dropped (the
   manifest's counters) and the ledger's own peak (``CapturePipeline`` counts every stage against the budget).

    python bench/writer_memory.py [--budget-mb 256] [--overload 2] [--seconds 10] [--only "decode 256"]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dsv3 import LAYERS, Routing, layer_meta, make_routing  # noqa: E402
from bench.writer_throughput import BYTES_PER_DECISION, SHAPES, capacity, load  # noqa: E402
from moeprobe.hooks.capture import LayerCapture, StepBuffer  # noqa: E402
from moeprobe.hooks.pipeline import CapturePipeline  # noqa: E402
from moeprobe.hooks.timing import CpuClock  # noqa: E402
from moeprobe.hooks.token_context import NEW, TokenContext  # noqa: E402
from moeprobe.traces import ShardWriter, prepare_trace_dir  # noqa: E402

MIB = 1 << 20


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def fresh_step(number: int, routing: Routing, ids: torch.Tensor, batch: int, seq_len: int) -> StepBuffer:
    """A step as a model hands it over: router outputs allocated for this step only."""
    context = TokenContext(stack_id=0, batch=batch, seq_len=seq_len, continuity=NEW, input_ids=ids,
                           position_ids=None, attention_mask=None, mask_4d=None, past_len=None)
    step = StepBuffer(step=number)
    step.contexts.append(context)
    for layer in range(LAYERS):
        step.layers.append(LayerCapture(
            layer=layer,
            context=context,
            indices=torch.from_numpy(routing.experts[layer]).to(torch.int64),
            weights=torch.from_numpy(routing.weights[layer]).clone(),
            scores=None,
            dropped=None,
        ))
    return step


def idle_baseline(path: Path, budget: int) -> int:
    """RSS in bytes with an idle pipeline attached (its writer thread running, nothing submitted)."""
    prepare_trace_dir(path, force=True)
    writer = ShardWriter(path, model={"name": "dsv3-synthetic"}, layers=layer_meta(), options={"weights": "fp16"})
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1.0, max_queue_bytes=budget)
    gc.collect()
    rss = status_kib("VmRSS") * 1024
    pipeline.close("complete")
    return rss


def overload(path: Path, routing: Routing, batch: int, seq_len: int, rate: float, seconds: float, budget: int) -> dict[str, float]:
    prepare_trace_dir(path, force=True)
    writer = ShardWriter(path, model={"name": "dsv3-synthetic"}, layers=layer_meta(), options={"weights": "fp16"})
    pipeline = CapturePipeline(writer, clock=CpuClock(), flush_interval=1.0, max_queue_bytes=budget)
    ids = torch.from_numpy(routing.token_ids.reshape(batch, seq_len))
    per_step = routing.decisions
    steps = max(1, math.ceil(max(rate * seconds, 10 * budget / BYTES_PER_DECISION) / per_step))
    gc.collect()
    baseline_kib = status_kib("VmRSS")  # after the capacity runs: what the allocators kept is in the peak, not here
    exact = reset_peak()
    peak_sampled = baseline_kib
    wall0 = time.perf_counter()
    for i in range(steps):
        due = wall0 + i * per_step / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.01, due - now))
        pipeline.submit(fresh_step(i, routing, ids, batch, seq_len))
        if not exact and i % 4 == 0:
            peak_sampled = max(peak_sampled, status_kib("VmRSS"))
    offered_s = time.perf_counter() - wall0
    pipeline.close("complete", timeout=600)
    peak_kib = status_kib("VmHWM") if exact else max(peak_sampled, status_kib("VmRSS"))
    counters = writer.counters
    return {
        "baseline": baseline_kib * 1024, "peak": peak_kib * 1024, "exact": exact, "ledger_peak": pipeline._ledger.peak,
        "offered": per_step * steps, "offered_rate": per_step * steps / offered_s, "offered_s": offered_s,
        "written": counters["decisions"], "dropped": sum(counters["dropped"].values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, default=256, help="max_queue_mb of the pipeline (default 256)")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate as a multiple of the measured capacity")
    parser.add_argument("--seconds", type=float, default=10.0, help="at least this many seconds of offered load")
    parser.add_argument("--capacity-decisions", type=float, default=100e6, help="decisions of the capacity run")
    parser.add_argument("--only", choices=sorted(SHAPES), action="append", help="run only these shapes")
    parser.add_argument("--quiet-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    budget = int(args.budget_mb * MIB)
    if not args.quiet_load:
        print(f"load average at start: {load()}; {os.cpu_count()} CPUs; budget {args.budget_mb:g} MiB", flush=True)
    out = Path(tempfile.mkdtemp(prefix="writer_memory_"))
    if not args.only or len(args.only) > 1:
        # One process per shape: what one shape's runs leave in the allocators must not hide in the next's baseline.
        for name in args.only or SHAPES:
            forwarded = ["--budget-mb", str(args.budget_mb), "--overload", str(args.overload), "--seconds", str(args.seconds),
                         "--capacity-decisions", str(args.capacity_decisions)]
            subprocess.run([sys.executable, __file__, *forwarded, "--only", name, "--quiet-load"], check=True)
        print(f"\nload average at end: {load()}")
        return 0
    try:
        for name in args.only:
            batch, seq_len = SHAPES[name]
            routing = make_routing(batch * seq_len, seq_len, seed=7)
            baseline = idle_baseline(out / "idle", budget)
            cap = capacity(out / "cap", routing, batch, seq_len, args.capacity_decisions)
            rate = args.overload * cap["long_rate"]
            got = overload(out / "over", routing, batch, seq_len, rate, args.seconds, budget)
            got["baseline"] = baseline
            excess = got["peak"] - got["baseline"] - budget
            print(f"\n{name} tokens ({routing.decisions:,} decisions a step): capacity {cap['long_rate'] / 1e6:.1f} M/s wall now; "
                  f"offered {got['offered_rate'] / 1e6:.1f} M/s ({got['offered_rate'] / cap['long_rate']:.1f}x) for {got['offered_s']:.1f} s")
            print(f"  wrote {got['written']:,} of {got['offered']:,}, dropped {got['dropped']:,} "
                  f"({'all accounted' if got['written'] + got['dropped'] == got['offered'] else 'NOT ACCOUNTED'}); "
                  f"ledger peak {got['ledger_peak'] / MIB:.0f} MiB of {budget / MIB:.0f}")
            model_mib = (routing.experts.nbytes + routing.weights.nbytes) / MIB
            in_flight_mib = routing.decisions * (8 + 4) / MIB
            print(f"  one step's fresh router outputs (int64 ids + float32 weights, the model's own while it is submitted): {in_flight_mib:.0f} MiB")
            print(f"  RSS: baseline {got['baseline'] / MIB:.0f} MiB (torch, idle pipeline, the step data {model_mib:.0f} MiB), peak {got['peak'] / MIB:.0f} MiB "
                  f"({'VmHWM' if got['exact'] else 'sampled'}): peak - baseline = {(got['peak'] - got['baseline']) / MIB:.0f} MiB "
                  f"= budget {budget / MIB:.0f} MiB {'+' if excess >= 0 else '-'} {abs(excess) / MIB:.0f} MiB")
            for f in out.glob("*.*"):
                f.unlink()
    finally:
        shutil.rmtree(out)
    if not args.quiet_load:
        print(f"\nload average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
