"""Train a demo checkpoint: ``python -m moeprobe.demo.train --checkpoint balanced|unbalanced``.

Both checkpoints start from the same seeded initialisation and see the same batches in the same order;
the only difference is the balancing:

- ``balanced``: aux-loss-free balancing (Wang et al. 2024, Algorithm 1; DeepSeek-V3). After each step,
  every MoE router's ``e_score_correction_bias`` moves by u·sign(c̄ − c_i), where c_i are the tokens routed
  to expert i in that step as counted by moeprobe's own capture hooks (``record(..., live_loads=True)``).
- ``unbalanced``: no balancing at all (no aux loss, bias stays zero).

The probe is attached in both runs so the progress bar can show the routing imbalance as it evolves.
Writes ``NAME.safetensors`` and the card ``NAME.json`` to ``moeprobe/demo/checkpoints/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from . import CHECKPOINT_NAMES
from .corpus import DOMAINS, build_corpus
from .measure import mean_loss, routing_metrics, unigram_entropy, windows
from .model import CONFIG, build_model, moe_routers
from .prompts import load_prompts
from .run import UNTRAINED, generate
from .tokenizer import BOS_ID

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 3000,
    "seqs_per_domain": 4,  # batch = 4 domains x 4 sequences, every domain in every step
    "seq_len": 128,
    "lr": 2e-3,
    "min_lr": 2e-4,
    "warmup": 100,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "bias_update_rate": 1e-3,  # u in b_i <- b_i + u * sign(mean_load - load_i)
    "eval_windows": 48,
}
EXPECTED_TOKENS = 16  # greedy continuation stored in the card and checked by the tests


def _lr(step: int, cfg: dict[str, Any]) -> float:
    # Linear warm-up, then cosine decay to min_lr: the usual schedule, robust for tiny models.
    if step < cfg["warmup"]:
        return float(cfg["lr"] * (step + 1) / cfg["warmup"])
    progress = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return float(cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress)))


def _batch(rng: random.Random, train: dict[str, bytes], cfg: dict[str, Any]) -> list[list[int]]:
    rows: list[list[int]] = []
    for domain in DOMAINS:
        data = train[domain]
        for _ in range(cfg["seqs_per_domain"]):
            start = rng.randrange(len(data) - cfg["seq_len"])
            rows.append([BOS_ID, *data[start : start + cfg["seq_len"]]])
    return rows


def _max_vio(loads: list[Any]) -> float:
    vios = [float((c.max() - c.float().mean()) / c.float().mean()) for c in loads if c.sum() > 0]
    return sum(vios) / len(vios) if vios else float("nan")


def train(checkpoint: str, out: Path, cfg: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    import moeprobe

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    t_start = time.perf_counter()

    corpus = build_corpus()
    train_text = {d: corpus[d].train for d in DOMAINS}
    model = build_model(seed=cfg["seed"]).train()
    routers = moe_routers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    balanced = checkpoint == "balanced"
    u = cfg["bias_update_rate"]

    losses: list[float] = []
    ema = float("nan")
    bar = tqdm(range(cfg["steps"]), desc=checkpoint, unit="step", mininterval=2.0)
    with moeprobe.record(model, None, live_loads=True) as probe:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, cfg)
            ids = torch.tensor(_batch(rng, train_text, cfg))
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            loads = probe.take_loads()  # tokens per expert per MoE layer in this step, from the hooks
            if balanced:
                with torch.no_grad():
                    for router, load in zip(routers, loads, strict=True):
                        mean = load.sum() / load.numel()
                        # the bias is a buffer (not a parameter): update it in place, outside autograd
                        router.e_score_correction_bias.add_(u * torch.sign(mean - load.float()))
            value = loss.item()
            losses.append(value)
            ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
            if step % 20 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", maxvio=f"{_max_vio(loads):.2f}", lr=f"{_lr(step, cfg):.1e}")
    train_seconds = time.perf_counter() - t_start
    model.eval()

    n_eval = cfg["eval_windows"]
    held = {
        d: round(mean_loss(model, windows(corpus[d].held_out, n_eval, cfg["seq_len"], exclude=corpus[d].train)), 4)
        for d in DOMAINS
    }
    train_eval = {d: round(mean_loss(model, windows(corpus[d].train, n_eval, cfg["seq_len"])), 4) for d in DOMAINS}
    entropy = {d: round(unigram_entropy(corpus[d].held_out), 4) for d in DOMAINS}
    prompts = load_prompts()
    expected = generate(model, prompts[:1], EXPECTED_TOKENS)[0]
    routing = routing_metrics(model, checkpoint, prompts)
    baseline = routing_metrics(build_model(seed=cfg["seed"]), UNTRAINED, prompts)

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    weights = out / f"{checkpoint}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"checkpoint": checkpoint, "format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; package data must be readable by everyone

    import transformers

    card: dict[str, Any] = {
        "name": checkpoint,
        "description": (
            "aux-loss-free balancing: b_i <- b_i + u*sign(mean_load - load_i) after every step, loads counted "
            "by moeprobe.record(model, None, live_loads=True)"
            if balanced
            else "no load balancing (no aux loss, correction bias stays 0)"
        ),
        "architecture": "transformers DeepseekV3ForCausalLM",
        "config": CONFIG,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "weights_bytes": weights.stat().st_size,
        "seed": cfg["seed"],
        "training": {**cfg, "batch_sequences": cfg["seqs_per_domain"] * len(DOMAINS), "threads": threads},
        "steps": cfg["steps"],
        "tokens_seen": cfg["steps"] * cfg["seqs_per_domain"] * len(DOMAINS) * cfg["seq_len"],
        "train_minutes": round(train_seconds / 60, 2),
        "corpus_bytes": {d: {"train": len(corpus[d].train), "held_out": len(corpus[d].held_out)} for d in DOMAINS},
        "final_train_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
        "loss_units": "nats per byte (next-byte cross-entropy)",
        "train_loss_per_domain": train_eval,
        "held_out_loss_per_domain": held,
        "unigram_byte_entropy_per_domain": entropy,
        "routing": routing,
        "routing_random_weights": baseline,
        "expected_continuation": {"prompt_index": 0, "max_new_tokens": EXPECTED_TOKENS, "text": expected},
        "bias_final": {str(i): [round(float(x), 4) for x in r.e_score_correction_bias] for i, r in enumerate(routers)},
        "command": "python -m moeprobe.demo.train " + " ".join(sys.argv[1:]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out / f"{checkpoint}.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeprobe.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, choices=CHECKPOINT_NAMES)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: train both at once)")
    args = p.parse_args(argv)
    cfg = {**DEFAULTS, "steps": args.steps}
    card = train(args.checkpoint, args.out, cfg, args.threads)
    print(
        f"{card['name']}: {card['steps']} steps in {card['train_minutes']} min; held-out loss "
        + ", ".join(f"{d} {v:.3f}" for d, v in card["held_out_loss_per_domain"].items())
        + f"; MaxVio_global {card['routing']['max_vio_global_mean']:.3f}; "
        f"NMI mean {card['routing']['nmi_expert_domain_mean']:.3f} (random {card['routing_random_weights']['nmi_expert_domain_mean']:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
