"""Whole HTML documents: the report of one trace, two traces compared, and a simulation's before and after."""

from __future__ import annotations

from typing import Any

from . import render
from .specs import max_utilisation
from .page import Chart, default_layer, fmt_num, headline_table, html_page, report_charts, section, simulate_charts


EMPTY = "<p><b>No routing decisions in this trace with these filters: nothing to draw.</b></p>"


def _trace_meta(report: dict[str, Any]) -> list[str]:
    trace, overall = report["trace"], report["overall"]
    model = trace.get("model") or {}
    name = model.get("name") if isinstance(model, dict) else None
    lines = [
        f"trace {trace['path']} ({trace['status']}), model {name or '-'}",
        f"{overall['layers']} layers, {fmt_num(overall['decisions'])} routing decisions, steps "
        f"{overall['first_step']}-{overall['last_step']}",
    ]
    active = {k: v for k, v in report["filters"].items() if v not in (None, [], {})}
    if active:
        lines.append("filters: " + ", ".join(f"{k}={v}" for k, v in active.items()))
    lines.append(f"{report['generator']}; hover a chart for its values")
    return lines


def report_html(report: dict[str, Any], timeline: dict[str, Any], *, layer: int | None = None) -> str:
    charts = report_charts(report, timeline, layer=layer)
    body: list[str | Chart] = list(charts) or [EMPTY]
    return html_page("moeprobe report", _trace_meta(report), body, charts, bundle=render.javascript_bundle())


def compare_html(result: dict[str, Any], timelines: tuple[dict[str, Any], dict[str, Any]], *, layer: int | None = None) -> str:
    """a and b side by side, chart by chart, under the table of differences (b - a) of the headline numbers."""
    a, b = result["a"], result["b"]
    layer = layer if layer is not None else shared_layer(a, b)
    charts_a, charts_b = compare_charts(result, timelines, layer=layer)
    rows = [(str(label), fmt_num(p["a"]), fmt_num(p["b"]), fmt_num(p["delta"])) for label, p in result["diff"]["overall"].items()]
    body: list[str | Chart] = ["<h2>differences (b - a)</h2>" + headline_table(rows, ("metric", "a", "b", "b - a"))]
    by_name_b = {c.name[2:]: c for c in charts_b}
    for chart in charts_a:
        other = by_name_b.pop(chart.name[2:], None)
        body.append('<div class="pair">' + section(chart) + (section(other) if other else "<div></div>") + "</div>")
    body += list(by_name_b.values())  # charts only b has data for
    meta = [f"a: {line}" for line in _trace_meta(a)[:2]] + [f"b: {line}" for line in _trace_meta(b)[:2]]
    return html_page("moeprobe report: a vs b", meta, body, charts_a + charts_b, bundle=render.javascript_bundle())


def compare_charts(result: dict[str, Any], timelines: tuple[dict[str, Any], dict[str, Any]], *,
                   layer: int | None) -> tuple[list[Chart], list[Chart]]:
    """a's and b's charts, with one detail layer and one heat-map colour scale so that they compare by eye."""
    a, b = result["a"], result["b"]
    layer = layer if layer is not None else shared_layer(a, b)
    high = max(max_utilisation(a), max_utilisation(b))
    return (report_charts(a, timelines[0], layer=layer, prefix="a-", label="a: ", color_max=high),
            report_charts(b, timelines[1], layer=layer, prefix="b-", label="b: ", color_max=high))


def shared_layer(a: dict[str, Any], b: dict[str, Any]) -> int | None:
    """One layer for both sides, so that their detail charts can be compared: a's worst, if b has it."""
    layer = default_layer(a)
    if layer is not None and any(item["layer"] == layer for item in b["layers"]):
        return layer
    return default_layer(b)


def simulate_html(result: dict[str, Any], gpus: int | None) -> str:
    charts = simulate_charts(result, gpus)
    start, stop = result["steps"]
    steps = "all steps" if start is None and stop is None else f"steps {'' if start is None else start}:{'' if stop is None else stop}"
    ep = result.get("ep") or {}
    meta = [
        f"trace {result['trace']}, {steps}, layers {', '.join(map(str, result['layers']))}",
        "balancedness over experts" + (f"; EP balance over {ep['gpus']} GPUs, contiguous placement" if ep.get("gpus") else ""),
    ]
    meta += [f"note: {n}" for n in result.get("notes", [])]
    return html_page("moeprobe simulate", meta, list(charts), charts, bundle=render.javascript_bundle())
