"""Rich display in Jupyter (``_repr_html_``) of a trace and of the analysis results: small HTML tables of the
headline numbers beside their random-routing baselines, and the load heat map as inline SVG.

The SVG is rendered here by vl-convert (the ``html`` extra), so a notebook shows it without any JavaScript
and it survives in a saved notebook on GitHub. Without vl-convert the tables still show, with a note. Every
string from the trace (paths, layer names, tag values) is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .latency import Latency
    from .load import Load
    from .placement import EPLoad
    from .session import Trace
    from .specialization import Specialization

_STYLE = "border-collapse:collapse;font-size:12px"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"{value:,}"
    f = float(value)
    return "-" if math.isnan(f) else f"{f:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th style="text-align:right;padding:2px 6px">{html.escape(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:right;padding:2px 6px">{html.escape(str(c))}</td>' for c in row) + "</tr>"
        for row in rows
    )
    return f'<table style="{_STYLE}"><tr>{head}</tr>{body}</table>'


def heatmap_svg(load: Load) -> str:
    """The layer x expert utilisation heat map as an inline SVG element, or a one-line note why not."""
    from ..charts import specs
    from ..charts.render import MissingDependency, to_svg

    layers = [
        {"layer": item.layer, "utilisation": item.utilisation.tolist(), "counts": item.counts.tolist()}
        for item in load.layers
    ]
    spec = specs.heatmap({"layers": layers})
    if spec is None:
        return "<p><i>no routing decisions</i></p>"
    try:
        svg = to_svg(spec)
    except MissingDependency as exc:
        return f"<p><i>{html.escape(str(exc))}</i></p>"
    return f'<div class="moeprobe-heatmap">{svg}</div>'


def load_html(load: Load, *, heatmap: bool = True) -> str:
    rows = [
        [item.layer, item.experts, item.top_k, _fmt(item.decisions), _fmt(item.maxvio_global), _fmt(item.random.maxvio),
         _fmt(item.maxvio_batch_mean), _fmt(item.random_maxvio_batch), _fmt(item.cv), _fmt(item.random.cv), len(item.dead)]
        for item in load.layers
    ]
    out = table(["layer", "E", "k", "decisions", "MaxVio", "random", "MaxVio_batch", "random", "CV", "random", "dead"], rows)
    return (heatmap_svg(load) if heatmap else "") + out


def trace_html(trace: Trace) -> str:
    from ..traces.errors import TraceError

    model = trace.reader.model or {}
    name = model.get("name") if isinstance(model, dict) else None
    head = (f"<p><b>moeprobe trace</b> {html.escape(str(trace.path))} ({html.escape(str(trace.status))}), "
            f"model {html.escape(str(name or '-'))}, {len(trace.layers)} MoE layers</p>")
    try:
        body = load_html(trace.load())
    except TraceError as exc:  # a damaged trace still displays, with the reason
        body = f"<p><i>load not available: {html.escape(str(exc))}</i></p>"
    return head + body


def ep_load_html(ep: EPLoad) -> str:
    head = (f"<p>EP size {ep.ep_size} ({html.escape(ep.placement)}): balancedness SGLang {_fmt(ep.sglang)}, "
            f"vLLM {_fmt(ep.vllm)}, per batch {_fmt(ep.sglang_batch)}; random routing {_fmt(ep.random_sglang)}</p>")
    rows = [[item.layer, _fmt(item.balancedness), _fmt(item.balancedness_batch), _fmt(item.random),
             " ".join(str(int(v)) for v in item.loads)] for item in ep.layers]
    return head + table(["layer", "balancedness", "per batch", "random", "assignments per rank"], rows)


def latency_html(lat: Latency) -> str:
    head = (f"<p>{lat.steps:,} steps, clock {html.escape(', '.join(lat.clocks) or '-')}: MoE ms per step p50 "
            f"{_fmt(lat.moe_ms_per_step.p50)}, p99 {_fmt(lat.moe_ms_per_step.p99)}</p>")
    rows = [[item.layer, _fmt(item.router.p50, 4), _fmt(item.router.p99, 4), _fmt(item.block.p50, 4),
             _fmt(item.block.p99, 4), _fmt(item.load_r), _fmt(item.load_slope_ms, 5)] for item in lat.layers]
    return head + table(["layer", "router p50", "router p99", "block p50", "block p99", "r(block, max load)", "ms / assignment"], rows)


def specialization_html(spec: Specialization) -> str:
    parts = []
    for tag in spec.tags:
        rows = [[item.layer, _fmt(item.mi.nmi), _fmt(item.mi.mi_nats, 4), _fmt(item.mi.bias_nats, 4)] for item in tag.layers]
        parts.append(f"<p>tag <b>{html.escape(tag.key)}</b> ({len(tag.values)} values; NMI 0 = independent)</p>"
                     + table(["layer", "NMI", "MI nats", "bias nats (random)"], rows))
    rows = [[c.layer, _fmt(c.random)] + [f"e{i}->e{j} {p:.3f}" for i, j, p in c.top_pairs(3)] for c in spec.coactivation]
    if rows:
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        parts.append("<p>co-activation P(j | i), strongest pairs</p>"
                     + table(["layer", "random"] + ["pair"] * (width - 2), rows))
    return "".join(parts) or "<p><i>no tags and no co-activation sample</i></p>"
