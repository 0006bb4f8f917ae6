"""The report's charts with their headline numbers, as one self-contained HTML page or as image files.

A ``Chart`` is a name, a Vega-Lite spec and the headline rows (metric, value, random-routing baseline) printed
beside it, the same numbers the text report prints. ``report_charts`` picks them from a report (``--full``) and a
timeline; ``simulate_charts`` from a ``simulate --json`` result. ``html_page`` inlines the Vega bundle and the
specs; a Content-Security-Policy forbids every fetch, so the page works (and can only work) offline.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from . import specs


@dataclass
class Chart:
    name: str  # file stem and DOM id: letters, digits and dashes only
    title: str
    spec: dict[str, Any]
    headline: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, value, random routing)
    note: str = ""


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def default_layer(report: dict[str, Any]) -> int | None:
    """The layer whose domain and co-activation charts are drawn: the worst MaxVio_global one."""
    worst = report["overall"]["metrics"]["maxvio_global"].get("worst_layer")
    if worst is not None:
        return int(worst)
    return report["layers"][0]["layer"] if report["layers"] else None


def report_charts(
    report: dict[str, Any], timeline: dict[str, Any], *, layer: int | None = None, prefix: str = "", label: str = "",
    color_max: float | None = None,
) -> list[Chart]:
    """Every chart a report has data for. ``layer``: the layer of the per-domain and co-activation charts;
    ``color_max``: top of the heat map's colour scale (give two reports the same one to compare them)."""
    layer = default_layer(report) if layer is None else layer
    overall = report["overall"]
    metrics = overall["metrics"]
    charts: list[Chart] = []

    def metric(label_: str, name: str, digits: int = 3) -> tuple[str, str, str]:
        m = metrics[name]
        worst = f" (worst layer {m['worst_layer']}: {fmt_num(m['max'] if name != 'entropy_norm' else m['min'], digits)})"
        return (label_, fmt_num(m["mean"], digits) + (worst if m.get("worst_layer") is not None else ""), fmt_num(m["random"], digits))

    spec = specs.heatmap(report, label=label, color_max=color_max)
    if spec is not None:
        bal = overall["balancedness"]
        charts.append(
            Chart(
                f"{prefix}heatmap",
                "Expert load per layer",
                spec,
                [
                    metric("MaxVio_global, mean over layers", "maxvio_global"),
                    metric("CV", "cv"),
                    metric("normalised entropy", "entropy_norm"),
                    metric("Gini", "gini"),
                    metric("dead experts per layer", "dead_experts", 1),
                    (f"balancedness, {bal['ep_size']} EP ranks (SGLang)", fmt_num(bal["sglang"]), fmt_num(bal["random"])),
                ],
                f"{overall['layers']} layers, {fmt_num(overall['decisions'])} routing decisions, "
                f"{fmt_num(overall['tokens'])} tokens, {fmt_num(overall['steps'])} steps.",
            )
        )
    spec = specs.maxvio_over_time(report, timeline, label=label)
    if spec is not None:
        worst = metrics["maxvio_batch_worst"]
        charts.append(
            Chart(
                f"{prefix}maxvio",
                "MaxVio per step over time",
                spec,
                [
                    metric("MaxVio_batch, mean over steps and layers", "maxvio_batch_mean"),
                    ("worst step's MaxVio_batch", f"{fmt_num(worst['max'])} (layer {worst['worst_layer']})", "-"),
                ],
            )
        )
    if layer is not None:
        used: set[str] = set()
        for tag in report["specialization"]["tags"]:
            if len(tag["values"]) < 2:
                continue  # one value: nothing to tell apart
            spec = specs.domain_distribution(report, tag["key"], layer, label=label)
            if spec is None:
                continue
            entry = next(e for e in tag["layers"] if e["layer"] == layer)
            nmis = [e["nmi"] for e in tag["layers"] if e["nmi"] is not None]
            name = _unique(f"tag-{_slug(tag['key'])}", used)
            charts.append(
                Chart(
                    f"{prefix}{name}",
                    f"Expert distribution by {tag['key']}",
                    spec,
                    [
                        (f"NMI, layer {layer}", fmt_num(entry["nmi"]), "0"),
                        (f"MI nats, layer {layer}", fmt_num(entry["mi_nats"], 4), fmt_num(entry["bias_nats"], 4)),
                        ("NMI, mean over layers", fmt_num(sum(nmis) / len(nmis)) if nmis else "-", "0"),
                    ],
                    f"{fmt_num(entry['assignments'])} assignments counted in layer {layer}.",
                )
            )
        spec = specs.coactivation(report, layer, label=label)
        if spec is not None:
            entry = next(e for e in report["specialization"]["coactivation"]["layers"] if e["layer"] == layer)
            pairs = [(f"pair e{p['i']} -> e{p['j']}", fmt_num(p["p"]), fmt_num(entry["random"])) for p in entry["top_pairs"][:3]]
            charts.append(Chart(f"{prefix}coactivation", f"Co-activation, layer {layer}", spec, pairs))
    spec = specs.latency_vs_load(timeline, label=label)
    lat = report.get("latency")
    if spec is not None and lat is not None:
        rs = [item["block_vs_max_load"]["r"] for item in lat["layers"] if item["block_vs_max_load"]["r"] is not None]
        rows = [
            ("MoE ms per step, p50", fmt_num(lat["moe_ms_per_step"]["p50"]), "-"),
            ("MoE ms per step, p99", fmt_num(lat["moe_ms_per_step"]["p99"]), "-"),
            ("router ms per step, p50", fmt_num(lat["router_ms_per_step_p50"]), "-"),
            ("r(block ms, max load), mean over layers", fmt_num(sum(rs) / len(rs)) if rs else "-", "-"),
        ]
        charts.append(Chart(f"{prefix}latency", "Router and block latency against load", spec, rows,
                            f"clock: {', '.join(lat['clocks']) or '-'}."))
    return charts


def _unique(name: str, used: set[str]) -> str:
    """``name``, or name-2, name-3...: two tag keys may slug alike ("a b", "a-b") but need their own files and ids."""
    out, n = name, 1
    while out in used:
        n += 1
        out = f"{name}-{n}"
    used.add(out)
    return out


def _slug(text: str) -> str:
    out = "".join(c if c.isascii() and c.isalnum() else "-" for c in text.lower()).strip("-")
    return out[:40] or "tag"


def simulate_charts(result: dict[str, Any], gpus: int | None) -> list[Chart]:
    """Per-GPU (or per-expert) load before and after: the recorded routing and each strategy, and EPLB."""
    charts: list[Chart] = []
    units = "GPU" if gpus else "expert"
    rows, bars = [], []
    for strategy in result["strategies"]:
        for item in strategy["layers"]:
            loads = _group(item["load"], gpus)
            mean = sum(loads) / len(loads) if loads else 0.0
            rows += [
                {"setup": strategy["strategy"], "layer": item["layer"], "unit": u, "load": v, "relative": v / mean if mean else None}
                for u, v in enumerate(loads)
            ]
            bars.append({"setup": strategy["strategy"], "layer": item["layer"], "value": item["balancedness"]})
    where = f"{gpus} GPUs, contiguous placement" if gpus else "per expert"
    spec = specs.unit_load(rows, units, title=f"load per {units}, by strategy", subtitle=f"{where}; load / the layer's mean")
    if spec is not None:
        headline = [
            (f"{s['strategy']}: balancedness / MaxVio / dropped",
             f"{fmt_num(s['summary']['balancedness'])} / {fmt_num(s['summary']['max_vio'])} / {100 * s['summary']['dropped_share']:.2f}%", "-")
            for s in result["strategies"]
        ]
        charts.append(Chart("strategies", f"Load per {units} before and after", spec, headline))
        # The simulator's balancedness is always over experts (its EP balance is a column of its own).
        bar_spec = specs.balancedness_bars(bars, title="balancedness per layer", subtitle="mean / max load per expert")
        if bar_spec is not None:
            charts.append(Chart("strategies-balancedness", "Balancedness per layer", bar_spec))
    eplb = result.get("eplb")
    if eplb is not None:
        rows, bars = [], []
        setups = [name for name in ("contiguous", "eplb") if name in eplb]
        for name in setups:
            for i, layer in enumerate(eplb["layers"]):
                loads = eplb[name]["gpu_load"][i]
                mean = sum(loads) / len(loads) if loads else 0.0
                rows += [
                    {"setup": name, "layer": layer, "unit": g, "load": v, "relative": v / mean if mean else None}
                    for g, v in enumerate(loads)
                ]
                bars.append({"setup": name, "layer": layer, "value": eplb[name]["balancedness"][i]})
        subtitle = (f"{eplb['gpus']} GPUs, {eplb['replicas']} physical experts; planned on steps "
                    f"{eplb['plan_steps'][0]}-{eplb['plan_steps'][1]}, evaluated on {eplb['eval_steps'][0]}-{eplb['eval_steps'][1]}")
        spec = specs.unit_load(rows, "GPU", title="load per GPU: contiguous and EPLB", subtitle=subtitle)
        if spec is not None:
            headline = [(f"{name}: balancedness, mean over layers", fmt_num(eplb[name]["balancedness_mean"]), "-") for name in setups]
            headline += [(f"{name}: all-to-all max / mean", fmt_num(eplb[name]["traffic"]["max_over_mean"]), "-") for name in setups]
            charts.append(Chart("eplb", "Load per GPU before and after EPLB", spec, headline))
            bar_spec = specs.balancedness_bars(bars, title="balancedness per layer", subtitle=subtitle)
            if bar_spec is not None:
                charts.append(Chart("eplb-balancedness", "EPLB balancedness per layer", bar_spec))
    return charts


def _group(load: list[float], gpus: int | None) -> list[float]:
    """Per-expert load summed per GPU under contiguous placement (experts E/G * g .. E/G * (g+1) - 1)."""
    if not gpus or len(load) % gpus:
        return list(load)
    per = len(load) // gpus
    return [sum(load[g * per:(g + 1) * per]) for g in range(gpus)]


# -- HTML ---------------------------------------------------------------------------------------------------
_CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        "img-src data:; font-src data:")

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0 0 2px; } .note { color: #555; font-size: 12px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.vis { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }
"""

# Renders every spec, marks each chart's div as rendered, and the body once all are done (or failed, with the
# error on the console), so that a test or a screenshot tool knows when the page is complete.
_SCRIPT = """
(function () {
  const specs = JSON.parse(document.getElementById('moeprobe-specs').textContent);
  const jobs = Object.keys(specs).map(function (id) {
    const el = document.getElementById('chart-' + id);
    return vegaEmbed(el, specs[id], {renderer: 'svg', actions: false}).then(function () {
      el.dataset.rendered = 'true';
    });
  });
  Promise.all(jobs).then(function () {
    document.body.dataset.rendered = String(jobs.length);
  }).catch(function (err) {
    document.body.dataset.rendered = 'error';
    console.error('moeprobe: a chart failed to render: ' + err);
  });
})();
"""


def _json_for_script(obj: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a tag value or a path would end or change the element: escape "<".
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")


def section(chart: Chart) -> str:
    # A baseline column only where some metric has one (the simulator's comparisons have none).
    baseline = any(r != "-" for _, _, r in chart.headline)
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{html.escape(v)}</td>" + (f"<td>{html.escape(r)}</td>" if baseline else "") + "</tr>"
        for m, v, r in chart.headline
    )
    head = "<tr><th>metric</th><th>value</th>" + ("<th>random routing</th>" if baseline else "") + "</tr>"
    table = f'<table class="headline">{head}{rows}</table>' if rows else ""
    note = f'<p class="note">{html.escape(chart.note)}</p>' if chart.note else ""
    return (f'<section id="sec-{chart.name}"><h2>{html.escape(chart.title)}</h2><div class="row">'
            f'<div class="vis" id="chart-{chart.name}"></div><div>{table}{note}</div></div></section>')


def html_page(title: str, meta: list[str], body: list[str | Chart], charts: list[Chart], *, bundle: str) -> str:
    """One HTML document: ``body`` in order (a Chart becomes its section, a string is trusted HTML)."""
    parts = []
    for item in body:
        parts.append(section(item) if isinstance(item, Chart) else item)
    spec_json = _json_for_script({c.name: c.spec for c in charts})
    meta_html = "".join(f'<p class="meta">{html.escape(line)}</p>' for line in meta)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>\n"
        f"<script>{bundle}</script>\n</head><body>\n<h1>{html.escape(title)}</h1>{meta_html}\n"
        + "\n".join(parts)
        + f'\n<script type="application/json" id="moeprobe-specs">{spec_json}</script>\n<script>{_SCRIPT}</script>\n'
        "</body></html>\n"
    )


def headline_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head and '<tr>' + head + '</tr>'}{body}</table>"


def write_images(charts: list[Chart], directory: Path, fmt: str) -> list[Path]:
    """Each chart as DIR/NAME.png or .svg; returns the paths written."""
    from . import render

    render.require()  # before creating the directory: a missing dependency leaves nothing behind
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in charts:
        path = directory / f"{chart.name}.{fmt}"
        if fmt == "png":
            path.write_bytes(render.to_png(chart.spec))
        else:
            path.write_text(render.to_svg(chart.spec), encoding="utf-8")
        written.append(path)
    return written
