"""The report as one JSON-ready object (schema in docs/report-json.md) and the comparison of two reports.

``build`` assembles it and rounds every float once (``clean``); ``build_report`` and ``compare_reports`` give
it its types (``report_model``), which every output renders from (``moeprobe.cli.render``: JSON, text,
Markdown, HTML), so every format shows the same numbers. Bump ``FORMAT_VERSION`` when a field changes meaning
or goes away; adding fields does not bump it (add them to ``report_model`` too: reading is strict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from . import latency as latency_mod
from . import load as load_mod
from . import placement as placement_mod
from . import router as router_mod
from . import specialization as spec_mod
from .context import Context
from .sampling import DEFAULT_COUNT_BUDGET, DEFAULT_LOGIT_BUDGET, DEFAULT_SAMPLE_BUDGET, Sample, sample as sample_routing
from .filters import Filters
from .stats import spread

if TYPE_CHECKING:
    from .report_model import Comparison, Report
    from .session import Trace

FORMAT_VERSION = 1

# Load metrics summarised across layers: name -> higher value is worse.
LOAD_METRICS: dict[str, bool] = {
    "maxvio_global": True,
    "maxvio_batch_mean": True,
    "maxvio_batch_worst": True,
    "cv": True,
    "entropy_norm": False,
    "gini": True,
    "top_n_coverage": True,
    "dead_experts": True,
}


@dataclass(frozen=True)
class ReportOptions:
    ep_size: int = 8
    window_steps: int | None = None
    windows: int = 10
    top_n: int | None = None  # None: each layer's top-k
    min_count: int = 10
    count_budget: int = DEFAULT_COUNT_BUDGET
    sample_budget: int = DEFAULT_SAMPLE_BUDGET
    logit_budget: int = DEFAULT_LOGIT_BUDGET
    tag_keys: tuple[str, ...] | None = None
    full: bool = False  # add per-value count tables and co-activation matrices

    def to_json(self) -> dict[str, Any]:
        return {
            "ep_size": self.ep_size,
            "placement": "contiguous",
            "window_steps": self.window_steps,
            "top_n": self.top_n,
            "min_count": self.min_count,
            "count_budget": self.count_budget,
            "sample_budget": self.sample_budget,
            "logit_budget": self.logit_budget,
        }


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN and inf become null, numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean_array(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else round(f, 6)
    return value


def _clean_array(value: np.ndarray) -> list[Any]:
    """``clean`` of an array, row by row without a call per element (the --full count tables and co-activation
    matrices hold tens of thousands of numbers): the same values as ``clean(value.tolist())``."""
    if value.ndim > 1:
        return [_clean_array(row) for row in value]
    if value.dtype.kind in "iub":
        plain: list[Any] = value.tolist()  # ints and bools as Python ints and bools, as clean leaves them
        return plain
    if value.dtype.kind == "f":
        return _rounded(value.astype(np.float64, copy=False))
    cleaned: list[Any] = clean(value.tolist())
    return cleaned


# Below this, x * 1e6 is off by at most a quarter after its own rounding, and a half-integer is told apart.
_SCALED_LIMIT = 2.0**50


def _rounded(values: np.ndarray) -> list[Any]:
    """``[round(f, 6) for f in values]`` with None for NaN and inf, exactly, without a Python call per element.

    Python rounds the exact binary value to 6 decimals (half to even) and reads the decimal back: the double
    nearest Q / 10**6. numpy's ``round(x, 6)`` is ``rint(x * 1e6) / 1e6``: the double nearest R / 10**6 (an
    exact integer over 1e6, divided once), so it is the same number wherever R = Q, i.e. wherever rounding
    x * 1e6 to a double did not move it across, or onto, a half-integer. Where the rounded product lies within
    its own rounding error of a half-integer (or is too large to tell), Python's ``round`` decides."""
    finite = np.isfinite(values)
    with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow here and are decided below
        scaled = values * 1e6
        fast = np.round(values, 6)
        near_half = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) <= np.abs(scaled) * 2.0**-51 + 2.0**-60
        unsure = finite & (near_half | ~(np.abs(scaled) < _SCALED_LIMIT))
    out: list[Any] = fast.tolist()
    for i in np.flatnonzero(unsure | ~finite).tolist():
        f = float(values[i])
        out[i] = None if math.isnan(f) or math.isinf(f) else round(f, 6)
    return out


def _layer_json(ctx: Context, item: load_mod.LayerLoad, ep: placement_mod.EPLayer, full: bool) -> dict[str, Any]:
    meta = ctx.layers[item.layer]
    out: dict[str, Any] = {
        "layer": item.layer,
        "name": item.name,
        "experts": item.experts,
        "top_k": item.top_k,
        "scoring": meta.get("scoring"),
        "decisions": item.decisions,
        "tokens": item.tokens,
        "steps": item.steps,
        "dropped": item.dropped,
        "dropped_share": item.dropped / item.decisions if item.decisions else 0.0,
        "maxvio_global": item.maxvio_global,
        "maxvio_batch_mean": item.maxvio_batch_mean,
        "maxvio_batch_worst": item.maxvio_batch_worst,
        "maxvio_batch_worst_step": item.worst_step,
        "cv": item.cv,
        "entropy_norm": item.entropy_norm,
        "gini": item.gini,
        "top_n": item.top_n,
        "top_n_coverage": item.top_n_coverage,
        "dead_experts": len(item.dead),
        "dead_expert_ids": item.dead,
        "counts": item.counts,
        "utilisation": item.utilisation,
        # The load the experts computed: dropped choices excluded (equal to the routed load without drops).
        "processed": {
            "maxvio_global": item.maxvio_processed,
            "cv": item.cv_processed,
            "counts": item.processed,
        },
        "random": {
            "maxvio_global": item.random.maxvio,
            "maxvio_batch_mean": item.random_maxvio_batch,
            "cv": item.random.cv,
            "entropy_norm": item.random.entropy_norm,
            "gini": item.random.gini,
            "top_n_coverage": item.random.top_n_coverage,
            "dead_experts": item.random.dead_experts,
        },
        "ep": {
            "loads": ep.loads,
            "balancedness": ep.balancedness,
            "balancedness_batch": ep.balancedness_batch,
            "random": ep.random,
        },
        "aux_loss": None,
        "windows": [
            {
                "first_step": w.first_step,
                "last_step": w.last_step,
                "maxvio_global": w.maxvio_global,
                "maxvio_batch_mean": w.maxvio_batch,
                "cv": w.cv,
                "random": {"maxvio_global": w.random_maxvio_global, "cv": w.random_cv},
            }
            for w in item.windows
        ],
    }
    if full:
        out["first_choice_counts"] = item.first
    return out


def _overall(load: load_mod.Load, layers: list[dict[str, Any]], ep: placement_mod.EPLoad) -> dict[str, Any]:
    indices = [item["layer"] for item in layers]
    metrics: dict[str, Any] = {}
    for name, worse_high in LOAD_METRICS.items():
        summary = spread([item[name] for item in layers], indices, higher_is_worse=worse_high)
        summary["random"] = _nanmean([item["random"].get(name) for item in layers])
        metrics[name] = summary
    by_index: dict[int, list[load_mod.Window]] = {}
    for item in load.layers:
        for w in item.windows:
            by_index.setdefault(w.index, []).append(w)
    windows = [
        {
            "first_step": min(w.first_step for w in group),
            "last_step": max(w.last_step for w in group),
            "maxvio_global": _nanmean([w.maxvio_global for w in group]),
            "maxvio_batch_mean": _nanmean([w.maxvio_batch for w in group]),
            "cv": _nanmean([w.cv for w in group]),
            "random": {
                "maxvio_global": _nanmean([w.random_maxvio_global for w in group]),
                "cv": _nanmean([w.random_cv for w in group]),
            },
        }
        for _, group in sorted(by_index.items())
    ]
    dropped = sum(item["dropped"] for item in layers)
    return {
        "layers": len(layers),
        "decisions": load.decisions,
        "dropped": dropped,
        "dropped_share": dropped / load.decisions if load.decisions else 0.0,
        "processed": {
            "maxvio_global": _nanmean([item["processed"]["maxvio_global"] for item in layers]),
            "cv": _nanmean([item["processed"]["cv"] for item in layers]),
        },
        "tokens": max((item["tokens"] for item in layers), default=0),
        "steps": max((item["steps"] for item in layers), default=0),
        "first_step": load.first_step,
        "last_step": load.last_step,
        "window_steps": load.window_steps,
        "metrics": metrics,
        "balancedness": {
            "ep_size": ep.ep_size,
            "placement": ep.placement,
            "sglang": ep.sglang,
            "vllm": ep.vllm,
            "sglang_batch": ep.sglang_batch,
            "vllm_batch": ep.vllm_batch,
            "random": ep.random_sglang,
        },
        "windows": windows,
        "aux_loss": None,
    }


def _nanmean(values: list[Any]) -> float | None:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(arr)) if (~np.isnan(arr)).any() else None


def _specialization_json(spec: spec_mod.Specialization, full: bool) -> dict[str, Any]:
    tags = []
    for tag in spec.tags:
        layers = []
        for tl in tag.layers:
            share, olmoe, rel = tl.share, tl.olmoe, tl.relative_load
            top: dict[str, list[dict[str, Any]]] = {}
            for v, value in enumerate(tag.values):
                order = np.argsort(-np.nan_to_num(share[v], nan=-1.0))[:3]
                top[value] = [
                    {"expert": int(e), "share": share[v, e], "olmoe": olmoe[v, e], "relative_load": rel[v, e]}
                    for e in order
                    if tl.counts[v, e] > 0
                ]
            entry: dict[str, Any] = {
                "layer": tl.layer,
                "assignments": int(tl.counts.sum()),
                "nmi": tl.mi.nmi,
                "mi_nats": tl.mi.mi_nats,
                "bias_nats": tl.mi.bias_nats,
                "h_tag_nats": tl.mi.h_tag_nats,
                "top_experts": top,
            }
            if full:
                entry["counts"] = tl.counts
            layers.append(entry)
        tags.append({"key": tag.key, "values": tag.values, "layers": layers})
    coact = []
    for c in spec.coactivation:
        entry = {
            "layer": c.layer,
            "random": c.random,
            "top_pairs": [{"i": i, "j": j, "p": p} for i, j, p in c.top_pairs(5)],
        }
        if full:
            entry["matrix"] = c.matrix
        coact.append(entry)
    return {
        "counts_sample": spec.counts_sample.to_json(),
        "sample": spec.sample.to_json(),
        "tags": tags,
        "tags_skipped": [{"key": t.key, "values": t.values} for t in spec.tags_skipped],
        "vocabulary": {
            "min_count": spec.vocabulary.min_count,
            "layers": [
                {
                    "layer": v.layer,
                    "value": v.value,
                    "random": v.random,
                    "token_ids": v.token_ids,
                    "token_ids_below_min_count": v.token_ids_below,
                }
                for v in spec.vocabulary.layers
            ],
        },
        "repetition": {
            "layers": [
                {
                    "layer": r.layer,
                    "pairs": r.pairs,
                    "first": r.first,
                    "any": r.any,
                    "random_first": r.random_first,
                    "random_any": r.random_any,
                }
                for r in spec.repetition
            ]
        },
        "coactivation": {"layers": coact},
        "router": None,
    }


# What a counts trace (expert loads per step, no per-token rows) cannot show, said in the report instead of
# empty tables.
NEEDS_TOKENS = (
    "tag specialization",
    "vocabulary specialization",
    "repetition",
    "co-activation",
    "router statistics",
    "re-routing simulation",
)


def _counts_only_specialization() -> dict[str, Any]:
    nothing = {"fraction": 1.0, "decisions": 0, "sequences": 0, "budget": 0}
    return {
        "counts_sample": nothing,
        "sample": nothing,
        "tags": [],
        "tags_skipped": [],
        "vocabulary": {"min_count": 0, "layers": []},
        "repetition": {"layers": []},
        "coactivation": {"layers": []},
        "router": None,
        "needs_tokens": list(NEEDS_TOKENS),
    }


def _quantiles_json(q: latency_mod.Quantiles) -> dict[str, Any]:
    return {"n": q.n, "p50": q.p50, "p90": q.p90, "p99": q.p99, "max": q.max}


def _fit_json(fit: tuple[float, float, int] | None) -> dict[str, Any]:
    r, slope, n = fit if fit is not None else (math.nan, math.nan, 0)
    return {"r": r, "slope_ms": slope, "n": n}


def _latency_json(lat: latency_mod.Latency) -> dict[str, Any] | None:
    if not lat.layers:
        return None
    return {
        "clocks": lat.clocks,
        "steps": lat.steps,
        "moe_ms_per_step": _quantiles_json(lat.moe_ms_per_step),
        "router_ms_per_step_p50": lat.router_ms_per_step_p50,
        "layers": [
            {
                "layer": item.layer,
                "router_ms": _quantiles_json(item.router),
                "block_ms": _quantiles_json(item.block),
                "by_phase": {
                    phase: {
                        "router_ms": _quantiles_json(r),
                        "block_ms": _quantiles_json(b),
                        "block_vs_max_load": _fit_json(item.load_by_phase.get(phase)),
                    }
                    for phase, (r, b) in sorted(item.by_phase.items())
                },
                "block_vs_max_load": {"r": item.load_r, "slope_ms": item.load_slope_ms, "n": item.load_n},
            }
            for item in lat.layers
        ],
    }


def build(trace: Trace, filters: Filters | None = None, options: ReportOptions | None = None) -> dict[str, Any]:
    """The whole report for one trace, as a JSON-ready dict."""
    options = options or ReportOptions()
    ctx = trace.context(filters)
    load = load_mod.compute(
        ctx, top_n=options.top_n, window_steps=options.window_steps, windows=options.windows, first_choice=options.full
    )
    ep = placement_mod.compute(ctx, load, ep_size=options.ep_size)
    layers = [_layer_json(ctx, item, ep.layer(item.layer), options.full) for item in load.layers]
    overall = _overall(load, layers, ep) if layers else _empty_overall(load, ep)
    # Rows no analysis may use (expert id out of range, NULLs, negative steps, unknown layers): shown, not hidden.
    invalid = ctx.invalid_decisions()
    overall["invalid_decisions"] = sum(invalid.values())
    for item in layers:
        item["invalid_decisions"] = invalid.get(item["layer"], 0)

    if ctx.mode == "counts":
        specialization = _counts_only_specialization()
    else:
        counts = sample_routing(ctx, options.count_budget, materialize=False)
        sample = sample_routing(ctx, options.sample_budget)
        keys = list(options.tag_keys) if options.tag_keys is not None else None
        spec = spec_mod.compute(ctx, counts, sample, keys=keys, min_count=options.min_count)
        specialization = _specialization_json(spec, options.full)
        router_sample = router_mod.choose_sample(ctx, sample, options.logit_budget)
        routers = router_mod.compute(ctx, router_sample)
        if routers:
            _attach_router(routers, router_sample, options.logit_budget, layers, overall, specialization)
    lat = latency_mod.compute(ctx)

    reader = trace.reader
    report = {
        "format_version": FORMAT_VERSION,
        "generator": f"moeprobe {__version__}",
        "trace": {
            "path": str(trace.path),
            "status": trace.status,
            "model": reader.model,
            "world_size": trace.manifest.get("world_size"),
            "ranks": sorted(reader.shards),
            "mode": ctx.mode,
            "source": trace.manifest.get("source"),
            "segments": {name: len(reader.segments(name)) for name in ("routing", "scores", "latency")},
            # Capture health: anything here means some routing is missing or approximate (see docs/compatibility.md).
            "anomalies": dict(trace.manifest.get("counters", {}).get("anomalies", {})),
            "errors": sorted({str(s["error"]) for s in trace.manifest.get("shards", []) if s.get("error")}),
        },
        "filters": ctx.filters.to_json(),
        "options": options.to_json() | {"window_steps": load.window_steps},
        "overall": overall,
        "layers": layers,
        "specialization": specialization,
        "latency": _latency_json(lat),
    }
    cleaned: dict[str, Any] = clean(report)
    return cleaned


def build_report(trace: Trace, filters: Filters | None = None, options: ReportOptions | None = None) -> Report:
    """The whole report for one trace, typed."""
    from .report_model import Report

    return Report.from_json(build(trace, filters, options))


def _empty_overall(load: load_mod.Load, ep: placement_mod.EPLoad) -> dict[str, Any]:
    empty = {"mean": None, "p50": None, "p90": None, "min": None, "max": None, "worst_layer": None, "random": None}
    return {
        "layers": 0,
        "decisions": 0,
        "dropped": 0,
        "dropped_share": 0.0,
        "processed": {"maxvio_global": None, "cv": None},
        "tokens": 0,
        "steps": 0,
        "first_step": None,
        "last_step": None,
        "window_steps": load.window_steps,
        "metrics": {name: dict(empty) for name in LOAD_METRICS},
        "balancedness": {"ep_size": ep.ep_size, "placement": ep.placement, "sglang": None, "vllm": None,
                         "sglang_batch": None, "vllm_batch": None, "random": None},
        "windows": [],
        "aux_loss": None,
    }


def _attach_router(
    routers: list[router_mod.RouterLayer],
    sample: Sample,
    logit_budget: int,
    layers: list[dict[str, Any]],
    overall: dict[str, Any],
    specialization: dict[str, Any],
) -> None:
    by_layer = {r.layer: r for r in routers}
    for item in layers:
        r = by_layer.get(item["layer"])
        if r is not None:
            item["aux_loss"] = {"switch": r.switch_loss, "deepseek_seq": r.deepseek_seq_loss, "z_loss": r.z_loss}
    overall["aux_loss"] = {
        "switch": _nanmean([r.switch_loss for r in routers]),
        "deepseek_seq": _nanmean([r.deepseek_seq_loss for r in routers]),
        "z_loss": _nanmean([r.z_loss for r in routers]),
    }
    specialization["router"] = {
        "layers": [
            {
                "layer": r.layer,
                "scoring": r.scoring,
                "tokens": r.tokens,
                "entropy_norm": r.entropy_norm,
                "margin": r.margin,
                "bias_flip": r.bias_flip,
                "bias_tokens": r.bias_tokens,
            }
            for r in routers
        ],
        # The sequences the statistics read: the token-level sample, or a smaller one under the logit budget.
        "sample": sample.to_json(),
        "logit_budget": logit_budget,
    }


# -- comparison -----------------------------------------------------------------------------------------
# (label, path into the report) of the scalars a comparison lines up; per-layer ones are looked up by layer.
COMPARED_OVERALL: list[tuple[str, tuple[str, ...]]] = [
    *[(name, ("overall", "metrics", name, "mean")) for name in LOAD_METRICS],
    ("maxvio_global_processed", ("overall", "processed", "maxvio_global")),
    ("cv_processed", ("overall", "processed", "cv")),
    ("dropped_share", ("overall", "dropped_share")),
    ("balancedness_sglang", ("overall", "balancedness", "sglang")),
    ("balancedness_vllm", ("overall", "balancedness", "vllm")),
    ("balancedness_sglang_batch", ("overall", "balancedness", "sglang_batch")),
    ("balancedness_vllm_batch", ("overall", "balancedness", "vllm_batch")),
    ("aux_loss_switch", ("overall", "aux_loss", "switch")),
    ("aux_loss_deepseek_seq", ("overall", "aux_loss", "deepseek_seq")),
    ("moe_ms_per_step_p50", ("latency", "moe_ms_per_step", "p50")),
]
COMPARED_LAYER: list[tuple[str, tuple[str, ...]]] = [
    ("maxvio_global", ("maxvio_global",)),
    ("maxvio_global_processed", ("processed", "maxvio_global")),
    ("dropped_share", ("dropped_share",)),
    ("maxvio_batch_mean", ("maxvio_batch_mean",)),
    ("cv", ("cv",)),
    ("entropy_norm", ("entropy_norm",)),
    ("gini", ("gini",)),
    ("balancedness", ("ep", "balancedness")),
]


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _pair(a: Any, b: Any) -> dict[str, Any]:
    delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
    return {"a": a, "b": b, "delta": delta}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two reports side by side: both in full, and the differences (b - a) of the headline numbers."""
    overall = {label: _pair(_get(a, path), _get(b, path)) for label, path in COMPARED_OVERALL}
    layers_a = {item["layer"]: item for item in a["layers"]}
    layers_b = {item["layer"]: item for item in b["layers"]}
    per_layer = []
    for index in sorted(set(layers_a) | set(layers_b)):
        la, lb = layers_a.get(index, {}), layers_b.get(index, {})
        per_layer.append({"layer": index, **{label: _pair(_get(la, p), _get(lb, p)) for label, p in COMPARED_LAYER}})
    cleaned: dict[str, Any] = clean(
        {
            "format_version": FORMAT_VERSION,
            "generator": f"moeprobe {__version__}",
            "compare": {"a": a["trace"]["path"], "b": b["trace"]["path"]},
            "diff": {"overall": overall, "layers": per_layer},
            "a": a,
            "b": b,
        }
    )
    return cleaned


def compare_reports(a: Report, b: Report) -> Comparison:
    """``compare`` of two typed reports, typed."""
    from .report_model import Comparison

    return Comparison.from_json(compare(a.to_json(), b.to_json()))
