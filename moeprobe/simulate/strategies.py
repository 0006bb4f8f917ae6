"""Balancing strategies as small specs, and running one on a layer's recorded routing.

A strategy is one routing stage, optionally followed by a capacity stage, joined by ``+``::

    recorded                                the routing as captured (the baseline)
    reroute[:k=K,bias=auto|recorded|zero|none]
                                            re-route from the captured logits with the layer's own router;
                                            k changes top-k; bias=auto uses the recorded bias when the trace
                                            has one, zero gives the choices the model makes without balancing
    topk:k=K                                shorthand for reroute:k=K
    online-bias[:u=0.001,init=zero|recorded,k=K]
                                            re-route while evolving the bias with the aux-loss-free update
    capacity:cf=F|slots=N[,order=position|score,group=step|sequence,second=keep|random,seed=S]
                                            token dropping past capacity (on the recorded routing when it
                                            comes alone); second=random is GShard's top-2 second choice

for example ``reroute:bias=zero``, ``online-bias:u=0.01``, ``topk:k=1+capacity:cf=1.25``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bias import DEFAULT_RATE, route_with_online_bias
from .capacity import ORDERS, apply_capacity, gshard_top2
from .data import LayerData, SimRouting
from .routing import Routed, RouterConfig

ROUTING_STAGES = ("recorded", "reroute", "topk", "online-bias")
BIAS_MODES = ("auto", "recorded", "zero", "none")


class StrategyError(ValueError):
    """A strategy spec that cannot be parsed or does not fit the layer."""


@dataclass(frozen=True)
class Stage:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    text: str
    routing: Stage
    capacity: Stage | None = None

    @property
    def needs_scores(self) -> bool:
        return self.routing.name in ("reroute", "online-bias")

    @property
    def needs_recorded_bias(self) -> bool:
        """True when the spec asks for the recorded bias explicitly (auto falls back to none)."""
        if self.routing.name == "reroute":
            return bool(self.routing.params["bias"] == "recorded")
        return self.routing.name == "online-bias" and self.routing.params["init"] == "recorded"


# -- parsing ------------------------------------------------------------------------------------------
def _number(stage: str, key: str, value: str, kind: type, minimum: float, strict: bool = False) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number < minimum or (strict and number == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise StrategyError(f"{stage}: {key}={value!r} should be a{'n integer' if kind is int else ' number'} {bound}")
    return number


def _choice(stage: str, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StrategyError(f"{stage}: {key}={value!r} should be one of {', '.join(allowed)}")
    return value


def _parse_stage(text: str) -> Stage:
    name, _, rest = text.strip().partition(":")
    raw: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise StrategyError(f"{name}: expected KEY=VALUE, got {item!r}")
        raw[key.strip()] = value.strip()

    def allow(*keys: str) -> None:
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            hint = f"; it takes {', '.join(keys)}" if keys else "; it takes no options"
            raise StrategyError(f"{name}: unknown option {unknown[0]!r}{hint}")

    if name == "recorded":
        allow()
        return Stage("recorded")
    if name in ("reroute", "topk"):
        allow("k", "bias")
        if name == "topk" and "k" not in raw:
            raise StrategyError("topk: needs k=K (the new number of experts per token)")
        params: dict[str, Any] = {"k": None, "bias": _choice(name, "bias", raw.get("bias", "auto"), BIAS_MODES)}
        if "k" in raw:
            params["k"] = _number(name, "k", raw["k"], int, 1)
        return Stage("reroute", params)
    if name == "online-bias":
        allow("u", "init", "k")
        params = {
            "u": _number(name, "u", raw.get("u", str(DEFAULT_RATE)), float, 0.0, strict=True),
            "init": _choice(name, "init", raw.get("init", "zero"), ("zero", "recorded")),
            "k": _number(name, "k", raw["k"], int, 1) if "k" in raw else None,
        }
        return Stage("online-bias", params)
    if name == "capacity":
        allow("cf", "slots", "order", "group", "second", "seed")
        if ("cf" in raw) == ("slots" in raw):
            raise StrategyError("capacity: give exactly one of cf=FACTOR and slots=N")
        params = {
            "cf": _number(name, "cf", raw["cf"], float, 0.0, strict=True) if "cf" in raw else None,
            "slots": _number(name, "slots", raw["slots"], int, 0) if "slots" in raw else None,
            "order": _choice(name, "order", raw.get("order", "position"), ORDERS),
            "group": _choice(name, "group", raw.get("group", "step"), ("step", "sequence")),
            "second": _choice(name, "second", raw.get("second", "keep"), ("keep", "random")),
            "seed": _number(name, "seed", raw.get("seed", "0"), int, 0),
        }
        if params["second"] == "random" and params["cf"] is None:
            raise StrategyError("capacity: second=random (GShard top-2) needs cf=FACTOR")
        return Stage("capacity", params)
    known = ", ".join((*ROUTING_STAGES, "capacity"))
    raise StrategyError(f"unknown strategy {name!r}; strategies are {known}")


def parse_strategy(text: str) -> Strategy:
    """Parse ``STAGE[+capacity:...]``; raises ``StrategyError`` with a one-line reason."""
    parts = [part.strip() for part in text.split("+")]
    if not text.strip() or any(not p for p in parts):
        raise StrategyError(f"empty strategy in {text!r}")
    stages = [_parse_stage(p) for p in parts]
    routing = [s for s in stages if s.name != "capacity"]
    capacity = [s for s in stages if s.name == "capacity"]
    if len(routing) > 1 or len(capacity) > 1:
        raise StrategyError(f"{text}: combine at most one routing stage and one capacity stage")
    if routing and stages[0] is not routing[0]:
        raise StrategyError(f"{text}: the routing stage comes first, capacity after it")
    return Strategy(text.strip(), routing[0] if routing else Stage("recorded"), capacity[0] if capacity else None)


# -- running ------------------------------------------------------------------------------------------
def _infer_norm(layer: LayerData) -> bool:
    """Whether the recorded top-k weights were renormalised, when the manifest does not say."""
    full = (layer.experts >= 0).all(axis=1)
    if not full.any() or layer.experts.shape[1] == 1:
        return layer.meta.get("scoring") != "softmax_top1"
    sums = layer.weights[full].sum(axis=1)
    return bool(np.mean(np.abs(sums - 1.0) < 1e-3) > 0.99)


def router_config(layer: LayerData, top_k: int | None = None) -> RouterConfig:
    meta = layer.meta
    norm = meta.get("norm_topk_prob")
    return RouterConfig.from_layer(
        meta, top_k=top_k, norm_topk_prob=bool(norm) if norm is not None else _infer_norm(layer)
    )


def _route_recorded_bias(layer: LayerData, config: RouterConfig, notes: list[str]) -> Routed:
    """Route each token with the bias in effect at its (rank, step)."""
    assert layer.scores is not None and layer.bias is not None
    rows, early = layer.bias.for_tokens(layer.rank, layer.step)
    if early:
        notes.append(f"layer {layer.index}: {early} tokens precede the first recorded bias; used that bias")
    experts = np.empty((layer.tokens, config.top_k), dtype=np.int32)
    weights = np.empty((layer.tokens, config.top_k), dtype=np.float32)
    for row in np.unique(rows):
        tokens = np.flatnonzero(rows == row)
        routed = config.route(layer.scores[tokens], bias=layer.bias.bias[row])
        experts[tokens] = routed.experts
        weights[tokens] = routed.weights
    return Routed(experts, weights)


def _routing_stage(stage: Stage, layer: LayerData) -> SimRouting:
    if stage.name == "recorded":
        return SimRouting(layer.experts, layer.weights, layer.dropped)
    if layer.scores is None:
        raise StrategyError(f"{stage.name} needs router scores for layer {layer.index}")
    config = router_config(layer, stage.params["k"])
    notes: list[str] = []
    if stage.name == "online-bias":
        initial = None
        if stage.params["init"] == "recorded":
            if layer.bias is None:
                raise StrategyError(f"online-bias init=recorded: layer {layer.index} has no recorded bias")
            # The bias in effect at the first replayed step (on the lowest rank: ranks share one bias).
            first_rank, first_step = np.array([layer.rank.min()]), np.array([layer.step.min()])
            initial = layer.bias.bias[layer.bias.for_tokens(first_rank, first_step)[0][0]]
        result = route_with_online_bias(layer.scores, layer.step, config, rate=stage.params["u"], initial_bias=initial)
        return SimRouting(
            result.routed.experts,
            result.routed.weights,
            np.zeros(result.routed.experts.shape, dtype=bool),
            bias_steps=result.steps,
            bias=result.bias,
        )
    mode = stage.params["bias"]
    if mode == "auto":
        mode = "recorded" if layer.bias is not None else "none"
    if mode == "recorded":
        if layer.bias is None:
            raise StrategyError(f"reroute bias=recorded: layer {layer.index} has no recorded bias")
        routed = _route_recorded_bias(layer, config, notes)
    else:
        zero = np.zeros(layer.num_experts, np.float32) if mode == "zero" else None
        routed = config.route(layer.scores, bias=zero)
    return SimRouting(routed.experts, routed.weights, np.zeros(routed.experts.shape, dtype=bool), notes=notes)


def _group_ids(*columns: np.ndarray) -> np.ndarray:
    stacked = np.stack([np.asarray(c, np.int64) for c in columns], axis=1)
    return np.unique(stacked, axis=0, return_inverse=True)[1].reshape(-1)


def _capacity_stage(stage: Stage, layer: LayerData, routing: SimRouting) -> SimRouting:
    p = stage.params
    # A batch is one step of one rank (each rank applies capacity to its own tokens), or one sequence.
    groups = _group_ids(layer.rank, layer.step if p["group"] == "step" else layer.sequence)
    if p["second"] == "random":
        if routing.top_k != 2:
            raise StrategyError(f"capacity second=random is GShard top-2; layer {layer.index} routes to {routing.top_k}")
        result = gshard_top2(
            routing.experts,
            routing.weights,
            num_experts=layer.num_experts,
            groups=groups,
            capacity_factor=p["cf"],
            rng=np.random.default_rng(p["seed"]),
            positions=layer.position,
            sequences=layer.sequence,
        )
        return SimRouting(routing.experts, result.weights, result.dropped, routing.bias_steps, routing.bias, routing.notes)
    dropped = apply_capacity(
        routing.experts,
        num_experts=layer.num_experts,
        groups=groups,
        capacity_factor=p["cf"],
        slots=p["slots"],
        order=p["order"],
        positions=layer.position,
        sequences=layer.sequence,
        weights=routing.weights,
    )
    return SimRouting(routing.experts, routing.weights, dropped, routing.bias_steps, routing.bias, routing.notes)


def run_strategy(strategy: Strategy, layer: LayerData) -> SimRouting:
    """Apply ``strategy`` to one layer. A capacity stage ignores any drops the recording had."""
    try:
        routing = _routing_stage(strategy.routing, layer)
        if strategy.capacity is not None:
            routing = _capacity_stage(strategy.capacity, layer, routing)
    except ValueError as exc:
        if isinstance(exc, StrategyError):
            raise
        raise StrategyError(f"{strategy.text}: layer {layer.index}: {exc}") from exc
    return routing
