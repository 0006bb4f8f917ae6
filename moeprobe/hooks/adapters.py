"""Per-family knowledge: which router classes moeprobe understands and how to read their outputs.

Adapters are keyed by class *name* so that moeprobe never has to import a model family's module. A name only
says where to look: what is read is then checked by contract (:mod:`.contracts`): attributes by type when the
layer is attached, the router's output by dtype and shape on every call. Every extraction here is pure tensor
work (no host synchronisation): it runs on the model's thread, inside the router's wrapped forward.
"""

from __future__ import annotations


from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import contracts
from .spec import Extracted, UnsupportedModelError

Extractor = Callable[[Any, Any], Extracted]


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "topk", "switch" or "llama4": which contract reads the router's output
    scoring: str
    # Reads metadata for the manifest from the router module, its MoE block and the model config.
    describe: Callable[[nn.Module, nn.Module, str], dict[str, Any]]
    # The router's correction bias (used for choosing only), if the family has one.
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda router: None

    def extractor(self, meta: dict[str, Any], router: nn.Module) -> Extractor:
        k, num_experts = int(meta["top_k"]), int(meta["num_experts"])
        if self.kind == "switch":
            return lambda output, router_input: contracts.switch_parts(output, num_experts, router, router_input)
        if self.kind == "llama4":
            return lambda output, router_input: contracts.llama4_parts(output, k, num_experts)
        def topk(output: Any, router_input: Any) -> Extracted:
            return contracts.topk_parts(output, k, num_experts)

        # The parts are the output's own tensors, identified by dtype and shape only: hook capture may take them
        # from the same places on later calls, re-checked (noted_routing.at_slots). A user's selector is always called.
        topk.by_structure = True  # type: ignore[attr-defined]
        return topk


def transformers_version() -> str:
    import sys

    module = sys.modules.get("transformers")
    return str(getattr(module, "__version__", "unknown")) if module is not None else "not imported"


def _config(block: nn.Module, router: nn.Module) -> Any:
    return getattr(block, "config", None) or getattr(router, "config", None)


def first_value(sources: tuple[Any, ...], attrs: tuple[str, ...], kind: type | tuple[type, ...]) -> Any:
    """The first attribute of the wanted type found, looking through sources (modules, configs) in order."""
    for source in sources:
        if source is None:
            continue
        for attr in attrs:
            value = getattr(source, attr, None)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
    return None


def _required_int(name: str, router: nn.Module, block: nn.Module, attrs: tuple[str, ...]) -> int:
    value = first_value((router, block, _config(block, router)), attrs, int)
    if value is None:
        raise UnsupportedModelError(
            f"router module {name!r} ({type(router).__name__}, transformers {transformers_version()}): "
            f"expected an integer attribute {' or '.join(attrs)} on the router, its block or the config"
        )
    return int(value)


_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts")
_TOP_K = ("top_k", "num_experts_per_tok")


def _has_shared(block: nn.Module) -> int:
    return int(getattr(block, "shared_expert", None) is not None or getattr(block, "shared_experts", None) is not None)


def _softmax_meta(router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    norm = first_value((router, block, _config(block, router)), ("norm_topk_prob",), bool)
    return {
        "num_experts": _required_int(name, router, block, _EXPERTS),
        "top_k": _required_int(name, router, block, _TOP_K),
        "num_shared_experts": _has_shared(block),
        "norm_topk_prob": True if norm is None else bool(norm),
    }


def _deepseek_meta(router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    sources = (router, block, _config(block, router))
    shared = first_value(sources[2:], ("n_shared_experts",), int)
    scale = first_value(sources, ("routed_scaling_factor",), (int, float))
    norm = first_value(sources, ("norm_topk_prob",), bool)
    return {
        "num_experts": _required_int(name, router, block, _EXPERTS),
        "top_k": _required_int(name, router, block, _TOP_K),
        "num_shared_experts": int(shared or 0),
        "n_group": _required_int(name, router, block, ("num_group", "n_group")),
        "topk_group": _required_int(name, router, block, ("topk_group",)),
        "norm_topk_prob": bool(norm) if norm is not None else True,
        "routed_scaling_factor": float(scale) if scale is not None else 1.0,
        "has_bias": True,
    }


def _gpt_oss_meta(router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    return {
        "num_experts": _required_int(name, router, block, _EXPERTS),
        "top_k": _required_int(name, router, block, _TOP_K),
        "num_shared_experts": 0,
    }


def _llama4_meta(router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    return {
        "num_experts": _required_int(name, router, block, _EXPERTS),
        "top_k": _required_int(name, router, block, _TOP_K),
        "num_shared_experts": 1,
    }


def _switch_meta(router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    return {
        "num_experts": _required_int(name, router, block, _EXPERTS),
        "top_k": 1,
        "num_shared_experts": 0,
        "expert_capacity": _required_int(name, router, block, ("expert_capacity",)),
    }


CORRECTION_BIAS = "e_score_correction_bias"  # DeepSeek-V3's router buffer (transformers' name)


def _correction_bias(router: nn.Module) -> torch.Tensor | None:
    # Read at every step's end: a buffer (as transformers registers it) straight from the module's buffer dict, a
    # tenth of what nn.Module.__getattr__ costs; a parameter or plain attribute through getattr.
    buffers = router.__dict__.get("_buffers")
    bias = buffers.get(CORRECTION_BIAS) if buffers is not None else None
    if bias is None:
        bias = getattr(router, CORRECTION_BIAS, None)
    return bias if isinstance(bias, torch.Tensor) else None


FAMILIES: dict[str, Family] = {
    "MixtralTopKRouter": Family("mixtral", "topk", "softmax", _softmax_meta),
    "Qwen2MoeTopKRouter": Family("qwen2_moe", "topk", "softmax", _softmax_meta),
    "Qwen3MoeTopKRouter": Family("qwen3_moe", "topk", "softmax", _softmax_meta),
    "OlmoeTopKRouter": Family("olmoe", "topk", "softmax", _softmax_meta),
    "DeepseekV3TopkRouter": Family("deepseek_v3", "topk", "sigmoid", _deepseek_meta, bias=_correction_bias),
    "GptOssTopKRouter": Family("gpt_oss", "topk", "softmax_topk", _gpt_oss_meta),
    "SwitchTransformersTop1Router": Family("switch_transformers", "switch", "softmax_top1", _switch_meta),
    "Llama4Router": Family("llama4", "llama4", "sigmoid_topk", _llama4_meta),
}


def family_for(router: nn.Module) -> Family | None:
    return FAMILIES.get(type(router).__name__)
