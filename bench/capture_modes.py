"""Cost of each capture mode on the demo decode loop: hook capture, graph capture, counts mode, against no probe.

    python bench/capture_modes.py [--rounds 60] [--steps 32] [--cpu N] [--trim 0.1] [--json FILE]

The demo model's greedy KV-cached decode loop (bench/capture_overhead.py's: a prefill of the batch, then
``--steps`` decode steps), many short rounds in one process; each round runs every variant once, in rotating
order (ABCDE, BCDEA, ...), so neighbours in time share the machine's state. Per round and variant three times
are taken: wall time, the CPU time of the thread that runs the model (``time.thread_time``: what capture adds to
the job's critical path; what other processes do is not in it), and the process's CPU time (``time.process_time``:
the writer thread's work too). A variant's ratio is the trimmed mean (``--trim`` of the rounds cut at each end)
of its per-round ratios to that round's no-probe run, with a seeded bootstrap 95 % interval.

The variant ``none (A/A)`` is a second no-probe run in every round: its ratio should read 1.000, and its interval
is the resolution this run has on this machine; a target is resolved when a variant's interval lies on one side
of it. The process is pinned to one CPU (``--cpu``, default the last one it may use; ``--cpu -1``: not pinned) so
the model thread does not migrate between cores and caches mid-round; the writer thread shares that CPU. The load
average is printed before and after: figures measured at a load above the machine's cores are not quiet figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprobe  # noqa: E402
from capture_overhead import load_demo_model  # noqa: E402

VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "none (A/A)": None,
    "hooks": {"capture": "hooks"},
    "graph": {"capture": "graph"},
    "counts": {"mode": "counts"},
}


@torch.no_grad()
def timed_decode_loop(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, float, np.ndarray]:
    """capture_overhead.decode_loop's work (prefill, then greedy decode steps on a dynamic cache), timed: (wall s,
    model-thread CPU s of the whole loop, model-thread CPU s of each decode step)."""
    from transformers import DynamicCache

    clock = time.thread_time
    per_step = np.zeros(steps)
    wall, start = time.perf_counter(), clock()
    cache = DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True)
    for i in range(steps):
        t = clock()
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True)
        per_step[i] = clock() - t
    return time.perf_counter() - wall, clock() - start, per_step


def trimmed_mean(values: np.ndarray, trim: float, axis: int = -1) -> np.ndarray:
    cut = int(values.shape[axis] * trim)
    ordered = np.sort(values, axis=axis)
    return ordered.take(range(cut, values.shape[axis] - cut), axis=axis).mean(axis=axis)


def bootstrap(rounds: int, statistic: Any, draws: int = 1000) -> tuple[float, float]:
    """Seeded bootstrap 95 % interval of ``statistic(round indices)``, rounds resampled with replacement."""
    rng = np.random.default_rng(0)
    values = [statistic(rng.integers(0, rounds, rounds)) for _ in range(draws)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def pin(cpu: int) -> str:
    if cpu < 0 or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu} of {os.cpu_count()}"


def pinned_demo(cpu: int | None, prefix: str) -> tuple[str, torch.nn.Module, torch.Tensor, str, Path]:
    """One torch thread, pinned to ``cpu`` (default: the last allowed; -1: none), the demo model, a work directory:
    (how it is pinned, model, token ids, the model's label, directory)."""
    torch.set_num_threads(1)
    if cpu is None:
        cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1
    pinned = pin(cpu)
    model, ids, label = load_demo_model("cpu")
    return pinned, model, ids, label, Path(tempfile.mkdtemp(prefix=prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed; -1: none)")
    parser.add_argument("--trim", type=float, default=0.1, help="share of rounds cut at each end before the mean")
    parser.add_argument("--quantile", type=float, default=0.2, help="quantile of the decode steps' CPU times compared")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-round and per-step times here")
    args = parser.parse_args()
    pinned, model, ids, label, workdir = pinned_demo(args.cpu, "moeprobe-modes-")

    def run(name: str) -> tuple[float, float, np.ndarray]:
        gc.collect()  # every run starts from the same heap; collections during the run are its own
        options = VARIANTS[name]
        if options is None:
            return timed_decode_loop(model, ids, args.steps)
        with moeprobe.record(model, workdir / name.split()[0], force=True, **options):
            return timed_decode_loop(model, ids, args.steps)

    names = list(VARIANTS)
    for name in names:  # warm-up: first calls, allocator, the writer's first segment
        run(name)
    start_load = os.getloadavg()
    loops = {name: np.zeros((args.rounds, 2)) for name in names}  # wall, model-thread CPU of the whole loop
    steps = {name: np.zeros((args.rounds, args.steps)) for name in names}  # model-thread CPU of each decode step
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu_s, per_step = run(name)
            loops[name][r] = wall, cpu_s
            steps[name][r] = per_step
    end_load = os.getloadavg()
    q = args.quantile
    print(f"{label}; batch {list(ids.shape)}, prefill + {args.steps} decode steps, {args.rounds} rounds, 1 torch thread, {pinned}")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in start_load)}, after: {' '.join(f'{x:.2f}' for x in end_load)}")
    print("ratio to no probe [bootstrap 95 % interval over rounds]:")
    print(f"  loop: trimmed mean ({args.trim:.0%} cut each end) of per-round ratios of the whole loop (prefill + decode)")
    print(f"  step: the {q:.0%} quantile of all decode steps' model-thread CPU times, over that of no probe")
    print(f"  {'variant':<11} {'loop wall':>26} {'loop model-thread CPU':>26} {'step model-thread CPU':>26}")
    report: dict[str, Any] = {"label": label, "rounds": args.rounds, "steps": args.steps, "pinned": pinned, "quantile": q, "load_before": start_load, "load_after": end_load, "variants": {}}
    base_loops, base_steps = loops["none"], steps["none"]
    for name in names[1:]:
        ratios = loops[name] / base_loops
        cells, entry = [], {}
        for m, measure in enumerate(("loop wall", "loop model-thread CPU")):
            mean = float(trimmed_mean(ratios[:, m], args.trim))
            low, high = bootstrap(args.rounds, lambda pick, m=m, ratios=ratios: float(trimmed_mean(ratios[pick, m], args.trim)))
            cells.append(f"{mean:.4f} [{low:.4f}, {high:.4f}]")
            entry[measure] = {"ratio": mean, "low": low, "high": high}
        mine = steps[name]

        def step_ratio(pick: np.ndarray, mine: np.ndarray = mine) -> float:
            return float(np.quantile(mine[pick], q) / np.quantile(base_steps[pick], q))

        ratio = step_ratio(np.arange(args.rounds))
        low, high = bootstrap(args.rounds, step_ratio)
        cells.append(f"{ratio:.4f} [{low:.4f}, {high:.4f}]")
        entry["step model-thread CPU"] = {"ratio": ratio, "low": low, "high": high, "step_ms": float(np.quantile(mine, q) * 1e3)}
        report["variants"][name] = entry
        print(f"  {name:<11} " + " ".join(f"{c:>26}" for c in cells))
    print(f"  (no probe: loop {np.median(base_loops[:, 0]) * 1e3:.1f} ms wall, decode step {np.quantile(base_steps, q) * 1e3:.2f} ms CPU at the {q:.0%} quantile)")
    if args.json is not None:
        report["loops"] = {name: v.tolist() for name, v in loops.items()}
        report["steps"] = {name: v.tolist() for name, v in steps.items()}
        args.json.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
