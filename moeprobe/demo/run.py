"""Record demo models on the held-out prompts: one prefill of all prompts, then greedy decoding.

All prompts have the same length, so the whole set runs as one unpadded batch; each batch row is tagged
with its domain and every sequence with the checkpoint name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import Prompt
from .tokenizer import decode, encode

UNTRAINED = "untrained"  # the baseline model: same architecture, seeded random weights (not "random": that
# word names the random-routing baseline of every metric)


@dataclass(frozen=True)
class Recording:
    name: str
    path: Path
    continuations: list[str]  # greedy continuation of each prompt, in prompt order


def load_model(name: str) -> Any:
    if name == UNTRAINED:
        from .model import build_model

        return build_model(seed=0)
    from .checkpoints import load_checkpoint

    return load_checkpoint(name)


def generate(model: Any, prompts: list[Prompt], max_new_tokens: int) -> list[str]:
    """Greedy continuations (no probe attached); used by tests and the training card."""
    import torch

    ids = torch.tensor([encode(p.text) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return [decode(row[ids.shape[1] :].tolist()) for row in out]


def record_model(
    model: Any, name: str, path: str | os.PathLike[str], prompts: list[Prompt], *, max_new_tokens: int, force: bool
) -> Recording:
    import torch

    import moeprobe

    ids = torch.tensor([encode(p.text) for p in prompts])
    with torch.no_grad(), moeprobe.record(model, path, force=force, logits=True, name=f"moeprobe-demo-{name}") as probe:
        probe.tag(domain=[p.domain for p in prompts], checkpoint=name)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # same number of decode steps for every model
            do_sample=False,
        )
    return Recording(name, Path(path), [decode(row[ids.shape[1] :].tolist()) for row in out])
