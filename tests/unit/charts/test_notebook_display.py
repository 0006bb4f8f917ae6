"""Jupyter display: ``open_trace(...)`` and the analysis results have ``_repr_html_``, with the heat map as inline
SVG (one cell per layer x expert, the load's own numbers) and escaped text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import moeprobe
from tests import chart_traces
from tests.support import layer_meta, routing_table, write_trace

pytest.importorskip("vl_convert")


def _cells(svg: str) -> list[float]:
    """The utilisation of each heat-map cell, from the aria-labels Vega writes on every mark it draws."""
    return [float(v) for v in re.findall(r'aria-label="[^"]*?load / fair: ([0-9.e+-]+)', svg)]


def test_trace_shows_its_heat_map_and_load_table(tmp_path: Path) -> None:
    path = chart_traces.build(tmp_path / "t")
    with moeprobe.open_trace(path) as trace:
        html = trace._repr_html_()
        load = trace.load()
    assert html.count("<svg") == 1
    cells = _cells(html)
    assert len(cells) == chart_traces.LAYERS * chart_traces.EXPERTS
    expected = [u for item in load.layers for u in item.utilisation.tolist()]
    assert sorted(cells) == pytest.approx(sorted(expected), abs=1e-6)
    for item in load.layers:
        assert f"{item.maxvio_global:.3f}" in html and f"{item.random.maxvio:.3f}" in html


def test_analysis_results_display_as_tables(tmp_path: Path) -> None:
    path = chart_traces.build(tmp_path / "t")
    with moeprobe.open_trace(path) as trace:
        ep, lat, spec = trace.ep_load(ep_size=4), trace.latency_summary(), trace.specialization()
        assert len(_cells(trace.load()._repr_html_())) == chart_traces.LAYERS * chart_traces.EXPERTS
    ep_html = ep._repr_html_()
    assert f"balancedness SGLang {ep.sglang:.3f}" in ep_html and f"random routing {ep.random_sglang:.3f}" in ep_html
    lat_html = lat._repr_html_()
    assert all(f"{item.load_r:.3f}" in lat_html for item in lat.layers)
    spec_html = spec._repr_html_()
    domain = next(t for t in spec.tags if t.key == "domain")
    assert all(f"{item.mi.nmi:.3f}" in spec_html for item in domain.layers)


def test_trace_text_is_escaped(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t", {"routing": routing_table([[0, 1], [2, 3]])}, layers=layer_meta(1, 4, 2),
                       model={"name": "<img src=x onerror=alert(1)>", "family": "test"})
    with moeprobe.open_trace(path) as trace:
        html = trace._repr_html_()
    assert "<img" not in html and "&lt;img src=x" in html
