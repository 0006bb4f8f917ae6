"""Cost of each capture mode on the model's own thread: hook capture, graph capture, counts mode, no probe.

    python bench/capture_modes.py [--rounds 15] [--steps 96]

The demo model's greedy KV-cached decode loop (bench/capture_overhead.py's), variants interleaved in rotating
order (ABCD, BCDA, ...), many rounds in one process. Besides wall time it reports the CPU time of the thread that
runs the model (``time.thread_time``): what capture adds to the job's critical path, and less disturbed by other
processes on a shared machine than wall time (the writer thread's work is left out: it runs beside the model,
and capture_overhead.py's process CPU figure counts it). The ratio is the median over rounds of each round's
ratio to that round's no-probe run (neighbours in time share the machine's load); the load average is printed
before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprobe  # noqa: E402
from capture_overhead import decode_loop, load_demo_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, ids, label = load_demo_model("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="moeprobe-modes-"))
    options: dict[str, dict[str, Any] | None] = {
        "none": None,
        "hooks": {"capture": "hooks"},
        "graph": {"capture": "graph"},
        "counts": {"mode": "counts"},
    }

    def measure(name: str) -> tuple[float, float]:
        def loop() -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.thread_time()
            decode_loop(model, ids, args.steps)
            return time.perf_counter() - wall, time.thread_time() - cpu

        opts = options[name]
        if opts is None:
            return loop()
        with moeprobe.record(model, workdir / name, force=True, **opts):
            return loop()

    runs: Callable[[str], tuple[float, float]] = measure
    for name in options:  # warm-up
        runs(name)
    start_load = os.getloadavg()
    wall: dict[str, list[float]] = {n: [] for n in options}
    cpu: dict[str, list[float]] = {n: [] for n in options}
    names = list(options)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = runs(name)
            wall[name].append(w)
            cpu[name].append(c)
    load = os.getloadavg()
    print(f"{label}; batch {list(ids.shape)}, {args.steps} decode steps, {args.rounds} rounds, 1 torch thread")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in start_load)}, after: {' '.join(f'{x:.2f}' for x in load)}")
    print(f"  {'variant':<8} {'wall s':>8} {'ratio':>7}   {'model-thread CPU s':>18} {'ratio':>7}   (ratio: median of per-round ratios)")
    for name in names:
        wall_ratio = statistics.median(w / b for w, b in zip(wall[name], wall["none"], strict=True))
        cpu_ratio = statistics.median(c / b for c, b in zip(cpu[name], cpu["none"], strict=True))
        print(f"  {name:<8} {statistics.median(wall[name]):8.4f} {wall_ratio:7.3f}   {statistics.median(cpu[name]):18.4f} {cpu_ratio:7.3f}")


if __name__ == "__main__":
    main()
