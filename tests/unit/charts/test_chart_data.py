"""The charts show the analysis numbers: specs built from a real report and timeline carry exactly those values,
the timeline agrees with numpy on the routing rows, and text from the trace cannot break out of the page."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moeprobe
from moeprobe.analysis.report_json import ReportOptions
from moeprobe.charts import page, specs
from tests import chart_traces
from tests.conftest import PYTHON, run_cli_env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    path = chart_traces.build(tmp_path_factory.mktemp("charts") / "t")
    with moeprobe.open_trace(path) as trace:
        return path, trace.summary(None, ReportOptions(full=True)), trace.timeline().to_json()


def _per_step_maxvio(path: Path) -> dict[tuple[int, int], float]:
    """MaxVio_batch of every (step, layer), straight from the routing rows with numpy."""
    routing = moeprobe.open_trace(path).routing().to_pydict()
    step, layer, expert = (np.asarray(routing[c]) for c in ("step", "layer", "expert"))
    out = {}
    for s in np.unique(step):
        for lay in np.unique(layer):
            counts = np.bincount(expert[(step == s) & (layer == lay)], minlength=chart_traces.EXPERTS)
            out[(int(s), int(lay))] = counts.max() * chart_traces.EXPERTS / counts.sum() - 1
    return out


def test_timeline_is_the_per_step_maxvio_of_the_routing_rows(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    path, _, timeline = built
    expected = _per_step_maxvio(path)
    mv = timeline["maxvio"]
    assert timeline["bucket_steps"] == 1
    got = {(s, lay): v for s, lay, v in zip(mv["first_step"], mv["layer"], mv["mean"], strict=True)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6)
    assert mv["max"] == mv["mean"]  # one step per bucket


def test_timeline_buckets_keep_the_mean_and_the_worst_step(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    path, _, _ = built
    expected = _per_step_maxvio(path)
    with moeprobe.open_trace(path) as trace:
        small = trace.timeline(max_points=7).to_json()  # 7 // 3 layers = 2 buckets per layer of 3 steps
    assert small["bucket_steps"] == 3
    mv = small["maxvio"]
    assert len(mv["layer"]) == 6 <= 7
    for lay, first, last, mean, worst in zip(mv["layer"], mv["first_step"], mv["last_step"], mv["mean"], mv["max"], strict=True):
        values = [expected[(s, lay)] for s in range(first, last + 1)]
        assert last - first + 1 == 3
        assert mean == pytest.approx(np.mean(values), abs=1e-6)
        assert worst == pytest.approx(max(values), abs=1e-6)
    lat = small["latency"]
    assert lat["rows"] == chart_traces.STEPS * chart_traces.LAYERS
    assert lat["kept"] == len(lat["step"]) == 7


def test_timeline_latency_points_pair_each_call_with_its_steps_busiest_expert(
    built: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    _, _, timeline = built
    lat = timeline["latency"]
    assert lat["kept"] == lat["rows"] == chart_traces.STEPS * chart_traces.LAYERS
    for top, block in zip(lat["top"], lat["block_ms"], strict=True):
        assert block == pytest.approx(0.2 + 0.01 * top)  # how chart_traces wrote block_ms


def test_heatmap_cells_are_the_reports_utilisation(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    _, report, _ = built
    spec = specs.heatmap(report)
    assert spec is not None
    rows = specs.rows_of(spec)
    assert len(rows) == chart_traces.LAYERS * chart_traces.EXPERTS
    for item in report["layers"]:
        mine = [r for r in rows if r["layer"] == item["layer"]]
        assert [r["utilisation"] for r in mine] == item["utilisation"]
        assert [r["count"] for r in mine] == item["counts"]


def test_every_chart_is_drawn_from_the_report(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    _, report, timeline = built
    charts = {c.name: c for c in page.report_charts(report, timeline)}
    # the one-value "run" tag has nothing to tell apart: no chart for it
    assert set(charts) == {"heatmap", "maxvio", "tag-domain", "coactivation", "latency"}
    layer = report["overall"]["metrics"]["maxvio_global"]["worst_layer"]
    tag = next(t for t in report["specialization"]["tags"] if t["key"] == "domain")
    counts = next(e for e in tag["layers"] if e["layer"] == layer)["counts"]
    shares = specs.rows_of(charts["tag-domain"].spec)
    assert len(shares) == 2 * chart_traces.EXPERTS
    for v, value in enumerate(tag["values"]):
        mine = [r for r in shares if r["value"] == value]
        assert [r["count"] for r in mine] == counts[v]
        assert sum(r["share"] for r in mine) == pytest.approx(1.0)
    matrix = next(e for e in report["specialization"]["coactivation"]["layers"] if e["layer"] == layer)["matrix"]
    cells = specs.rows_of(charts["coactivation"].spec)
    assert len(cells) == chart_traces.EXPERTS**2
    assert max(c["p"] for c in cells) == max(max(row) for row in matrix)
    # headline numbers are the report's, with their random baselines
    heat = dict((m, (v, r)) for m, v, r in charts["heatmap"].headline)
    mv = report["overall"]["metrics"]["maxvio_global"]
    assert heat["MaxVio_global, mean over layers"][0].startswith(f"{mv['mean']:.3f}")
    assert heat["MaxVio_global, mean over layers"][1] == f"{mv['random']:.3f}"


def test_chart_layer_picks_the_detail_layer(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    _, report, timeline = built
    charts = {c.name: c for c in page.report_charts(report, timeline, layer=0)}
    assert charts["coactivation"].title == "Co-activation, layer 0"
    assert "layer 0" in charts["tag-domain"].spec["title"]["subtitle"]


def test_hostile_text_stays_text(tmp_path: Path) -> None:
    evil = '</script><script>alert(1)</script><!--'
    path = chart_traces.build(tmp_path / "t", domain_values=(evil, "math"))
    with moeprobe.open_trace(path) as trace:
        report, timeline = trace.summary(None, ReportOptions(full=True)), trace.timeline().to_json()
    charts = page.report_charts(report, timeline)
    html = page.html_page("t " + evil, [evil], list(charts), charts, bundle="/* no bundle */")
    assert evil not in html and "<script>alert" not in html
    # the value is intact in the specs the page renders
    specs_json = re.search(r'id="moeprobe-specs">(.*?)</script>', html, re.S)
    assert specs_json is not None
    values = {r["value"] for r in specs.rows_of(json.loads(specs_json.group(1))["tag-domain"])}
    assert values == {evil, "math"}
    assert html.count("<script") == 3  # the bundle, the specs, the renderer


def test_importing_the_chart_modules_stays_light() -> None:
    import subprocess

    code = "import moeprobe, moeprobe.charts, moeprobe.charts.specs, moeprobe.charts.page\nimport sys; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=run_cli_env(), check=True).stdout.split())
    assert not {"vl_convert", "altair", "duckdb", "torch", "textual"} & loaded


def test_timeline_follows_the_filters(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    from moeprobe.analysis.filters import Filters

    path, _, _ = built
    expected = _per_step_maxvio(path)
    with moeprobe.open_trace(path) as trace:
        got = trace.timeline(Filters(steps=(2, 4), layers=(1,))).to_json()
    mv = got["maxvio"]
    assert mv["first_step"] == [2, 3] and mv["layer"] == [1, 1]
    assert mv["mean"] == pytest.approx([expected[(2, 1)], expected[(3, 1)]], abs=1e-6)
    assert got["latency"]["step"] == [2, 3] and got["latency"]["layer"] == [1, 1]


def test_tag_keys_that_slug_alike_get_their_own_charts(built: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    import copy

    _, report, timeline = built
    twin = copy.deepcopy(report)
    tag = next(t for t in twin["specialization"]["tags"] if t["key"] == "domain")
    twin["specialization"]["tags"] += [{**copy.deepcopy(tag), "key": "Domain"}, {**copy.deepcopy(tag), "key": "d/o/m"}]
    names = [c.name for c in page.report_charts(twin, timeline) if c.name.startswith("tag-")]
    assert names == ["tag-domain", "tag-domain-2", "tag-d-o-m"]
