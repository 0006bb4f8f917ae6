"""What capture's own code costs the model's thread, measured inside the demo decode loop.

    python bench/capture_cost.py [--steps 48] [--repeats 3]

Whole-loop ratios (capture_modes.py) cannot resolve a 1 % cost on a shared 2-core machine: the same code moves
by +-5 % between runs. This script times only capture's own code, where it runs: every hook call (hook
capture) and the part of every wrapper that is not the wrapped module (graph capture and counts mode), with
``time.perf_counter_ns`` around each call, inside a real decode loop, so caches are as cold as the model leaves
them (a capture function timed alone in a tight loop reads several times cheaper). It prints, per mode, the
median per step of that time and its share of the median step. Medians over calls are robust to the machine's
other processes; the step share is an estimate of the ratio capture_modes.py measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprobe  # noqa: E402
from capture_overhead import decode_loop, load_demo_model  # noqa: E402
from moeprobe.hooks import graph_capture, probe as probe_module  # noqa: E402

CALLS: dict[str, list[int]] = defaultdict(list)  # where -> nanoseconds per call
_clock = time.thread_time_ns  # CPU time of the model's thread: what other processes do is not in it


def _timed_hooks() -> None:
    """Time every hook call of hook capture (the wrapper Probe._checked puts around each hook)."""
    original = probe_module.Probe._checked

    def checked(self: Any, fn: Any) -> Any:
        inner = original(self, fn)
        where = f"hook {getattr(fn, '__name__', 'hook')}"

        def timed(*args: Any) -> Any:
            t = _clock()
            try:
                return inner(*args)
            finally:
                CALLS[where].append(_clock() - t)

        return timed

    probe_module.Probe._checked = checked  # type: ignore[method-assign]


def _timed_wrappers() -> None:
    """Time the graph-capture wrappers' own work: the wrapped forward is run outside the timed part."""
    stack, layer = graph_capture.GraphCapture._stack_forward, graph_capture.GraphCapture._layer_forward

    def stack_forward(self: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        inner = stack(self, lambda *a, **k: None)

        def forward(*args: Any, **kwargs: Any) -> Any:
            t = _clock()
            inner(*args, **kwargs)
            CALLS["stack wrapper"].append(_clock() - t)
            return original(*args, **kwargs)

        return forward

    def layer_forward(self: Any, original: Callable[..., Any], *bound: Any, **bound_by_name: Any) -> Callable[..., Any]:
        box: dict[str, Any] = {}
        inner = layer(self, lambda *a, **k: box["out"], *bound, **bound_by_name)

        def forward(*args: Any, **kwargs: Any) -> Any:
            box["out"] = original(*args, **kwargs)
            t = _clock()
            out = inner(*args, **kwargs)
            CALLS["router wrapper"].append(_clock() - t)
            return out

        return forward

    graph_capture.GraphCapture._stack_forward = stack_forward  # type: ignore[method-assign]
    graph_capture.GraphCapture._layer_forward = layer_forward  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, ids, label = load_demo_model("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="moeprobe-cost-"))
    _timed_hooks()
    _timed_wrappers()
    modes = {"hooks": {"capture": "hooks"}, "graph": {"capture": "graph"}, "counts": {"mode": "counts"}}
    start_load = os.getloadavg()
    print(f"{label}; batch {list(ids.shape)}, {args.steps} decode steps, 1 torch thread")
    print(f"  {'mode':<7} {'capture code per step, us':>26} {'step, ms':>9} {'share':>7}   per call (median us)")
    for name, options in modes.items():
        with moeprobe.record(model, workdir / "warm", force=True, **options):
            decode_loop(model, ids, 4)
        for _ in range(args.repeats):
            CALLS.clear()
            steps: list[int] = []
            with moeprobe.record(model, workdir / name, force=True, **options):
                t = _clock()
                decode_loop(model, ids, args.steps)
                steps.append((_clock() - t) // (args.steps + 1))
            n = args.steps + 1
            # Median call x calls per step, per place: robust to the odd call another process interrupted.
            per_step = sum(statistics.median(v) * len(v) / n for v in CALLS.values()) / 1e3
            step_ms = steps[0] / 1e6
            calls = ", ".join(f"{where} {statistics.median(v) / 1e3:.1f} x{len(v) // n}" for where, v in sorted(CALLS.items()))
            print(f"  {name:<7} {per_step:26.1f} {step_ms:9.2f} {per_step / (step_ms * 1e3):7.2%}   {calls}")
    end_load = os.getloadavg()
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in start_load)}, after: {' '.join(f'{x:.2f}' for x in end_load)}")


if __name__ == "__main__":
    main()
