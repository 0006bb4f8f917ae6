"""Vega-Lite specs of the report's charts, built from the analysis results in their JSON form.

Inputs are the ``moeprobe report --json --full`` object (docs/report-json.md), ``Trace.timeline().to_json()``
and the ``moeprobe simulate --json`` object: the numbers a chart shows are the numbers those print, never a new
query. Every function returns a plain dict (Vega-Lite v6 JSON) or None when the trace has nothing to draw.
Nothing here imports the rest of moeprobe, so the analysis objects can use it for notebooks too.
"""

from __future__ import annotations

import math
from typing import Any

SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"


def utilisation_scale(high: float) -> dict[str, Any]:
    """Blue below a fair share, white at it, red above. The domain always spans at least 0 to 2, so that a
    balanced layer looks pale instead of being stretched over the full palette, and two heat maps drawn with
    the same ``high`` can be compared by eye."""
    return {"scheme": "redblue", "reverse": True, "domain": [0, max(2.0, high)], "domainMid": 1}


def max_utilisation(report: dict[str, Any]) -> float:
    values = [u for item in report["layers"] for u in (item.get("utilisation") or []) if _finite(u) is not None]
    return max(values, default=0.0)
FONT_CONFIG = {"view": {"stroke": None}, "axis": {"labelFontSize": 10, "titleFontSize": 11}}


def _base(title: str, subtitle: str | None = None) -> dict[str, Any]:
    head: dict[str, Any] = {"text": title, "anchor": "start"}
    if subtitle:
        head["subtitle"] = subtitle
    return {"$schema": SCHEMA, "title": head, "config": FONT_CONFIG, "background": "white"}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def inline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``data`` and ``transform`` carrying ``rows`` column by column: one record of equal-length arrays that a
    flatten transform turns back into the rows. The field names are written once instead of once per row,
    which makes a large heat map's page about half the size."""
    columns = list(rows[0]) if rows else []
    record = {name: [row[name] for row in rows] for name in columns}
    return {"data": {"values": [record]}, "transform": [{"flatten": columns}] if columns else []}


def rows_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows a spec built with ``inline`` draws (for tests and for anyone reading a spec back)."""
    (record,) = spec["data"]["values"]
    columns = list(record)
    return [dict(zip(columns, values, strict=True)) for values in zip(*(record[c] for c in columns), strict=True)]


def _cell_size(count: int, lo: int, hi: int, span: int) -> int:
    """Pixels per row or column so that ``count`` of them fill about ``span`` pixels, within [lo, hi]."""
    return max(lo, min(hi, span // max(1, count)))


def heatmap(report: dict[str, Any], *, label: str = "", color_max: float | None = None) -> dict[str, Any] | None:
    """Layer x expert: each expert's load over a fair share (c_e / (T k / E)); one rect per (layer, expert).
    ``color_max``: top of the colour scale (default: this report's largest utilisation, at least 2)."""
    rows = []
    max_experts = 0
    for item in report["layers"]:
        util, counts = item.get("utilisation") or [], item.get("counts") or []
        max_experts = max(max_experts, len(util))
        for expert, (u, c) in enumerate(zip(util, counts, strict=True)):
            rows.append({"layer": item["layer"], "expert": expert, "utilisation": _finite(u), "count": c})
    if not rows:
        return None
    layers = len(report["layers"])
    spec = _base(f"{label}expert load per layer", "load / fair share (1 = T·k/E); hover for values")
    spec.update(
        {
            **inline(rows),
            "mark": {"type": "rect"},
            "width": {"step": _cell_size(max_experts, 3, 24, 960)},
            "height": {"step": _cell_size(layers, 8, 24, 480)},
            "encoding": {
                "x": {"field": "expert", "type": "ordinal", "axis": {"labelOverlap": "greedy", "labelAngle": 0}},
                "y": {"field": "layer", "type": "ordinal", "axis": {"labelOverlap": "greedy"}},
                "color": {
                    "field": "utilisation",
                    "type": "quantitative",
                    "scale": utilisation_scale(max_utilisation(report) if color_max is None else color_max),
                    "title": "load / fair",
                },
                "tooltip": [
                    {"field": "layer", "type": "ordinal"},
                    {"field": "expert", "type": "ordinal"},
                    {"field": "utilisation", "type": "quantitative", "format": ".3f"},
                    {"field": "count", "type": "quantitative", "title": "assignments"},
                ],
            },
        }
    )
    return spec


def maxvio_over_time(report: dict[str, Any], timeline: dict[str, Any], *, label: str = "") -> dict[str, Any] | None:
    """MaxVio of each step (or bucket of steps) per layer, with the random-routing level as a dashed rule."""
    mv = timeline["maxvio"]
    if not mv["layer"]:
        return None
    bucket = timeline["bucket_steps"]
    rows = [
        {"layer": layer, "step": first, "last_step": last, "maxvio": mean, "worst": worst}
        for layer, first, last, mean, worst in zip(mv["layer"], mv["first_step"], mv["last_step"], mv["mean"], mv["max"], strict=True)
    ]
    random_level = report["overall"]["metrics"]["maxvio_batch_mean"].get("random")
    subtitle = "MaxVio_batch of each step" if bucket == 1 else f"MaxVio_batch, mean of each {bucket} steps (worst step on hover)"
    if random_level is not None:
        subtitle += f"; dashed: random routing {random_level:.3f}"
    spec = _base(f"{label}MaxVio per step", subtitle)
    line = {
        "mark": {"type": "line", "point": len(rows) <= 400, "strokeWidth": 1.2},
        "encoding": {
            "x": {"field": "step", "type": "quantitative", "title": "step", "scale": {"nice": False, "zero": False}},
            "y": {"field": "maxvio", "type": "quantitative", "title": "MaxVio_batch"},
            "color": {"field": "layer", "type": "nominal", "legend": {"columns": 2, "symbolLimit": 64}},
            "tooltip": [
                {"field": "layer", "type": "nominal"},
                {"field": "step", "type": "quantitative", "title": "first step"},
                {"field": "last_step", "type": "quantitative", "title": "last step"},
                {"field": "maxvio", "type": "quantitative", "format": ".3f", "title": "MaxVio_batch"},
                {"field": "worst", "type": "quantitative", "format": ".3f", "title": "worst step"},
            ],
        },
    }
    layers: list[dict[str, Any]] = [line]
    if random_level is not None:
        layers.append(
            {
                "data": {"values": [{"random": random_level}]},
                "mark": {"type": "rule", "strokeDash": [4, 3], "color": "#555"},
                "encoding": {"y": {"field": "random", "type": "quantitative"}},
            }
        )
    spec.update({**inline(rows), "width": 640, "height": 260, "layer": layers})
    return spec


def _layer_entry(entries: list[dict[str, Any]], layer: int) -> dict[str, Any] | None:
    return next((e for e in entries if e["layer"] == layer), None)


def domain_distribution(report: dict[str, Any], key: str, layer: int, *, label: str = "") -> dict[str, Any] | None:
    """One tag's values x experts in ``layer``: each value's share of its assignments per expert."""
    tag = next((t for t in report["specialization"]["tags"] if t["key"] == key), None)
    if tag is None:
        return None
    entry = _layer_entry(tag["layers"], layer)
    if entry is None or entry.get("counts") is None:
        return None
    rows = []
    for value, counts in zip(tag["values"], entry["counts"], strict=True):
        total = sum(counts)
        for expert, count in enumerate(counts):
            rows.append({"value": value, "expert": expert, "share": count / total if total else None, "count": count})
    experts = len(entry["counts"][0]) if entry["counts"] else 0
    nmi = entry.get("nmi")
    subtitle = f"layer {layer}: share of each {key}'s assignments per expert (uniform 1/{experts})"
    if nmi is not None:
        subtitle += f"; NMI {nmi:.3f} (independent 0)"
    spec = _base(f"{label}experts by {key}", subtitle)
    spec.update(
        {
            **inline(rows),
            "mark": "rect",
            "width": {"step": _cell_size(experts, 3, 24, 960)},
            "height": {"step": _cell_size(len(tag["values"]), 12, 28, 320)},
            "encoding": {
                "x": {"field": "expert", "type": "ordinal", "axis": {"labelOverlap": "greedy", "labelAngle": 0}},
                "y": {"field": "value", "type": "nominal", "title": key, "sort": tag["values"]},
                "color": {"field": "share", "type": "quantitative", "scale": {"scheme": "blues"}, "title": "share"},
                "tooltip": [
                    {"field": "value", "type": "nominal", "title": key},
                    {"field": "expert", "type": "ordinal"},
                    {"field": "share", "type": "quantitative", "format": ".3f"},
                    {"field": "count", "type": "quantitative", "title": "assignments"},
                ],
            },
        }
    )
    return spec


def coactivation(report: dict[str, Any], layer: int, *, label: str = "") -> dict[str, Any] | None:
    """P(j chosen | i chosen) for every pair of experts of ``layer`` (OLMoE's co-activation)."""
    entry = _layer_entry(report["specialization"]["coactivation"]["layers"], layer)
    if entry is None or entry.get("matrix") is None:
        return None
    matrix = entry["matrix"]
    rows = [{"i": i, "j": j, "p": p} for i, row in enumerate(matrix) for j, p in enumerate(row)]
    random_level = entry.get("random")
    subtitle = f"layer {layer}: P(j chosen | i chosen)"
    if random_level is not None:
        subtitle += f"; random routing {random_level:.3f}"
    spec = _base(f"{label}co-activation", subtitle)
    spec.update(
        {
            **inline(rows),
            "mark": "rect",
            "width": {"step": _cell_size(len(matrix), 2, 18, 560)},
            "height": {"step": _cell_size(len(matrix), 2, 18, 560)},
            "encoding": {
                "x": {"field": "j", "type": "ordinal", "title": "expert j", "axis": {"labelOverlap": "greedy", "labelAngle": 0}},
                "y": {"field": "i", "type": "ordinal", "title": "expert i", "axis": {"labelOverlap": "greedy"}},
                "color": {"field": "p", "type": "quantitative", "scale": {"scheme": "oranges"}, "title": "P(j | i)"},
                "tooltip": [
                    {"field": "i", "type": "ordinal", "title": "expert i"},
                    {"field": "j", "type": "ordinal", "title": "expert j"},
                    {"field": "p", "type": "quantitative", "format": ".3f", "title": "P(j | i)"},
                ],
            },
        }
    )
    return spec


def latency_vs_load(timeline: dict[str, Any], *, label: str = "") -> dict[str, Any] | None:
    """Router and block time of each latency row against the same step's busiest-expert load."""
    lat = timeline["latency"]
    if not lat["step"]:
        return None
    rows = [
        {"layer": layer, "step": step, "top": top, "router_ms": r, "block_ms": b}
        for layer, step, top, r, b in zip(lat["layer"], lat["step"], lat["top"], lat["router_ms"], lat["block_ms"], strict=True)
    ]
    subtitle = "one point per layer call; x: assignments to the step's busiest expert"
    if lat["kept"] < lat["rows"]:
        subtitle += f" ({lat['kept']:,} of {lat['rows']:,} calls, random sample)"

    def panel(field: str, title: str) -> dict[str, Any]:
        return {
            "width": 320,
            "height": 240,
            "mark": {"type": "point", "filled": True, "opacity": 0.6, "size": 18},
            "encoding": {
                # log: a prefill step's load is orders of magnitude above a decode step's (and always >= 1:
                # a (step, layer) row exists only where some expert was chosen)
                "x": {"field": "top", "type": "quantitative", "title": "max expert load (log)", "scale": {"type": "log"},
                      "axis": {"labelOverlap": "greedy"}},
                "y": {"field": field, "type": "quantitative", "title": title, "scale": {"zero": False}},
                "color": {"field": "layer", "type": "nominal", "legend": {"columns": 2, "symbolLimit": 64}},
                "tooltip": [
                    {"field": "layer", "type": "nominal"},
                    {"field": "step", "type": "quantitative"},
                    {"field": "top", "type": "quantitative", "title": "max expert load"},
                    {"field": field, "type": "quantitative", "format": ".4f", "title": title},
                ],
            },
        }

    spec = _base(f"{label}latency against load", subtitle)
    spec.update({**inline(rows), "hconcat": [panel("router_ms", "router ms"), panel("block_ms", "block ms")]})
    return spec


def unit_load(rows: list[dict[str, Any]], units: str, *, title: str, subtitle: str) -> dict[str, Any] | None:
    """Layer x GPU (or expert) load over the layer's mean, one panel per placement or strategy.

    ``rows``: {"setup", "layer", "unit", "load", "relative"} with relative = load / the layer's mean load.
    """
    if not rows:
        return None
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    n_units = len({r["unit"] for r in rows})
    n_layers = len({r["layer"] for r in rows})
    spec = _base(title, subtitle)
    spec.update(
        {
            **inline(rows),
            "facet": {"column": {"field": "setup", "type": "nominal", "title": None, "sort": setups}},
            "spec": {
                "width": {"step": _cell_size(n_units, 3, 28, 720 // max(1, len(setups)))},
                "height": {"step": _cell_size(n_layers, 6, 24, 480)},
                "mark": "rect",
                "encoding": {
                    "x": {"field": "unit", "type": "ordinal", "title": units, "axis": {"labelOverlap": "greedy", "labelAngle": 0}},
                    "y": {"field": "layer", "type": "ordinal", "axis": {"labelOverlap": "greedy"}},
                    "color": {"field": "relative", "type": "quantitative", "title": "load / mean",
                              "scale": utilisation_scale(max((r["relative"] or 0.0) for r in rows))},
                    "tooltip": [
                        {"field": "setup", "type": "nominal"},
                        {"field": "layer", "type": "ordinal"},
                        {"field": "unit", "type": "ordinal", "title": units},
                        {"field": "load", "type": "quantitative", "title": "assignments"},
                        {"field": "relative", "type": "quantitative", "format": ".3f", "title": "load / mean"},
                    ],
                },
            },
        }
    )
    return spec


def balancedness_bars(rows: list[dict[str, Any]], *, title: str, subtitle: str) -> dict[str, Any] | None:
    """Balancedness (mean / max load) per layer, one bar per placement or strategy. rows: setup, layer, value."""
    if not rows:
        return None
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    spec = _base(title, subtitle)
    spec.update(
        {
            **inline(rows),
            "width": {"step": 10 * max(1, len(setups))},
            "height": 200,
            "mark": "bar",
            "encoding": {
                "x": {"field": "layer", "type": "ordinal", "axis": {"labelOverlap": "greedy", "labelAngle": 0}},
                "xOffset": {"field": "setup", "type": "nominal", "sort": setups},
                "y": {"field": "value", "type": "quantitative", "title": "balancedness", "scale": {"domain": [0, 1]}},
                "color": {"field": "setup", "type": "nominal", "sort": setups, "title": None},
                "tooltip": [
                    {"field": "setup", "type": "nominal"},
                    {"field": "layer", "type": "ordinal"},
                    {"field": "value", "type": "quantitative", "format": ".3f", "title": "balancedness"},
                ],
            },
        }
    )
    return spec
