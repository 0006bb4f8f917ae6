"""Cost of each capture mode on the demo decode loop, with the modes interleaved step by step.

    python bench/capture_interleaved.py [--rounds 600] [--rounds-per-prefill 20] [--loop-steps 48] [--cpu N]

capture_modes.py compares whole decode loops, each under its own ``record()``: neighbouring loops are a second
apart, and on a shared 2-core machine its A/A control spreads +-5 %, which cannot resolve a 1 % target. Here
every variant's probe is attached once, to the same model, and kept open; between two decode steps the script
installs one variant's attachment (its forward hooks and wrapped forwards, swapped in as the module attributes
torch reads them from) or none. A round is one decode step of each variant, in a seeded random order, all on the
same KV cache, so the steps compared are milliseconds apart and differ by at most a few cached tokens; a new
prefill (not timed) starts every ``--rounds-per-prefill`` rounds. Per round and variant the model thread's CPU time
of the step (``time.thread_time``: what capture adds to the job's critical path) and its wall time are taken.

A variant's ratio is ``1 + mean(its step - the round's no-probe step) / mean(no-probe step)`` over all rounds, with
a seeded bootstrap 95 % interval over rounds. It is a plain mean on purpose: graph capture and counts mode drain
their rings every 32 of their own steps, so one round in 32 carries a drain, and a trimmed mean would cut exactly
those rounds out. Everything capture does on the model's thread is inside the timed steps: the hooks or wrappers,
torch's slower call path for a module with hooks, the end-of-step hand-over and the drains. A trimmed mean of the
per-round ratios (robust to outliers, blind to the drains) is printed beside it for comparison.

Every ``--rounds-per-prefill`` rounds a prefill round runs each variant's prefill of the batch on a fresh cache, in
random order (timed the same way; the decode rounds go on from the last one). The demo decode loop's ratio
(capture_overhead.py's loop: a prefill, then ``--loop-steps`` decode steps) is then ``(mean prefill + n x mean
decode step)`` of the variant over the same of no probe; the decode-step ratio alone is the stricter figure
(capture costs about the same per call, and a decode step is the shortest call).

``none (A/A)`` is a second no-probe step in every round: its ratio should read 1.000 and its interval is this run's
resolution. A target is resolved when a variant's interval lies on one side of it.

What this design does not see: the writer thread (it runs beside the model; pinned to the same CPU it shows in
wall time, not in the model thread's CPU time) and garbage collections that a variant's allocations bring forward
(they run in whichever step crosses the threshold). The per-probe traces are not meaningful (each probe sees one
decode step in five and no prefill); they are written and closed like any other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprobe  # noqa: E402
from capture_modes import VARIANTS, bootstrap, pinned_demo, trimmed_mean  # noqa: E402  (the same variants as there)

# Where torch keeps a module's forward hooks (``Module._call_impl`` takes its fast path when all are empty).
_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_NO_FORWARD = object()

Attachment = list[tuple[torch.nn.Module, dict[str, Any], Any]]  # (module, hook dicts by attribute, forward or _NO_FORWARD)


def attachment(model: torch.nn.Module) -> Attachment:
    """What is attached to ``model`` now: every module's hook dicts (the objects themselves) and instance forward."""
    return [(m, {a: getattr(m, a) for a in _HOOK_ATTRS}, m.__dict__.get("forward", _NO_FORWARD)) for m in model.modules()]


def install(state: Attachment) -> None:
    for module, hooks, forward in state:
        for attr, value in hooks.items():
            setattr(module, attr, value)
        if forward is _NO_FORWARD:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = forward


def bare(original: Attachment) -> Attachment:
    """``original`` in fresh dict objects: a probe attached after installing it registers into dicts of its own."""
    return [(m, {a: type(d)(d) for a, d in hooks.items()}, forward) for m, hooks, forward in original]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--rounds-per-prefill", type=int, default=20, help="decode rounds on one KV cache before a new prefill")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed; -1: none)")
    parser.add_argument("--trim", type=float, default=0.1, help="share of rounds cut at each end before the mean")
    parser.add_argument("--loop-steps", type=int, default=48, help="decode steps of the demo loop (capture_overhead.py's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write every step's times here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (none is always run)")
    parser.add_argument(
        "--mask", action="store_true",
        help="pass an attention mask and positions with every call, as generate() does (all ones: no padding)",
    )
    args = parser.parse_args()
    from transformers import DynamicCache

    pinned, model, ids, label, workdir = pinned_demo(args.cpu, "moeprobe-interleaved-")
    names = ["none"] + [n for n in args.variants.split(",") if n != "none"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")

    def extra(tokens: torch.Tensor, past: int) -> dict[str, torch.Tensor]:
        """--mask: what generate() gives the model besides the tokens (built before the timed call)."""
        if not args.mask:
            return {}
        batch, seq_len = tokens.shape
        return {
            "attention_mask": torch.ones((batch, past + seq_len), dtype=torch.int64),
            "position_ids": torch.arange(past, past + seq_len).expand(batch, seq_len),
        }

    original = attachment(model)
    states: dict[str, Attachment] = {}
    probes: dict[str, Any] = {}
    for name in names:
        options = VARIANTS[name]
        install(bare(original))
        if options is not None:
            probes[name] = moeprobe.record(model, workdir / name.split()[0], force=True, **options)
            # The attachment as it stands after a first call: graph capture and counts mode remove what that call
            # shows they do not need (the drain hook on the model, the experts' fallback wrappers).
            model(ids[:, :4], past_key_values=DynamicCache(), use_cache=True, **extra(ids[:, :4], 0))
        states[name] = attachment(model)

    def prefill(name: str = "none") -> tuple[Any, torch.Tensor]:
        install(states[name])
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True, **extra(ids, 0))
        return cache, out.logits[:, -1:].argmax(-1)

    rng = np.random.default_rng(0)
    clock, wall_clock = time.thread_time_ns, time.perf_counter_ns
    cpu_ns = {name: np.zeros(args.rounds) for name in names}
    wall_ns = {name: np.zeros(args.rounds) for name in names}
    prefills = -(-args.rounds // args.rounds_per_prefill)
    prefill_ns = {name: np.zeros(prefills) for name in names}  # model-thread CPU of each variant's prefill
    try:
        for _ in range(3):  # first calls, allocator, each writer's first segment
            cache, token = prefill()
            for name in names:
                install(states[name])
                token = model(token, past_key_values=cache, use_cache=True, **extra(token, cache.get_seq_length())).logits[:, -1:].argmax(-1)
        gc.collect()
        start_load = os.getloadavg()
        for r in range(args.rounds):
            if r % args.rounds_per_prefill == 0:
                # A prefill round: every variant prefills the batch on a fresh cache, in random order (identical
                # outputs); the decode rounds go on from the last one.
                for j in rng.permutation(len(names)):
                    t = clock()
                    cache, token = prefill(names[j])
                    prefill_ns[names[j]][r // args.rounds_per_prefill] = clock() - t
            for j in rng.permutation(len(names)):
                name = names[j]
                install(states[name])
                given = extra(token, cache.get_seq_length())
                w, t = wall_clock(), clock()
                out = model(token, past_key_values=cache, use_cache=True, **given)
                cpu_ns[name][r], wall_ns[name][r] = clock() - t, wall_clock() - w
                token = out.logits[:, -1:].argmax(-1)
        end_load = os.getloadavg()
    finally:
        for name, probe in probes.items():
            install(states[name])
            probe.close()
        install(original)

    print(f"{label}; batch {list(ids.shape)}, {args.rounds} rounds of one decode step per variant (random order), "
          f"a new prefill every {args.rounds_per_prefill} rounds, 1 torch thread, {pinned}")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in start_load)}, after: {' '.join(f'{x:.2f}' for x in end_load)}")
    print("ratio to no probe: 1 + mean(step - the round's no-probe step) / mean(no-probe step) [bootstrap 95 % interval];")
    print(f"  trimmed: mean of per-round ratios, {args.trim:.0%} cut at each end (blind to drains, see above)")
    print(f"  {'variant':<11} {'model-thread CPU':>26} {'wall':>26} {'CPU us/step':>12} {'trimmed CPU':>12}")
    base_cpu, base_wall = cpu_ns["none"], wall_ns["none"]
    for name in names[1:]:
        cells = []
        for mine, base in ((cpu_ns[name], base_cpu), (wall_ns[name], base_wall)):
            extra = mine - base

            def ratio(pick: np.ndarray, extra: np.ndarray = extra, base: np.ndarray = base) -> float:
                return 1.0 + float(extra[pick].mean() / base[pick].mean())

            low, high = bootstrap(args.rounds, ratio)
            cells.append(f"{ratio(np.arange(args.rounds)):.4f} [{low:.4f}, {high:.4f}]")
        extra_us = float((cpu_ns[name] - base_cpu).mean()) / 1e3
        trimmed = float(trimmed_mean(cpu_ns[name] / base_cpu, args.trim))
        print(f"  {name:<11} {cells[0]:>26} {cells[1]:>26} {extra_us:12.1f} {trimmed:12.4f}")
    print(f"  (no probe: decode step {base_cpu.mean() / 1e6:.2f} ms model-thread CPU, {base_wall.mean() / 1e6:.2f} ms wall, means)")
    n = args.loop_steps
    base_prefill = prefill_ns["none"]
    print(f"the demo decode loop (capture_overhead.py's: a prefill of the batch, then {n} decode steps), model-thread CPU:")
    print(f"  ratio = (mean prefill + {n} x mean decode step) of the variant / the same of no probe [bootstrap 95 % interval,")
    print(f"  prefill rounds ({prefills}) and decode rounds resampled independently]")
    rng_boot = np.random.default_rng(1)
    for name in names[1:]:
        mine_prefill, mine = prefill_ns[name], cpu_ns[name]

        def loop_ratio(p: np.ndarray, d: np.ndarray, mine_prefill: np.ndarray = mine_prefill, mine: np.ndarray = mine) -> float:
            return float((mine_prefill[p].mean() + n * mine[d].mean()) / (base_prefill[p].mean() + n * base_cpu[d].mean()))

        draws = [loop_ratio(rng_boot.integers(0, prefills, prefills), rng_boot.integers(0, args.rounds, args.rounds)) for _ in range(1000)]
        whole = loop_ratio(np.arange(prefills), np.arange(args.rounds))
        extra_prefill = float((mine_prefill - base_prefill).mean()) / 1e3
        print(f"  {name:<11} {whole:.4f} [{np.percentile(draws, 2.5):.4f}, {np.percentile(draws, 97.5):.4f}]   prefill +{extra_prefill:.0f} us")
    print(f"  (no probe: prefill {base_prefill.mean() / 1e6:.1f} ms model-thread CPU, mean)")
    if args.json is not None:
        args.json.write_text(json.dumps({"label": label, "pinned": pinned, "load_before": start_load, "load_after": end_load,
                                         "cpu_ns": {n: v.tolist() for n, v in cpu_ns.items()},
                                         "prefill_ns": {n: v.tolist() for n, v in prefill_ns.items()},
                                         "wall_ns": {n: v.tolist() for n, v in wall_ns.items()}}))

if __name__ == "__main__":
    main()
