"""Per-family knowledge: which router classes moeprobe understands and how to read their outputs.

Adapters are keyed by class *name* so that moeprobe never has to import a model family's module. Every
extraction here is pure tensor work (no host synchronisation): it runs inside a forward hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .spec import Extracted, RouterSpec


@dataclass(frozen=True)
class Family:
    name: str
    spec: RouterSpec
    # Reads metadata for the manifest from the router module, its MoE block and the model config.
    describe: Callable[[nn.Module, nn.Module], dict[str, Any]]
    # The router's correction bias (used for choosing only), if the family has one.
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda router: None


def _config(block: nn.Module, router: nn.Module) -> Any:
    return getattr(block, "config", None) or getattr(router, "config", None)


def _softmax_meta(router: nn.Module, block: nn.Module) -> dict[str, Any]:
    shared = 0
    if getattr(block, "shared_expert", None) is not None or getattr(block, "shared_experts", None) is not None:
        shared = 1
    return {
        "num_experts": int(router.num_experts),
        "top_k": int(router.top_k),
        "num_shared_experts": shared,
        "norm_topk_prob": bool(getattr(router, "norm_topk_prob", True)),
    }


def _deepseek_meta(router: nn.Module, block: nn.Module) -> dict[str, Any]:
    config = _config(block, router)
    return {
        "num_experts": int(router.num_experts),
        "top_k": int(router.top_k),
        "num_shared_experts": int(getattr(config, "n_shared_experts", 1) or 0),
        "n_group": int(router.num_group),
        "topk_group": int(router.topk_group),
        "norm_topk_prob": bool(router.norm_topk_prob),
        "routed_scaling_factor": float(router.routed_scaling_factor),
        "has_bias": True,
    }


def _gpt_oss_meta(router: nn.Module, block: nn.Module) -> dict[str, Any]:
    return {"num_experts": int(router.num_experts), "top_k": int(router.top_k), "num_shared_experts": 0}


def _llama4_meta(router: nn.Module, block: nn.Module) -> dict[str, Any]:
    return {"num_experts": int(router.num_experts), "top_k": int(router.top_k), "num_shared_experts": 1}


def _switch_meta(router: nn.Module, block: nn.Module) -> dict[str, Any]:
    return {
        "num_experts": int(router.num_experts),
        "top_k": 1,
        "num_shared_experts": 0,
        "expert_capacity": int(router.expert_capacity),
    }


# transformers v5 routers that return (router_logits, top_k_weights, top_k_index): the weights and indices
# are exactly what the MoE block hands to its experts module.
_TOPK3 = RouterSpec(indices=2, weights=1, scores=0, scoring="softmax")


def _switch_extract(output: Any, router_input: Any) -> Extracted:
    one_hot, probs, logits = output
    kept = one_hot.any(dim=-1, keepdim=True)
    # The one-hot mask is what the experts consume; a token over capacity has an all-zero row. For it we
    # report the expert it chose (argmax of its logits) and flag it as dropped.
    chosen = torch.where(kept, one_hot.argmax(dim=-1, keepdim=True), logits.argmax(dim=-1, keepdim=True))
    return (
        chosen.reshape(-1, 1),
        probs.reshape(-1, 1),
        logits.reshape(-1, logits.shape[-1]),
        ~kept.reshape(-1),
    )


FAMILIES: dict[str, Family] = {
    "MixtralTopKRouter": Family("mixtral", _TOPK3, _softmax_meta),
    "Qwen2MoeTopKRouter": Family("qwen2_moe", _TOPK3, _softmax_meta),
    "Qwen3MoeTopKRouter": Family("qwen3_moe", _TOPK3, _softmax_meta),
    "OlmoeTopKRouter": Family("olmoe", _TOPK3, _softmax_meta),
    "DeepseekV3TopkRouter": Family(
        "deepseek_v3",
        RouterSpec(indices=2, weights=1, scores=0, scoring="sigmoid"),
        _deepseek_meta,
        bias=lambda router: router.e_score_correction_bias,
    ),
    "GptOssTopKRouter": Family(
        "gpt_oss", RouterSpec(indices=2, weights=1, scores=0, scoring="softmax_topk"), _gpt_oss_meta
    ),
    "SwitchTransformersTop1Router": Family(
        "switch_transformers",
        RouterSpec(indices=0, scoring="softmax_top1", extract=_switch_extract),
        _switch_meta,
    ),
}


def llama4_family(top_k: int) -> Family:
    """Llama 4's router does not return indices; recompute them exactly as it does (topk of logits, dim 1)."""

    def extract(output: Any, router_input: Any) -> Extracted:
        scores, logits = output
        indices = torch.topk(logits, top_k, dim=1).indices
        return indices, scores.gather(1, indices), logits, None

    return Family("llama4", RouterSpec(indices=0, scoring="sigmoid_topk", extract=extract), _llama4_meta)


def family_for(router: nn.Module) -> Family | None:
    name = type(router).__name__
    if name == "Llama4Router":
        return llama4_family(int(router.top_k))
    return FAMILIES.get(name)
