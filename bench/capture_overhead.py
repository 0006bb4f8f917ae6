"""Capture overhead on the demo model's decode loop: moeprobe against no probe and two naive peers.

    python bench/capture_overhead.py [--device cpu|cuda] [--rounds 7]

Variants, all on the same greedy KV-cached decode loop over the bundled prompts:
  baseline           no instrumentation
  moeprobe           inside moeprobe.record(model, DIR)
  naive_hook         a forward hook on every router doing .cpu().tolist() of indices and weights
  hf_router_logits   transformers' own output_router_logits=True, kept for every step
  moeprobe_metrics   moeprobe.record(model, DIR, metrics_port=0) while another process scrapes /metrics every
                     --scrape-interval seconds (the endpoint's cost to the model, docs/prometheus.md)
  moeprobe_graph     moeprobe.record(..., capture="graph"): the graph-safe capture ops, drained every step
  moeprobe_counts    moeprobe.record(..., mode="counts"): per step x layer x expert counts on the device
plus model.generate() with and without moeprobe. Rounds interleave the variants (rotating their order) so
machine noise hits all of them alike; the ratio is median(variant) / median(baseline) within this one run.
On CUDA the naive hook synchronises the host in every layer; moeprobe must not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import moeprobe  # noqa: E402


def load_demo_model(device: str) -> tuple[torch.nn.Module, torch.Tensor, str]:
    from moeprobe.demo import checkpoints
    from moeprobe.demo.model import build_model
    from moeprobe.demo.prompts import load_prompts
    from moeprobe.demo.tokenizer import encode

    names = checkpoints.available()
    if names:
        model, label = checkpoints.load_checkpoint(names[0]), f"demo checkpoint {names[0]!r}"
    else:
        model, label = build_model(seed=0), "demo architecture, seeded random weights"
    prompts = load_prompts()[::4][:8]
    ids = torch.tensor([encode(p.text) for p in prompts])
    return model.to(device).eval(), ids.to(device), label


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_loop(model: torch.nn.Module, ids: torch.Tensor, steps: int, *, keep_router_logits: bool = False) -> list[Any]:
    from transformers import DynamicCache

    cache = DynamicCache()
    kept: list[Any] = []
    out = model(ids, past_key_values=cache, use_cache=True, output_router_logits=keep_router_logits)
    for _ in range(steps):
        if keep_router_logits:
            kept.append(out.router_logits)
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True, output_router_logits=keep_router_logits)
    return kept


CPU_TIMES: dict[int, float] = {}


def _r(table: dict[str, float], numerator: str, denominator: str) -> float | None:
    """table[numerator] / table[denominator], None when a variant did not run (--variants)."""
    if numerator not in table or denominator not in table:
        return None
    return table[numerator] / table[denominator]


def _median_ci(values: Any, draws: int = 2000) -> tuple[float, float, float]:
    """Median and a seeded bootstrap 95 % interval of it."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(values, size=(draws, len(values)), replace=True), axis=1)
    return float(np.median(values)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))
THREAD_TIMES: dict[int, float] = {}  # CPU seconds of the calling (model's) thread only

# Scrapes URL every INTERVAL seconds until terminated, printing one line per answered scrape.
SCRAPER = """
import sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
while True:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    print(flush=True)
    time.sleep(interval)
"""


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of fn; its process CPU seconds (all threads, so the writer thread counts) are kept in
    CPU_TIMES under the same key. CPU time is far less disturbed by other processes on a shared machine."""
    sync(device)
    start, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    fn()
    sync(device)
    wall = time.perf_counter() - start
    CPU_TIMES[id(fn)] = time.process_time() - cpu
    THREAD_TIMES[id(fn)] = time.thread_time() - own
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=48, help="decode steps after the prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core "
                        "machine, 2 OpenMP threads meeting another busy process made identical runs vary 100x)")
    parser.add_argument("--scrape-interval", type=float, default=0.25, metavar="S",
                        help="seconds between scrapes of the metrics endpoint (default 0.25: 60x Prometheus's default)")
    parser.add_argument("--variants", help="comma-separated subset to run, e.g. baseline,moeprobe,moeprobe_metrics")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = args.device
    model, ids, label = load_demo_model(device)
    workdir = Path(tempfile.mkdtemp(prefix="moeprobe-bench-"))
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]

    def baseline() -> None:
        decode_loop(model, ids, args.steps)

    def with_moeprobe() -> None:
        loop = lambda: decode_loop(model, ids, args.steps)  # noqa: E731
        with moeprobe.record(model, workdir / "t", force=True) as probe:
            t = timed(loop, device)
            inner_cpu = CPU_TIMES[id(loop)]
            thread["moeprobe_inner"].append(THREAD_TIMES[id(loop)])
        # The writer's work for these steps may finish after the block: count the close too in CPU terms.
        closing["s"] = probe  # keep a reference for the counters
        times["moeprobe_inner"].append(t)
        cpu["moeprobe_inner"].append(inner_cpu)

    def with_metrics() -> None:
        loop = lambda: decode_loop(model, ids, args.steps)  # noqa: E731
        with moeprobe.record(model, workdir / "m", force=True, metrics_port=0) as probe:
            # A separate process scrapes, as Prometheus would: its parsing is not this process's work.
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, probe.metrics_url, str(args.scrape_interval)],
                                       stdout=subprocess.PIPE, text=True)
            assert scraper.stdout is not None
            scraper.stdout.readline()  # the first scrape answered: the endpoint is up before the loop starts
            t = timed(loop, device)
            thread["moeprobe_metrics_inner"].append(THREAD_TIMES[id(loop)])
            scraper.terminate()
            scrapes["n"] += int(scraper.communicate()[0].count("\n")) + 1
        times["moeprobe_metrics_inner"].append(t)

    def probe_variant(name: str, **options: Any) -> Callable[[], None]:
        # Graph capture and counts mode, timed inside the `with` block like the hook capture above.
        def run() -> None:
            loop = lambda: decode_loop(model, ids, args.steps)  # noqa: E731
            with moeprobe.record(model, workdir / name, force=True, **options):
                t = timed(loop, device)
            times[f"{name}_inner"].append(t)

        return run

    def naive_hook() -> None:
        sink: list[Any] = []

        def hook(module: Any, inputs: Any, output: Any) -> None:
            sink.append((output[2].cpu().tolist(), output[1].cpu().tolist()))

        handles = [r.register_forward_hook(hook) for r in routers]
        try:
            decode_loop(model, ids, args.steps)
        finally:
            for h in handles:
                h.remove()

    def hf_router_logits() -> None:
        decode_loop(model, ids, args.steps, keep_router_logits=True)

    def generate_plain() -> None:
        model.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)

    def generate_probe() -> None:
        with moeprobe.record(model, workdir / "g", force=True):
            t = timed(generate_plain, device)
        times["generate_moeprobe_inner"].append(t)

    closing: dict[str, Any] = {}
    scrapes = {"n": 0}
    thread: dict[str, list[float]] = {"moeprobe_inner": [], "moeprobe_metrics_inner": []}
    variants: dict[str, Callable[[], None]] = {
        "baseline": baseline,
        "moeprobe": with_moeprobe,
        "moeprobe_metrics": with_metrics,
        "naive_hook": naive_hook,
        "hf_router_logits": hf_router_logits,
        "generate": generate_plain,
        "generate_moeprobe": generate_probe,
        "moeprobe_graph": probe_variant("moeprobe_graph", capture="graph"),
        "moeprobe_counts": probe_variant("moeprobe_counts", mode="counts"),
    }
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(variants)
        if unknown or "baseline" not in wanted:
            parser.error(f"--variants: unknown {sorted(unknown)} (baseline is required); known: {', '.join(variants)}")
        variants = {name: fn for name, fn in variants.items() if name in wanted}
    times: dict[str, list[float]] = {name: [] for name in variants}
    times["moeprobe_inner"] = []
    times["moeprobe_graph_inner"] = []
    times["moeprobe_counts_inner"] = []
    times["generate_moeprobe_inner"] = []
    times["moeprobe_metrics_inner"] = []
    cpu: dict[str, list[float]] = {name: [] for name in times}
    for fn in variants.values():  # warm-up: allocator, kernels, lazy imports
        fn()
    for name in times:
        times[name].clear()
        cpu[name].clear()
    scrapes["n"] = 0
    for values in thread.values():
        values.clear()
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(variants[name], device))
            cpu[name].append(CPU_TIMES[id(variants[name])])

    med = {name: statistics.median(v) for name, v in times.items() if v}
    cpu_med = {name: statistics.median(v) for name, v in cpu.items() if v}
    best = {name: min(v) for name, v in times.items() if v}
    # moeprobe's ratio uses the time inside the `with` block (the job's own loop); attaching the hooks and
    # the final flush at close happen once per job and are reported separately.
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": label,
        "batch": list(ids.shape),
        "decode_steps": args.steps,
        "rounds": args.rounds,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio": {
            "moeprobe": _r(med, "moeprobe_inner", "baseline"),
            "moeprobe + metrics endpoint": _r(med, "moeprobe_metrics_inner", "baseline"),
            "moeprobe + metrics / moeprobe": _r(med, "moeprobe_metrics_inner", "moeprobe_inner"),
            "naive_hook (.cpu().tolist())": _r(med, "naive_hook", "baseline"),
            "hf output_router_logits": _r(med, "hf_router_logits", "baseline"),
            "generate + moeprobe": _r(med, "generate_moeprobe_inner", "generate"),
            "moeprobe graph capture": _r(med, "moeprobe_graph_inner", "baseline"),
            "moeprobe counts mode": _r(med, "moeprobe_counts_inner", "baseline"),
        },
        # The fastest of the interleaved rounds is the run least disturbed by the rest of the machine.
        "best_ratio": {
            "moeprobe": _r(best, "moeprobe_inner", "baseline"),
            "moeprobe + metrics endpoint": _r(best, "moeprobe_metrics_inner", "baseline"),
            "moeprobe + metrics / moeprobe": _r(best, "moeprobe_metrics_inner", "moeprobe_inner"),
            "naive_hook (.cpu().tolist())": _r(best, "naive_hook", "baseline"),
            "hf output_router_logits": _r(best, "hf_router_logits", "baseline"),
            "generate + moeprobe": _r(best, "generate_moeprobe_inner", "generate"),
            "moeprobe graph capture": _r(best, "moeprobe_graph_inner", "baseline"),
            "moeprobe counts mode": _r(best, "moeprobe_counts_inner", "baseline"),
        },
        "cpu_ratio": {
            # whole `with` block incl. attach, close and the writer thread's final flush
            "moeprobe (incl. attach, writer, close)": _r(cpu_med, "moeprobe", "baseline"),
            "moeprobe + metrics (incl. endpoint start/stop, serving)": _r(cpu_med, "moeprobe_metrics", "baseline"),
            "naive_hook (.cpu().tolist())": _r(cpu_med, "naive_hook", "baseline"),
            "hf output_router_logits": _r(cpu_med, "hf_router_logits", "baseline"),
            "generate + moeprobe (incl. attach, writer, close)": _r(cpu_med, "generate_moeprobe", "generate"),
        },
        "moeprobe_attach_and_close_s": med["moeprobe"] - med["moeprobe_inner"] if "moeprobe" in med else None,
        "dropped": closing["s"].stats.get("dropped") if "s" in closing else None,
        "scrapes_per_round": scrapes["n"] / args.rounds,
        "scrape_interval_s": args.scrape_interval,
    }
    if times["moeprobe_metrics_inner"] and times["moeprobe_inner"]:
        # Same round, adjacent in the rotation: the pair least apart in machine noise. The interval is a
        # bootstrap 95 % interval of that median: when it contains 1, the endpoint's cost is below what this
        # machine can resolve.
        paired = np.array(times["moeprobe_metrics_inner"]) / np.array(times["moeprobe_inner"])
        own = np.array(thread["moeprobe_metrics_inner"]) / np.array(thread["moeprobe_inner"])
        results["metrics_vs_moeprobe_paired"] = _median_ci(paired)
        # CPU time of the model's own thread: work the endpoint would add there (none by design).
        results["metrics_vs_moeprobe_model_thread_cpu"] = _median_ci(own)
    for key in ("ratio", "best_ratio", "cpu_ratio"):
        results[key] = {name: value for name, value in results[key].items() if value is not None}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"device {results['device']}; {label}; batch {results['batch']}, {args.steps} decode steps, {args.rounds} rounds")
    print("  wall time, median ratio:")
    for name, ratio in results["ratio"].items():
        print(f"    {name:<48} {ratio:6.3f}x baseline")
    print("  wall time, fastest round ratio:")
    for name, ratio in results["best_ratio"].items():
        print(f"    {name:<48} {ratio:6.3f}x baseline")
    print("  process CPU time (all threads), median ratio:")
    for name, ratio in results["cpu_ratio"].items():
        print(f"    {name:<48} {ratio:6.3f}x baseline")
    print(f"  moeprobe attach + close (once per job): {results['moeprobe_attach_and_close_s'] * 1000:.1f} ms; dropped: {results['dropped'] or 'none'}")
    if "metrics_vs_moeprobe_paired" in results:
        wall_ci, own_ci = results["metrics_vs_moeprobe_paired"], results["metrics_vs_moeprobe_model_thread_cpu"]
        print(f"  metrics endpoint: {results['scrapes_per_round']:.1f} scrapes per round, one every {args.scrape_interval} s")
        print(f"    moeprobe with / without the endpoint, per-round ratio: wall {wall_ci[0]:.3f} (95% CI {wall_ci[1]:.3f}-"
              f"{wall_ci[2]:.3f}), model-thread CPU {own_ci[0]:.3f} (95% CI {own_ci[1]:.3f}-{own_ci[2]:.3f})")


if __name__ == "__main__":
    main()
