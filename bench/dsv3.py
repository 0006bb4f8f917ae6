"""DeepSeek-V3-shaped synthetic routing for the writer and trace-size benchmarks.

58 MoE layers, top-8 of 256 experts, a 129,280-token vocabulary. Experts are drawn without replacement
(Gumbel top-k) from a skewed per-layer popularity and handed over unsorted, as DeepSeek-V3's
``topk(sorted=False)`` does; weights are the chosen sigmoid scores normalised to sum 1 and scaled by 2.5
(``routed_scaling_factor``); token ids follow a Zipf law; positions run along each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeprobe.hooks.capture import LayerCapture, StepBuffer
from moeprobe.hooks.token_context import NEW, TokenContext

LAYERS = 58
EXPERTS = 256
TOP_K = 8
VOCAB = 129_280


@dataclass
class Routing:
    """One step's routing: experts and weights (layers, tokens, k), token ids and positions (tokens,)."""

    experts: np.ndarray
    weights: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray

    @property
    def decisions(self) -> int:
        return int(self.experts.size)


def make_routing(tokens: int, seq_len: int, seed: int) -> Routing:
    rng = np.random.default_rng(seed)
    experts = np.empty((LAYERS, tokens, TOP_K), np.int32)
    weights = np.empty((LAYERS, tokens, TOP_K), np.float32)
    for layer in range(LAYERS):
        popularity = rng.normal(0.0, 1.0, EXPERTS).astype(np.float32)
        logits = popularity + rng.gumbel(size=(tokens, EXPERTS)).astype(np.float32)
        top = np.argpartition(-logits, TOP_K, axis=1)[:, :TOP_K]
        chosen = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, top, axis=1) / 4.0))
        experts[layer] = top
        weights[layer] = 2.5 * chosen / chosen.sum(axis=1, keepdims=True)
    token_ids = np.minimum(rng.zipf(1.2, tokens), VOCAB - 1).astype(np.int32)
    positions = (np.arange(tokens) % seq_len).astype(np.int32)
    return Routing(experts, weights, token_ids, positions)


def layer_meta() -> list[dict[str, object]]:
    return [
        {
            "index": i,
            "name": f"model.layers.{i + 3}.mlp",
            "router": f"model.layers.{i + 3}.mlp.gate",
            "num_experts": EXPERTS,
            "top_k": TOP_K,
            "num_shared_experts": 1,
            "scoring": "sigmoid",
        }
        for i in range(LAYERS)
    ]


def make_step(step: int, routing: Routing, batch: int, seq_len: int, new: bool) -> StepBuffer:
    """A StepBuffer as the hooks hand it to the pipeline: CPU tensors, one token context for the stack."""
    ids = torch.from_numpy(routing.token_ids.reshape(batch, seq_len))
    context = TokenContext(
        stack_id=0,
        batch=batch,
        seq_len=seq_len,
        continuity=NEW if new else "continue",
        input_ids=ids,
        position_ids=None,
        attention_mask=None,
        mask_4d=None,
        past_len=None if new else int(routing.positions[0]),
    )
    buffer = StepBuffer(step=step)
    buffer.contexts.append(context)
    for layer in range(LAYERS):
        buffer.layers.append(
            LayerCapture(
                layer=layer,
                context=context,
                indices=torch.from_numpy(routing.experts[layer]),
                weights=torch.from_numpy(routing.weights[layer]),
                scores=None,
                dropped=None,
            )
        )
    return buffer
