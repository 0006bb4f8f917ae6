"""Expert placement on an expert-parallel deployment, evaluated on a recorded routing.

A plan (EPLB, or contiguous placement as the baseline) is made from the load of a plan window of steps,
estimated as a deployment would (``loads.LoadEstimate``), and judged on the load of an evaluation window:
"plan on steps 0–N, evaluate on N–end" shows how a plan ages. Tokens originate on source ranks (the trace's
rank, or their sequence spread round-robin over the GPUs as data-parallel attention does), which gives the
all-to-all dispatch matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .data import LayerData
from .eplb import plan_eplb
from .loads import LoadEstimate, estimate_load
from .placement import Placement, balancedness, contiguous_placement, gpu_load, replicated_experts, traffic_matrix

ORIGINS = ("auto", "rank", "sequence")

Window = tuple[int | None, int | None]  # [start, stop) in step numbers; None = open


@dataclass(frozen=True)
class EplbOptions:
    gpus: int
    replicas: int | None = None  # physical experts in all (EPLB's num_replicas); None = one per expert
    redundant: int | None = None  # or: this many extra replicas
    groups: int | None = None  # None = the layer's n_group, else 1
    nodes: int = 1
    plan: Window | None = None
    eval: Window | None = None
    estimate: LoadEstimate = field(default_factory=LoadEstimate)
    origin: str = "auto"

    @classmethod
    def parse(cls, text: str) -> EplbOptions:
        """``gpus=8,replicas=16,groups=4,nodes=2[,redundant=N,plan=A:B,eval=A:B,estimate=...,origin=...]``."""
        raw: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise ValueError(f"--eplb: expected KEY=VALUE, got {item!r}")
            raw[key.strip()] = value.strip()
        known = ("gpus", "replicas", "redundant", "groups", "nodes", "plan", "eval", "estimate", "origin")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"--eplb: unknown option {unknown[0]!r}; options are {', '.join(known)}")
        if "gpus" not in raw:
            raise ValueError("--eplb: needs gpus=N")
        if "replicas" in raw and "redundant" in raw:
            raise ValueError("--eplb: give replicas=N (physical experts in all) or redundant=N, not both")

        def positive(key: str) -> int | None:
            if key not in raw:
                return None
            try:
                value = int(raw[key])
            except ValueError:
                value = -1
            if value < (0 if key == "redundant" else 1):
                raise ValueError(f"--eplb: {key}={raw[key]!r} should be a positive integer")
            return value

        origin = raw.get("origin", "auto")
        if origin not in ORIGINS:
            raise ValueError(f"--eplb: origin={origin!r} should be one of {', '.join(ORIGINS)}")
        gpus = positive("gpus")
        assert gpus is not None
        return cls(
            gpus=gpus,
            replicas=positive("replicas"),
            redundant=positive("redundant"),
            groups=positive("groups"),
            nodes=positive("nodes") or 1,
            plan=parse_window(raw["plan"], "--eplb plan") if "plan" in raw else None,
            eval=parse_window(raw["eval"], "--eplb eval") if "eval" in raw else None,
            estimate=LoadEstimate.parse(raw.get("estimate", "sum")),
            origin=origin,
        )


def parse_window(text: str, what: str = "--steps") -> Window:
    """``A:B`` (A inclusive, B exclusive; either may be left out) or ``A`` for a single step: the report's step
    parser (``analysis.filters.parse_steps``), whose ``FilterError`` is a ``ValueError``."""
    from ..analysis.filters import parse_steps

    return parse_steps(text, what)


def _in_window(steps: np.ndarray, window: Window) -> np.ndarray:
    lo, hi = window
    keep = np.ones(len(steps), dtype=bool)
    if lo is not None:
        keep &= steps >= lo
    if hi is not None:
        keep &= steps < hi
    return keep


def _source_of(layer: LayerData, origin: str, gpus: int) -> np.ndarray:
    base = layer.rank if origin == "rank" else layer.sequence
    return np.asarray(base, np.int64) % gpus


def evaluate_placement(layers: list[LayerData], options: EplbOptions, world_size: int = 1) -> dict[str, Any]:
    """Plan EPLB on the plan window, compare it with contiguous placement on the evaluation window."""
    if not layers:
        raise ValueError("--eplb: no layers to place")
    num_experts = layers[0].num_experts
    if any(layer.num_experts != num_experts for layer in layers):
        raise ValueError("--eplb: layers have different numbers of experts; select layers of one size with --layers")
    replicas, groups = _replicas_and_groups(options, num_experts, layers[0].meta)
    origin = options.origin if options.origin != "auto" else ("rank" if world_size > 1 else "sequence")
    all_steps = np.unique(np.concatenate([layer.step for layer in layers]))
    plan_steps, eval_steps, plan_window, eval_window = _windows(all_steps, options)

    # (S, L, E) processed assignments per plan step, and the evaluation load (L, E) and by source (L, S, E).
    plan_counts = np.zeros((len(plan_steps), len(layers), num_experts), dtype=np.int64)
    eval_load = np.zeros((len(layers), num_experts), dtype=np.int64)
    source_load = np.zeros((len(layers), options.gpus, num_experts), dtype=np.int64)
    for i, layer in enumerate(layers):
        step_index = np.searchsorted(plan_steps, layer.step)
        in_plan = _in_window(layer.step, plan_window)
        plan_counts[:, i, :] = metrics.step_loads(
            layer.experts[in_plan], step_index[in_plan], len(plan_steps), num_experts, layer.dropped[in_plan]
        )
        in_eval = _in_window(layer.step, eval_window)
        sources = _source_of(layer, origin, options.gpus)[in_eval]
        source_load[i] = metrics.step_loads(
            layer.experts[in_eval], sources, options.gpus, num_experts, layer.dropped[in_eval]
        )
        eval_load[i] = source_load[i].sum(axis=0)

    return _plan_and_evaluate(
        [layer.index for layer in layers], plan_counts, eval_load, source_load, options,
        replicas=replicas, groups=groups, origin=origin, plan_steps=plan_steps, eval_steps=eval_steps,
    )


def evaluate_placement_counts(
    layer_meta: list[dict[str, Any]],
    loads: dict[str, np.ndarray],
    options: EplbOptions,
) -> dict[str, Any]:
    """``evaluate_placement`` for a counts trace: the loads table's (step, layer, expert, rank, tokens) rows.

    There are no sequences, so tokens originate on their recorded rank (``origin=rank``; ``origin=sequence``
    is refused).
    """
    if not layer_meta:
        raise ValueError("--eplb: no layers to place")
    num_experts = int(layer_meta[0]["num_experts"])
    if any(int(m["num_experts"]) != num_experts for m in layer_meta):
        raise ValueError("--eplb: layers have different numbers of experts; select layers of one size with --layers")
    if options.origin == "sequence":
        raise ValueError("--eplb: origin=sequence needs per-token routing; this trace holds only expert counts")
    replicas, groups = _replicas_and_groups(options, num_experts, layer_meta[0])
    step, layer, expert = loads["step"], loads["layer"], loads["expert"]
    rank, tokens = loads["rank"], loads["tokens"]
    slot = {int(m["index"]): i for i, m in enumerate(layer_meta)}
    keep = np.isin(layer, list(slot)) & (expert >= 0) & (expert < num_experts)
    step, layer, expert, rank, tokens = step[keep], layer[keep], expert[keep], rank[keep], tokens[keep]
    row = np.array([slot[int(x)] for x in layer], dtype=np.int64)
    plan_steps, eval_steps, plan_window, eval_window = _windows(np.unique(step), options)
    plan_counts = np.zeros((len(plan_steps), len(layer_meta), num_experts), dtype=np.int64)
    in_plan = _in_window(step, plan_window)
    np.add.at(plan_counts, (np.searchsorted(plan_steps, step[in_plan]), row[in_plan], expert[in_plan]), tokens[in_plan])
    source_load = np.zeros((len(layer_meta), options.gpus, num_experts), dtype=np.int64)
    in_eval = _in_window(step, eval_window)
    np.add.at(source_load, (row[in_eval], rank[in_eval] % options.gpus, expert[in_eval]), tokens[in_eval])
    return _plan_and_evaluate(
        [int(m["index"]) for m in layer_meta], plan_counts, source_load.sum(axis=1), source_load, options,
        replicas=replicas, groups=groups, origin="rank", plan_steps=plan_steps, eval_steps=eval_steps,
    )


def _replicas_and_groups(options: EplbOptions, num_experts: int, meta: dict[str, Any]) -> tuple[int, int]:
    replicas = options.replicas or num_experts + (options.redundant or 0)
    if replicas < num_experts:
        raise ValueError(f"--eplb: replicas={replicas} is the number of physical experts and must be >= {num_experts}")
    return replicas, options.groups or int(meta.get("n_group") or 1)


def _windows(all_steps: np.ndarray, options: EplbOptions) -> tuple[np.ndarray, np.ndarray, Window, Window]:
    """The recorded steps of the plan and evaluation windows (plan on 0..N, evaluate on N..end by default)."""
    plan_window: Window = options.plan or (None, None)
    if options.eval is not None:
        eval_window = options.eval
    elif options.plan is not None and options.plan[1] is not None:
        eval_window = (options.plan[1], None)
    else:
        eval_window = plan_window
    plan_steps = all_steps[_in_window(all_steps, plan_window)]
    eval_steps = all_steps[_in_window(all_steps, eval_window)]
    if not len(plan_steps):
        raise ValueError("--eplb: the plan window holds no recorded step")
    if not len(eval_steps):
        raise ValueError("--eplb: the evaluation window holds no recorded step (plan=A:B evaluates on B: by default)")
    return plan_steps, eval_steps, plan_window, eval_window


def _plan_and_evaluate(
    layer_indices: list[int],
    plan_counts: np.ndarray,
    eval_load: np.ndarray,
    source_load: np.ndarray,
    options: EplbOptions,
    *,
    replicas: int,
    groups: int,
    origin: str,
    plan_steps: np.ndarray,
    eval_steps: np.ndarray,
) -> dict[str, Any]:
    """Plan EPLB on ``plan_counts`` (S, L, E) and judge it and contiguous placement on the evaluation loads."""
    num_experts = plan_counts.shape[2]
    estimate = estimate_load(plan_counts, options.estimate)
    try:
        eplb = plan_eplb(estimate, replicas, groups, options.nodes, options.gpus)
    except ValueError as exc:
        raise ValueError(f"--eplb: {exc}") from None
    placements: dict[str, Placement] = {"eplb": eplb}
    notes = []
    if num_experts % options.gpus == 0:
        placements["contiguous"] = contiguous_placement(len(layer_indices), num_experts, options.gpus)
    else:
        notes.append(f"{num_experts} experts do not divide over {options.gpus} GPUs: no contiguous baseline")

    result: dict[str, Any] = {
        "policy": eplb.policy,
        "replicas": replicas,
        "groups": groups,
        "nodes": options.nodes,
        "gpus": options.gpus,
        "estimate": str(options.estimate),
        "origin": origin,
        "plan_steps": [int(plan_steps[0]), int(plan_steps[-1])],
        "eval_steps": [int(eval_steps[0]), int(eval_steps[-1])],
        "layers": list(layer_indices),
        "phy2log": eplb.phy2log.tolist(),
        "log2phy": eplb.log2phy.tolist(),
        "logcnt": eplb.logcnt.tolist(),
        "replicated": [
            {**row, "layer": layer_indices[row["layer"]]} for row in replicated_experts(eplb)
        ],
        "notes": notes,
    }
    for name, placement in placements.items():
        per_gpu = gpu_load(eval_load, placement)
        traffic = traffic_matrix(source_load, placement).sum(axis=0)
        total = traffic.sum()
        result[name] = {
            "gpu_load": per_gpu.tolist(),
            "balancedness": balancedness(per_gpu).tolist(),
            "balancedness_mean": float(balancedness(per_gpu).mean()),
            # vLLM's aggregate: sum over layers of the mean over the sum of the max.
            "balancedness_total": float(per_gpu.mean(axis=1).sum() / per_gpu.max(axis=1).sum())
            if per_gpu.max(axis=1).sum() > 0
            else 1.0,
            "traffic": {
                "matrix": traffic.tolist(),
                "max": float(traffic.max()),
                "mean": float(traffic.mean()),
                "max_over_mean": float(traffic.max() / traffic.mean()) if traffic.mean() > 0 else 1.0,
                "local_share": float(np.trace(traffic) / total) if total > 0 else 0.0,
            },
        }
    return result
