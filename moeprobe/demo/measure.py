"""Numbers for the checkpoint cards and BENCHMARKS.md: losses, byte entropy, and routing metrics
measured by recording the model with moeprobe on the shipped held-out prompts."""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from . import metrics
from .prompts import Prompt
from .tokenizer import BOS_ID


def unigram_entropy(data: bytes) -> float:
    """Entropy of the byte distribution of ``data``, in nats per byte (the loss of the best unigram model)."""
    counts = Counter(data)
    n = len(data)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def windows(data: bytes, count: int, length: int, *, exclude: bytes = b"") -> list[list[int]]:
    """``count`` evenly spaced windows of ``length`` bytes, each prefixed with BOS.

    A candidate that occurs verbatim in ``exclude`` (the training text) is skipped for the next one, so
    duplicated boilerplate (licence headers, repeated docstrings) does not count as held-out.
    """
    candidates = 4 * count
    stride = (len(data) - length - 1) // candidates
    out: list[list[int]] = []
    for i in range(0, candidates):
        window = data[i * stride : i * stride + length]
        if window not in exclude:
            out.append([BOS_ID, *window])
        if len(out) == count:
            break
    return out


def mean_loss(model: Any, batch: list[list[int]], chunk: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) over all predicted positions of ``batch``."""
    import torch

    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(batch), chunk):
            ids = torch.tensor(batch[i : i + chunk])
            out = model(input_ids=ids, labels=ids)
            predicted = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.loss) * predicted
            n += predicted
    model.train(was_training)
    return total / n


def routing_metrics(model: Any, name: str, prompts: list[Prompt], max_new_tokens: int = 32) -> dict[str, Any]:
    """Record ``model`` as ``moeprobe demo`` does and compute MaxVio_global and NMI per MoE layer."""
    import moeprobe

    from .run import record_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        record_model(model, name, path, prompts, max_new_tokens=max_new_tokens, force=False)
        with moeprobe.open_trace(path) as trace:
            rows = metrics.layer_metrics(trace)
            tables, domains = metrics.expert_domain_counts(trace)
    best = max(rows, key=lambda r: r.nmi)
    return {
        "measured_on": f"{len(prompts)} held-out prompts, prefill tokens only ({rows[0].tokens} per layer)",
        "max_vio_global": {str(r.layer): round(r.max_vio, 4) for r in rows},
        "max_vio_global_mean": round(metrics.mean([r.max_vio for r in rows]), 4),
        "nmi_expert_domain": {str(r.layer): round(r.nmi, 4) for r in rows},
        "nmi_expert_domain_mean": round(metrics.mean([r.nmi for r in rows]), 4),
        "nmi_best_layer": best.layer,
        # Per-domain share of first choices for the most specialised layer (Mixtral Fig. 7 style).
        "first_choice_share_best_layer": {
            d: [round(float(x), 3) for x in tables[best.layer][:, j] / max(tables[best.layer][:, j].sum(), 1)]
            for j, d in enumerate(domains)
        },
    }
