"""Finding the MoE layers of a model: known family routers, declared routers, and a generic path.

The generic path covers transformers v5 families moeprobe has no adapter for: their MoE blocks hand
``(hidden_states, top_k_index, top_k_weights)`` to an ``experts`` module, so a pre-hook on that module
sees exactly the routing the model used. A router-like module that fits none of these is an error that
names it, never a silent gap in the trace.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import contracts
from .adapters import Family, family_for
from .spec import Extracted, RouterSpec, TokenSelector, UnsupportedModelError

RouterKey = str | type
RouterDecls = Mapping[RouterKey, RouterSpec]

_ROUTER_NAME_RE = re.compile(r"(Router|TopK?Router|TopkRouter|Top\d+Router)$")
_INDEX_PARAM_RE = re.compile(r"(index|indices|selected|expert_ids|topk_ids)", re.IGNORECASE)
_WEIGHT_PARAM_RE = re.compile(r"(weight|scores|probs|gates)", re.IGNORECASE)


@dataclass
class LayerBinding:
    """One MoE layer and how to capture it."""

    index: int
    name: str  # qualified name of the MoE block
    block: nn.Module
    source: str  # "router": read the router's output; "experts": read the experts module's inputs
    source_module: nn.Module
    source_name: str
    router: nn.Module | None  # timed as the router (may be None on the generic path)
    router_name: str | None
    extract: Callable[[Any, Any], Extracted]
    family: str
    meta: dict[str, Any]
    bias: Callable[[], torch.Tensor | None] = field(default=lambda: None)
    stack: nn.Module | None = None
    stack_name: str | None = None
    # Generic path: the experts module's positional slots for indices and weights.
    param_slots: tuple[tuple[int, str], tuple[int, str]] | None = None
    # A family router that turns out (on its first call) to return bare logits routes in its block: the
    # routing is then read from this experts module's inputs, and the router's logits become the scores.
    experts_fallback: nn.Module | None = None
    # Where the stack's token ids are, when a RouterSpec declares it (custom models).
    tokens: TokenSelector | None = None
    # Set once the layer's first call passed its contract checks.
    validated: bool = False

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "router": self.router_name,
            "family": self.family,
            "capture": self.source,
            "stack": self.stack_name,
            **self.meta,
        }



def _no_bias(router: Any) -> None:
    """A declared router (RouterSpec) has no family bias reader: no correction bias to record."""
    return None

def _parameters(module: nn.Module) -> list[str]:
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _declared(name: str, module: nn.Module, routers: RouterDecls) -> RouterSpec | None:
    cls = type(module)
    for key, spec in routers.items():
        if isinstance(key, type):
            if isinstance(module, key):
                return spec
        elif key == cls.__name__ or key == name or fnmatch.fnmatchcase(name, key):
            return spec
    return None


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _generic_slots(experts: nn.Module) -> tuple[tuple[int, str], tuple[int, str]] | None:
    params = _parameters(experts)
    if len(params) < 3:
        return None
    index_name, weight_name = params[1], params[2]
    if _INDEX_PARAM_RE.search(index_name) and _WEIGHT_PARAM_RE.search(weight_name):
        return (1, index_name), (2, weight_name)
    return None


def _first_int(modules: tuple[Any, ...], attrs: tuple[str, ...]) -> int | None:
    """The first integer attribute found, looking through modules (and configs) in order."""
    for module in modules:
        for attr in attrs:
            value = getattr(module, attr, None) if module is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _num_experts(*modules: Any) -> int | None:
    return _first_int(modules, ("num_experts", "num_local_experts", "n_routed_experts"))


def _top_k(*modules: Any) -> int | None:
    return _first_int(modules, ("top_k", "num_experts_per_tok", "moe_topk"))


def _spec_meta(spec: RouterSpec, router: nn.Module, block: nn.Module, name: str) -> dict[str, Any]:
    config = getattr(block, "config", None) or getattr(router, "config", None)
    num_experts = spec.num_experts or _num_experts(router, block, config)
    top_k = spec.top_k or _top_k(router, block, config)
    if num_experts is None or top_k is None:
        raise UnsupportedModelError(
            f"router module {name!r} ({type(router).__name__}): cannot tell its number of experts and top-k; "
            f"pass num_experts= and top_k= in its RouterSpec"
        )
    return {"num_experts": int(num_experts), "top_k": int(top_k), "num_shared_experts": 0, **spec.extra}


def find_layers(model: nn.Module, routers: RouterDecls | None = None) -> list[LayerBinding]:
    """All MoE layers of ``model`` in model order. Raises UnsupportedModelError if it finds none, or finds a
    router it cannot interpret."""
    routers = dict(routers or {})
    modules = dict(model.named_modules())
    bindings: list[LayerBinding] = []
    bound_blocks: set[str] = set()
    bound_names: set[str] = set()

    for name, module in modules.items():
        spec = _declared(name, module, routers) if routers else None
        family: Family | None = None
        if spec is None:
            family = family_for(module)
            if family is None:
                continue
        block_name = _parent_name(name)
        block = modules[block_name]
        if family is not None:
            meta = family.describe(module, block, name)
            bias_fn = family.bias
            family_name = family.name
            extract = family.extractor(meta, module)
            meta.setdefault("scoring", family.scoring)
        else:
            assert spec is not None
            meta = _spec_meta(spec, module, block, name)
            bias_fn = _no_bias
            family_name = spec.family
            extract = spec.extractor()
            meta.setdefault("scoring", spec.scoring)
        experts = getattr(block, "experts", None)
        bias_tensor = bias_fn(module)
        meta.setdefault("has_bias", bias_tensor is not None)
        bindings.append(
            LayerBinding(
                index=-1,
                name=block_name,
                block=block,
                source="router",
                source_module=module,
                source_name=name,
                router=module,
                router_name=name,
                extract=extract,
                family=family_name,
                meta=meta,
                bias=functools.partial(bias_fn, module),
                experts_fallback=experts if family is not None and isinstance(experts, nn.Module) and _generic_slots(experts) else None,
                tokens=spec.tokens if spec is not None else None,
            )
        )
        bound_blocks.add(block_name)
        bound_names.add(name)

    # Generic path: an `experts` child that takes (hidden_states, indices, weights).
    for name, module in modules.items():
        if name in bound_blocks:
            continue
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or any(name.startswith(b + ".") for b in bound_blocks if b):
            continue
        slots = _generic_slots(experts)
        if slots is None:
            continue
        router_name = next((f"{name}.{c}" for c in ("gate", "router") if isinstance(getattr(module, c, None), nn.Module)), None)
        router = modules.get(router_name) if router_name else None
        config = getattr(module, "config", None) or getattr(experts, "config", None)
        num_experts = _num_experts(experts, router, module, config)
        top_k = _top_k(router, module, config)
        if num_experts is None or top_k is None:
            raise UnsupportedModelError(
                f"MoE block {name!r} ({type(module).__name__}): cannot tell its number of experts and top-k; "
                f"declare its router with routers={{...: moeprobe.RouterSpec(...)}}"
            )

        def extract(args: Any, kwargs: Any, k: int = int(top_k)) -> Extracted:
            # By contract, not by position: the integer (tokens, k) argument and the floating one of its shape.
            indices, weights = contracts.experts_parts((*args, *kwargs.values()), k)
            return indices, weights, None, None

        bindings.append(
            LayerBinding(
                index=-1,
                name=name,
                block=module,
                source="experts",
                source_module=experts,
                source_name=f"{name}.experts",
                router=router,
                router_name=router_name,
                extract=extract,
                family="generic",
                meta={"num_experts": int(num_experts), "top_k": int(top_k), "num_shared_experts": 0, "scoring": "unknown", "has_bias": False},
                param_slots=slots,
            )
        )
        bound_blocks.add(name)
        if router_name:
            bound_names.add(router_name)

    # Anything that looks like a router but was not bound would silently vanish from the trace: refuse.
    for name, module in modules.items():
        if name in bound_names or not _ROUTER_NAME_RE.search(type(module).__name__):
            continue
        if any(name.startswith(b + ".") for b in bound_blocks if b):
            continue
        raise UnsupportedModelError(
            f"cannot interpret router module {name!r} ({type(module).__name__}); declare it with "
            f"routers={{'{type(module).__name__}': moeprobe.RouterSpec(indices=..., weights=..., scores=...)}}"
        )
    if not bindings:
        raise UnsupportedModelError(
            f"no MoE router found in {type(model).__name__}; moeprobe knows the routers of Mixtral, DeepSeek-V3, "
            f"Qwen2/3-MoE, OLMoE, GPT-OSS, Llama 4 and Switch Transformers, and blocks whose `experts` module "
            f"takes (hidden_states, top_k_index, top_k_weights); declare others with routers={{...}}"
        )

    order = {name: i for i, name in enumerate(modules)}
    bindings.sort(key=lambda b: order[b.name])
    for i, binding in enumerate(bindings):
        binding.index = i
        binding.stack_name, binding.stack = _stack_for(binding.name, modules)
    return bindings


def _stack_for(block_name: str, modules: dict[str, nn.Module]) -> tuple[str | None, nn.Module | None]:
    """The nearest enclosing module whose forward takes ``input_ids``: it tells which tokens a layer sees.

    Without one (a custom model), the model itself: its token ids are then its first positional argument if
    that is a 2-D integer tensor, or wherever a RouterSpec's ``tokens=`` says.
    """
    name = block_name
    while name:
        name = _parent_name(name)
        module = modules[name]
        if "input_ids" in _parameters(module):
            return name, module
    return "", modules[""]
