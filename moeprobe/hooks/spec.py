"""How to read routing decisions out of a router module's output.

A ``RouterSpec`` is the documented way to declare a router in a custom PyTorch model: it says which output
of the router's ``forward`` holds the chosen expert indices, which holds their gate weights and, optionally,
which holds the full router scores (logits). The family adapters build the same kind of object for the
transformers models moeprobe knows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# An output selector: a position in a tuple/list output, a key of a dict output or an attribute name
# (ModelOutput, dataclass), or a function of (output, router_input) returning the tensor.
Selector = int | str | Callable[[Any, Any], torch.Tensor]

# Where a stack's token ids are: the name of its forward's argument, or a function of (args, kwargs).
TokenSelector = str | Callable[[tuple[Any, ...], dict[str, Any]], Any]

# (indices (tokens, k), weights (tokens, k) or None, scores (tokens, E) or None, dropped (tokens,) or None)
Extracted = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

SCORINGS = ("softmax", "sigmoid", "softmax_topk", "sigmoid_topk", "softmax_top1", "unknown")


class UnsupportedModelError(Exception):
    """The model has no router moeprobe can interpret; the message names the module."""


@dataclass(frozen=True)
class RouterSpec:
    """Declares how to read a router's output.

    Example, for a router whose forward returns ``(logits, weights, indices)``::

        moeprobe.record(model, "traces/run", routers={
            "MyTopKRouter": moeprobe.RouterSpec(indices=2, weights=1, scores=0, num_experts=8, top_k=2),
        })

    ``routers`` keys may be a router class, its name, or a glob over qualified module names
    (``"model.layers.*.moe.router"``). ``num_experts`` and ``top_k`` default to the module's
    ``num_experts`` / ``top_k`` attributes. ``indices`` may return shape (tokens, k) or (batch, seq, k);
    ``weights`` the same shape as ``indices``; ``scores`` (tokens, num_experts).

    ``tokens`` says where the model's forward receives its token ids when that argument is not called
    ``input_ids``: an argument name (``tokens="ids"``) or a function of ``(args, kwargs)``. Without it, a model
    with no ``input_ids`` argument uses its first positional argument when that is a 2-D integer tensor.

    ``num_experts`` and ``top_k`` are checked against the router's first output: a mismatch, or a selector that
    returns something of the wrong type or shape, is an :class:`UnsupportedModelError` at the first call.
    """

    indices: Selector
    weights: Selector | None = None
    scores: Selector | None = None
    num_experts: int | None = None
    top_k: int | None = None
    scoring: str = "unknown"
    # Optional boolean (tokens,) selector: True where the token was dropped (exceeded capacity).
    dropped: Selector | None = None
    family: str = "custom"
    # Optional: one function of (output, router_input) returning all four at once, for routers whose
    # outputs need computing (it overrides the selectors).
    extract: Callable[[Any, Any], Extracted] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tokens: TokenSelector | None = None

    def extractor(self) -> Callable[[Any, Any], Extracted]:
        if self.extract is not None:
            return self.extract
        indices, weights, scores, dropped = self.indices, self.weights, self.scores, self.dropped

        def extract(output: Any, router_input: Any) -> Extracted:
            return (
                select(output, indices, router_input),
                None if weights is None else select(output, weights, router_input),
                None if scores is None else select(output, scores, router_input),
                None if dropped is None else select(output, dropped, router_input),
            )

        return extract

    def describe(self) -> dict[str, Any]:
        def name(selector: Selector | None) -> Any:
            if selector is None or isinstance(selector, (int, str)):
                return selector
            return getattr(selector, "__name__", "callable")

        return {
            "indices": name(self.indices),
            "weights": name(self.weights),
            "scores": name(self.scores),
            "dropped": name(self.dropped),
            "scoring": self.scoring,
            "family": self.family,
            "tokens": name(self.tokens),
        }


def select(output: Any, selector: Selector, router_input: Any) -> torch.Tensor:
    """Apply a selector to a router's output."""
    picked: torch.Tensor
    if callable(selector):
        picked = selector(output, router_input)
    elif isinstance(selector, int) or isinstance(output, dict):
        picked = output[selector]
    else:
        picked = getattr(output, selector)
    return picked
