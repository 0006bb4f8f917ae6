"""What capture's own code costs the model's thread, measured inside the demo decode loop.

    python bench/capture_cost.py [--steps 63] [--repeats 3] [--modes hooks,graph,counts]

For the whole cost of each mode, with an A/A control, use capture_interleaved.py; this script says where the
time goes. It times only capture's own code, where it runs: every part of hook capture's wrapped forwards (the
stack call's begin and end, the block's and router's marks, the router's end; each is built through
``Probe._sync_checked``), the part of graph capture's and counts mode's wrappers that is not the wrapped module
(the stack's includes counting the calls to the next drain and the drain every 32 calls, which it takes over from
the drain hook on the model after the first call; the hook is timed too), with
``time.thread_time_ns`` (the model thread's CPU time) around each call, inside a real decode loop, so caches are
as cold as the model leaves them (a capture function timed alone in a tight loop reads several times cheaper). It
prints, per mode, all that time per step and its share of the loop's CPU time per step (prefill included), and
per place the mean and median call. 64 calls (the default 63 decode steps and the prefill) are two whole drain
periods, so no drain is left for the exit. Each timed call also carries the timer's own cost (about 0.6 us).

Not in it: the wrappers' own Python frames, torch's slower call path for the model while it carries the drain hook (its first call),
and the writer thread (hook capture reads the noted router outputs and stack arguments there; counts mode on the
host counts there, host_counts.py).
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
from moeprobe.hooks import graph_capture, graph_session, probe as probe_module  # noqa: E402

CALLS: dict[str, list[int]] = defaultdict(list)  # where -> nanoseconds per call
_clock = time.thread_time_ns  # CPU time of the model's thread: what other processes do is not in it


def _timed_hooks() -> None:
    """Time every part of hook capture's wrappers (each goes through Probe._sync_checked when it is built)."""
    original = probe_module.Probe._sync_checked

    def checked(self: Any, fn: Any) -> Any:
        inner = original(self, fn)
        where = f"hook {getattr(fn, '__name__', 'part')}"

        def timed(*args: Any) -> Any:
            t = _clock()
            try:
                return inner(*args)
            finally:
                CALLS[where].append(_clock() - t)

        return timed

    probe_module.Probe._sync_checked = checked  # type: ignore[method-assign]


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

    after_call = graph_session.GraphSession.after_call

    def timed_after_call(self: Any, *args: Any) -> None:
        # The drain hook: every drain_every calls it takes the rings off (and, in counts mode on the host, counts
        # the calls noted since the last drain), so its time is part of capture's cost per step.
        t = _clock()
        after_call(self, *args)
        CALLS["drain hook"].append(_clock() - t)

    graph_capture.GraphCapture._stack_forward = stack_forward  # type: ignore[method-assign]
    graph_capture.GraphCapture._layer_forward = layer_forward  # type: ignore[method-assign]
    graph_session.GraphSession.after_call = timed_after_call  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=63)  # 64 calls: two whole drain periods, none left for the exit
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="hooks,graph,counts", help="comma-separated, of hooks, graph, counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, ids, label = load_demo_model("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="moeprobe-cost-"))
    _timed_hooks()
    _timed_wrappers()
    known: dict[str, dict[str, Any]] = {"hooks": {"capture": "hooks"}, "graph": {"capture": "graph"}, "counts": {"mode": "counts"}}
    modes = {name: known[name] for name in args.modes.split(",")}
    start_load = os.getloadavg()
    print(f"{label}; batch {list(ids.shape)}, {args.steps} decode steps, 1 torch thread")
    print(f"  {'mode':<7} {'capture code per step, us':>26} {'step, ms':>9} {'share':>7}   per call (mean/median us) x calls per step")
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
            # Every call's CPU time counts (thread time: what other processes do is not in it): the drain hook
            # is cheap except at every drain_every-th call, where a median per call would hide the drain.
            per_step = sum(sum(v) for v in CALLS.values()) / n / 1e3
            step_ms = steps[0] / 1e6
            calls = ", ".join(
                f"{where} {sum(v) / len(v) / 1e3:.1f}/{statistics.median(v) / 1e3:.1f} x{len(v) / n:.3g}" for where, v in sorted(CALLS.items())
            )
            print(f"  {name:<7} {per_step:26.1f} {step_ms:9.2f} {per_step / (step_ms * 1e3):7.2%}   {calls}")
    end_load = os.getloadavg()
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in start_load)}, after: {' '.join(f'{x:.2f}' for x in end_load)}")


if __name__ == "__main__":
    main()
