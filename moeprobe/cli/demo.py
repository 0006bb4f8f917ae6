"""``moeprobe demo``: record the embedded demo models on bundled multi-domain prompts and compare them.

Layout of the output directory: one trace per model, ``DIR/balanced``, ``DIR/unbalanced`` (the trained
checkpoints, when shipped) and ``DIR/untrained`` (the same architecture with seeded random weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..traces.errors import TraceExistsError
from .args import Parser
from .invocation import moeprobe_command, shown_path

if TYPE_CHECKING:
    import numpy as np

HELP = "record the embedded demo models on bundled prompts and compare their routing"

_DESCRIPTIONS = {
    "balanced": "trained, aux-loss-free bias balancing",
    "unbalanced": "trained, no balancing",
    "untrained": "same architecture, random weights (seed 0)",
}


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="moeprobe demo", description=HELP)
    p.add_argument("-o", "--output", default="traces/demo", help="output directory (default: traces/demo)")
    p.add_argument("--force", action="store_true", help="overwrite the demo traces in DIR")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated greedily per prompt (default: 32)")
    return p


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TraceExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TraceExistsError(f"{out}: already exists; pass --force to overwrite the demo traces in it")


def _top_experts(table: np.ndarray, domains: list[str], n: int = 3) -> dict[str, list[tuple[int, float]]]:
    """Per domain, the ``n`` experts with the largest share of that domain's first choices."""
    out: dict[str, list[tuple[int, float]]] = {}
    for j, domain in enumerate(domains):
        column = table[:, j]
        total = max(float(column.sum()), 1.0)
        order = column.argsort()[::-1][:n]
        out[domain] = [(int(e), float(column[e]) / total) for e in order]
    return out


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        from .main import UsageError

        raise UsageError("--max-new-tokens must be at least 1")
    out = Path(args.output)
    _check_output(out, args.force)

    import torch
    from transformers.utils import logging as hf_logging

    import moeprobe

    from ..demo import checkpoints, metrics
    from ..demo.prompts import load_prompts
    from ..demo.run import UNTRAINED, load_model, record_model

    hf_logging.set_verbosity_error()
    # The demo models are tiny: extra threads only add synchronisation, and on a shared or busy CPU
    # spinning worker threads made recording up to 8x slower (measured: 4 s with 1 thread, 35 s with 2).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    prompts = load_prompts()
    names = [*checkpoints.available(), UNTRAINED]
    domains = sorted({p.domain for p in prompts})
    t0 = time.perf_counter()
    recordings = []
    for name in names:
        model = load_model(name)
        # --force reaches each trace: prepare_trace_dir only ever deletes a moeprobe trace.
        recordings.append(
            record_model(model, name, out / name, prompts, max_new_tokens=args.max_new_tokens, force=args.force)
        )
    elapsed = time.perf_counter() - t0

    prompt_tokens = len(prompts[0].text.encode()) + 1
    print(
        f"moeprobe demo: recorded {len(names)} model(s) on {len(prompts)} held-out prompts "
        f"({len(domains)} domains: {', '.join(domains)}), prefill {prompt_tokens} tokens + "
        f"{args.max_new_tokens} greedy tokens ({args.max_new_tokens - 1} decode steps), in {elapsed:.1f} s"
    )
    if not checkpoints.available():
        print("  (no trained checkpoints shipped; build them with: python -m moeprobe.demo.train --checkpoint balanced)")
    print("\ntraces:")
    width = max(len(str(rec.path)) for rec in recordings)
    for rec in recordings:
        print(f"  {str(rec.path):<{width}}  {_DESCRIPTIONS[rec.name]}")

    print("\nrouting on the prompt tokens (prefill), per model:")
    print(f"  {'model':<11} {'MaxVio_global':>14} {'NMI(first choice;':>19} {'best layer':>11}")
    print(f"  {'':<11} {'mean of layers':>14} {'domain), mean':>19} {'NMI':>11}")
    shares: dict[str, tuple[int, int, dict[str, list[tuple[int, float]]]]] = {}
    for rec in recordings:
        with moeprobe.open_trace(rec.path) as trace:
            rows = metrics.layer_metrics(trace)
            tables, table_domains = metrics.expert_domain_counts(trace)
        best = max(rows, key=lambda r: r.nmi)
        table = tables[best.layer]
        shares[rec.name] = (best.layer, table.shape[0], _top_experts(table, table_domains))
        print(
            f"  {rec.name:<11} {metrics.mean([r.max_vio for r in rows]):>14.3f} "
            f"{metrics.mean([r.nmi for r in rows]):>19.3f} {f'L{best.layer} {best.nmi:.3f}':>11}"
        )
    print("  MaxVio_global: (busiest expert - mean) / mean, 0 = perfectly balanced.")
    print("  NMI: how much the first-choice expert tells about the domain, 0..1, bias-corrected; `report` shows the")
    print("  same NMI over every top-k assignment of prefill and decode, which is lower.")

    name = recordings[0].name
    layer, n_experts, top = shares[name]
    print(f"\nbusiest first-choice experts per domain ({name}, MoE layer {layer}; uniform share {1 / n_experts:.0%}):")
    for domain, experts in top.items():
        print(f"  {domain:<6} " + "  ".join(f"e{e:<2} {share:>4.0%}" for e, share in experts))

    first = recordings[0]
    print(f"\ngreedy continuations ({first.name}), first prompt of each domain:")
    seen: set[str] = set()
    for prompt, cont in zip(prompts, first.continuations, strict=True):
        if prompt.domain in seen:
            continue
        seen.add(prompt.domain)
        print(f"  {prompt.domain:<6} ...{prompt.text[-40:]!r} -> {cont!r}")

    target = first.path
    moeprobe_cmd = moeprobe_command()  # `.venv/bin/moeprobe` when the venv is not on PATH (make demo)
    print("\nnext:")
    print(f"  {moeprobe_cmd} inspect {target}")
    print(f"  {moeprobe_cmd} report {target}")
    print(f"  {moeprobe_cmd} report {out / names[0]} {out / names[-1]} --compare")
    print(f"  {moeprobe_cmd} tui {target}")
    activate = Path(sys.prefix) / "bin" / "activate"
    if moeprobe_cmd != "moeprobe" and activate.exists():
        print(f"  (or first put moeprobe on PATH: source {shown_path(activate)})")
    return 0
