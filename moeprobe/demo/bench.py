"""Measure the shipped checkpoints with moeprobe and print the Markdown tables of BENCHMARKS.md.

    python -m moeprobe.demo.bench [--random-seeds 5]

Each model is recorded with ``moeprobe.record`` on the shipped held-out prompts exactly as ``moeprobe demo``
does; MaxVio_global and NMI(first-choice expert; domain) come from SQL over those traces
(:mod:`moeprobe.demo.metrics`). The random-weight baseline is the same architecture over several seeds, since
one random initialisation can be luckier than another.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .checkpoints import available, load_card, load_checkpoint
from .measure import routing_metrics
from .model import build_model
from .prompts import load_prompts


def _fmt(values: dict[str, float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeprobe.demo.bench", description=__doc__.splitlines()[0])
    p.add_argument("--random-seeds", type=int, default=5)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    prompts = load_prompts()
    results: dict[str, dict[str, Any]] = {}
    for name in available():
        results[name] = routing_metrics(load_checkpoint(name), name, prompts)
    for seed in range(args.random_seeds):
        results[f"random seed {seed}"] = routing_metrics(build_model(seed=seed), "random", prompts)

    print("| model | MaxVio_global per MoE layer | mean | NMI per MoE layer | mean | best |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {_fmt(r['max_vio_global'])} | {r['max_vio_global_mean']:.3f} | "
            f"{_fmt(r['nmi_expert_domain'])} | {r['nmi_expert_domain_mean']:.3f} | "
            f"{max(r['nmi_expert_domain'].values()):.3f} (L{r['nmi_best_layer']}) |"
        )
    randoms = [r for n, r in results.items() if n.startswith("random")]
    if randoms:
        layers = list(randoms[0]["nmi_expert_domain"])
        mean_random = {layer: statistics.mean(r["nmi_expert_domain"][layer] for r in randoms) for layer in layers}
        best_random = max(max(r["nmi_expert_domain"].values()) for r in randoms)
        print(f"\nrandom weights, {len(randoms)} seeds: NMI per layer (mean) {_fmt(mean_random)}, best of all {best_random:.3f}")
        for name in available():
            nmi = results[name]["nmi_expert_domain"]
            ratios = " / ".join(f"{nmi[layer] / mean_random[layer]:.2f}x" for layer in layers)
            print(f"{name}: NMI / random (same layer, seed mean) {ratios}; best layer / best random {max(nmi.values()) / best_random:.2f}x")
    if {"balanced", "unbalanced"} <= set(results):
        b, u = results["balanced"]["max_vio_global_mean"], results["unbalanced"]["max_vio_global_mean"]
        print(f"MaxVio_global mean over MoE layers: balanced {b:.3f}, unbalanced {u:.3f}, ratio {b / u:.3f}")

    print("\n| checkpoint | domain | held-out loss | train loss | unigram byte entropy | (nats/byte) |")
    print("|---|---|---|---|---|---|")
    for name in available():
        card = load_card(name)
        for domain, loss in card["held_out_loss_per_domain"].items():
            print(
                f"| {name} | {domain} | {loss:.3f} | {card['train_loss_per_domain'][domain]:.3f} | "
                f"{card['unigram_byte_entropy_per_domain'][domain]:.3f} | |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
