"""Reading routing out of a router's output (or an experts module's inputs) by what the tensors are.

transformers has reordered router outputs between releases (Switch returned ``(probs, one_hot, max_prob)`` until
5.17 and ``(one_hot, probs, logits)`` from 5.18) and returned bare logits where it later returned the top-k
(DeepSeek-V3 until 5.13). So no adapter trusts a tuple position: each part is identified by its dtype and shape
against the layer's ``top_k`` (k) and number of experts (E):

- indices: the integer tensor whose last dimension is k;
- weights: a floating tensor of the indices' shape;
- scores: a floating tensor whose last dimension is E;
- a Switch dispatch mask: an integer or boolean tensor whose last dimension is E, with k = 1.

Everything here reads metadata only (dtype, shape): no kernel launch, no host sync. A mismatch raises
:class:`ContractError`; the probe turns it into a loud refusal on a layer's first call and a counted anomaly
afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .spec import Extracted

_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
INTEGER_DTYPES = frozenset(_INTEGER)  # is_integer's dtypes, for a hot path that tests membership inline


class ContractError(Exception):
    """A router output (or experts input) does not have the structure moeprobe relies on."""


def describe(value: Any) -> str:
    """A short structural description of a router output, for error messages: ``tuple(float32[14, 6], ...)``."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    if isinstance(output, dict):
        return [t for t in output.values() if isinstance(t, torch.Tensor)]
    return []


def is_integer(t: torch.Tensor) -> bool:
    return t.dtype in _INTEGER


def _unique(candidates: list[torch.Tensor], what: str, output: Any) -> torch.Tensor:
    if len(candidates) != 1:
        found = "none" if not candidates else f"{len(candidates)}"
        raise ContractError(f"expected exactly one {what}, found {found} in {describe(output)}")
    return candidates[0]


def topk_parts(output: Any, k: int, num_experts: int) -> Extracted:
    """(indices, weights, scores, None) from a top-k router's output, identified by dtype and shape."""
    tensors = _tensors(output)
    ints = [t for t in tensors if is_integer(t) and t.dim() >= 1 and t.shape[-1] == k]
    indices = _unique(ints, f"integer tensor of top-k indices (last dim {k})", output)
    same = [t for t in tensors if t.is_floating_point() and t.shape == indices.shape]
    weights = same[0] if same else None
    if weights is None:
        raise ContractError(f"expected a floating tensor of gate weights shaped like the indices {list(indices.shape)}, got {describe(output)}")
    scores = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == num_experts and t is not weights), None)
    return indices, weights, scores, None


def logits_only(output: Any, num_experts: int) -> torch.Tensor | None:
    """The router's logits when its output is nothing but one floating (tokens, E) tensor (routing happens in
    the block: DeepSeek-V3 before transformers 5.13)."""
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.shape[-1] == num_experts:
        return output
    return None


def switch_parts(output: Any, num_experts: int, router: Any, router_input: Any) -> Extracted:
    """(chosen expert, gate probability, logits, dropped) from a Switch Transformers top-1 router.

    The dispatch mask (one-hot over E, all zeros for a token over capacity) is what the experts consume. For a
    dropped token the chosen expert is the argmax of the logits; releases before 5.18 return no logits (their
    third output is the max probability), so they are recomputed with the router's own classifier: tensor work
    on the model's thread, no sync.
    """
    tensors = _tensors(output)
    masks = [t for t in tensors if (is_integer(t) or t.dtype == torch.bool) and t.shape[-1] == num_experts]
    one_hot = _unique(masks, f"integer one-hot dispatch mask (last dim {num_experts})", output)
    tokens = one_hot.numel() // num_experts
    probs = next((t for t in tensors if t.is_floating_point() and t.numel() == tokens), None)
    if probs is None:
        raise ContractError(f"expected a floating tensor of one gate probability per token, got {describe(output)}")
    logits = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == num_experts), None)
    if logits is None:
        classifier = getattr(router, "classifier", None)
        if not isinstance(router_input, torch.Tensor) or not callable(classifier):
            raise ContractError(f"no router logits in {describe(output)} and no classifier to recompute them")
        dtype = getattr(router, "dtype", router_input.dtype)
        logits = classifier(router_input.to(dtype))
    one_hot = one_hot.reshape(-1, num_experts)
    logits = logits.reshape(-1, num_experts)
    kept = one_hot.any(dim=-1, keepdim=True)
    chosen = torch.where(kept, one_hot.argmax(dim=-1, keepdim=True), logits.argmax(dim=-1, keepdim=True))
    return chosen, probs.reshape(-1, 1), logits, ~kept.reshape(-1)


def llama4_parts(output: Any, k: int, num_experts: int) -> Extracted:
    """Llama 4's router returns (scores, logits), both (tokens, E); the chosen experts are topk(logits)."""
    tensors = _tensors(output)
    full = [t for t in tensors if t.is_floating_point() and t.dim() == 2 and t.shape[-1] == num_experts]
    if len(full) != 2:
        raise ContractError(f"expected (scores, logits), two floating (tokens, {num_experts}) tensors, got {describe(output)}")
    scores, logits = full
    indices = torch.topk(logits, k, dim=1).indices
    return indices, scores.gather(1, indices), logits, None


def experts_parts(values: Iterable[Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) among an experts module's arguments: the integer (tokens, k) tensor and the floating
    tensor of the same shape."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    ints = [t for t in tensors if is_integer(t) and t.dim() == 2 and t.shape[-1] == k]
    if len(ints) != 1:
        raise ContractError(f"expected one integer (tokens, {k}) tensor of expert indices among the experts' inputs ({describe(tensors)})")
    indices = ints[0]
    floats = [t for t in tensors if t.is_floating_point() and t.shape == indices.shape]
    if not floats:
        raise ContractError(f"expected a floating tensor of gate weights shaped {list(indices.shape)} among the experts' inputs ({describe(tensors)})")
    return indices, floats[0]


def check_parts(parts: Extracted, k: int, num_experts: int) -> None:
    """The per-call metadata checks: integer indices of width k, weights of the same shape, scores of width E."""
    indices, weights, scores, dropped = parts
    if not isinstance(indices, torch.Tensor) or not is_integer(indices):
        raise ContractError(f"expert indices must be an integer tensor, got {describe(indices)}")
    if indices.shape[-1] != k and not (k == 1 and indices.dim() == 1):
        raise ContractError(f"expert indices must have last dimension top_k={k}, got {describe(indices)}")
    if weights is not None and (not weights.is_floating_point() or weights.numel() != indices.numel()):
        raise ContractError(f"gate weights must be floating and shaped like the indices {list(indices.shape)}, got {describe(weights)}")
    if scores is not None and (not scores.is_floating_point() or scores.shape[-1] != num_experts):
        raise ContractError(f"router scores must be floating with last dimension num_experts={num_experts}, got {describe(scores)}")
    if dropped is not None and dropped.numel() * max(k, 1) != indices.numel():
        raise ContractError(f"the dropped flags must have one entry per token, got {describe(dropped)}")
