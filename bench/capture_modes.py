"""Cost of each capture mode on the model's own thread: hook capture, graph capture, counts mode, no probe.

    python bench/capture_modes.py [--rounds 15] [--steps 96]

The demo model's greedy KV-cached decode loop (bench/capture_overhead.py's), variants interleaved in rotating
order. Besides wall time it reports the CPU time of the thread that runs the model (``time.thread_time``): what
capture adds to the job's critical path, and far less disturbed by other processes on a shared machine than wall
time (the writer thread's work is left out: it runs beside the model, and capture_overhead.py's process CPU
figure counts it). Ratios are medians within this one run.
"""

from __future__ import annotations

import argparse
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
    wall: dict[str, list[float]] = {n: [] for n in options}
    cpu: dict[str, list[float]] = {n: [] for n in options}
    names = list(options)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = runs(name)
            wall[name].append(w)
            cpu[name].append(c)
    print(f"{label}; batch {list(ids.shape)}, {args.steps} decode steps, {args.rounds} rounds, 1 torch thread")
    print(f"  {'variant':<8} {'wall s':>8} {'ratio':>7}   {'model-thread CPU s':>18} {'ratio':>7}")
    for name in names:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<8} {mw:8.4f} {mw / statistics.median(wall['none']):7.3f}   {mc:18.4f} {mc / statistics.median(cpu['none']):7.3f}")


if __name__ == "__main__":
    main()
