"""The balancing lab: replay recorded routing under other strategies, without rerunning the model.

Pure numpy functions over arrays (importable in a notebook without a trace):

- ``routing``: ``reroute`` from captured router logits (softmax top-k; DeepSeek-V3 sigmoid with bias and
  group-limited top-k; GPT-OSS and Llama 4 style), with any k.
- ``bias``: the aux-loss-free bias update and a step-by-step replay with it.
- ``capacity``: capacity factor and token dropping (top-1 and top-k, by position or score), GShard top-2.
- ``eplb``: DeepSeek's EPLB (``rebalance_experts`` in the reference's output layout).
- ``placement``: contiguous placement, per-GPU load, balancedness, all-to-all traffic matrix.
- ``loads``: load estimation over a window of steps (sum, moving average).
- ``metrics``: MaxVio, CV, dropped share, changed tokens, gate-weight mass lost.

``strategies`` parses the CLI's strategy specs and runs them on a layer; ``replay`` reads a ``Trace`` into
numpy and writes simulated routings back as traces.
"""

from __future__ import annotations

from .bias import route_with_online_bias, update_bias
from .capacity import apply_capacity, drop_summary, expert_capacity, gshard_top2
from .eplb import balanced_packing, plan_eplb, rebalance_experts, replicate_experts
from .loads import LoadEstimate, estimate_load
from .metrics import changed_tokens, cv, expert_load, mass_lost, max_vio
from .placement import Placement, balancedness, contiguous_placement, gpu_load, traffic_matrix
from .routing import Routed, RouterConfig, reroute, sigmoid_group_topk, softmax_topk, topk

__all__ = [
    "LoadEstimate",
    "Placement",
    "Routed",
    "RouterConfig",
    "apply_capacity",
    "balanced_packing",
    "balancedness",
    "changed_tokens",
    "contiguous_placement",
    "cv",
    "drop_summary",
    "estimate_load",
    "expert_capacity",
    "expert_load",
    "gpu_load",
    "gshard_top2",
    "mass_lost",
    "max_vio",
    "plan_eplb",
    "rebalance_experts",
    "replicate_experts",
    "reroute",
    "route_with_online_bias",
    "sigmoid_group_topk",
    "softmax_topk",
    "topk",
    "traffic_matrix",
    "update_bias",
]
