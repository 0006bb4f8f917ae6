"""The HTML pages in a real headless Chromium (Debian package ``chromium``; CI installs it): no console error, no
request beyond the file itself, and every chart drawn with the trace's numbers, read back from the DOM (Vega
writes an aria-label with the values on every mark it draws)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import browser, chart_traces
from tests.conftest import PYTHON, run_cli_env

pytest.importorskip("vl_convert")
if browser.chromium_path() is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

READY = "document.body && document.body.dataset.rendered"
# Per chart div: whether it finished, and the aria-label of every mark of each kind it drew.
COLLECT = """(() => {
  const out = {status: document.body.dataset.rendered, charts: {}};
  for (const el of document.querySelectorAll('div[id^="chart-"]')) {
    const marks = {};
    for (const kind of ['rect', 'symbol', 'line', 'rule', 'bar']) {
      marks[kind] = Array.from(el.querySelectorAll('g.mark-' + kind + '.role-mark path, g.mark-' + kind + '.role-mark line'))
        .map(p => p.getAttribute('aria-label') || '');
    }
    out.charts[el.id.slice(6)] = {rendered: el.dataset.rendered === 'true', svg: el.querySelectorAll('svg').length, marks: marks};
  }
  return out;
})()"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "moeprobe", *args], capture_output=True, text=True, env=run_cli_env(), timeout=300)


def _label_values(labels: list[str], name: str) -> list[float]:
    out = []
    for label in labels:
        match = re.search(rf"(?:^|; ){re.escape(name)}: ([-0-9.e+]+)", label)
        assert match, (name, label)
        out.append(float(match.group(1)))
    return out


def _open(path: Path) -> tuple[dict[str, Any], browser.PageResult]:
    result = browser.open_page(path, ready=READY, evaluate=COLLECT)
    assert result.errors == [], result.errors
    assert result.requests == [path.resolve().as_uri()], result.requests  # nothing fetched: works offline
    page = result.value
    assert page["status"] == str(len(page["charts"])), page["status"]  # every chart's render promise resolved
    for name, chart in page["charts"].items():
        assert chart["rendered"] and chart["svg"] == 1, name
    return page, result


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chart_traces.build(tmp_path_factory.mktemp("browser") / "t", skew=3.0)


def test_report_renders_every_chart_with_the_reports_numbers(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    run = _cli("report", str(trace), "--json", "--html", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    page, _ = _open(out)
    charts = page["charts"]
    assert set(charts) == {"heatmap", "maxvio", "tag-domain", "coactivation", "latency"}

    cells = charts["heatmap"]["marks"]["rect"]
    assert len(cells) == len(report["layers"]) * chart_traces.EXPERTS  # layers x experts
    shown = _label_values(cells, "load / fair")
    utilisation = [u for item in report["layers"] for u in item["utilisation"]]
    assert max(shown) == max(utilisation)
    assert sorted(shown) == sorted(utilisation)

    # MaxVio over time: one point per (step, layer), one line per layer, and the random-routing rule
    points = _label_values(charts["maxvio"]["marks"]["symbol"], "MaxVio_batch")
    assert len(points) == chart_traces.STEPS * len(report["layers"])
    assert max(points) == pytest.approx(report["overall"]["metrics"]["maxvio_batch_worst"]["max"], abs=1e-6)
    assert len(charts["maxvio"]["marks"]["line"]) == len(report["layers"])
    assert len(charts["maxvio"]["marks"]["rule"]) == 1

    layer = report["overall"]["metrics"]["maxvio_global"]["worst_layer"]
    tag = next(t for t in report["specialization"]["tags"] if t["key"] == "domain")
    counts = next(e for e in tag["layers"] if e["layer"] == layer)["counts"]
    domain = charts["tag-domain"]["marks"]["rect"]
    assert len(domain) == len(tag["values"]) * chart_traces.EXPERTS
    assert sorted(_label_values(domain, "assignments")) == sorted(c for row in counts for c in row)

    matrix = next(e for e in report["specialization"]["coactivation"]["layers"] if e["layer"] == layer)["matrix"]
    coact = _label_values(charts["coactivation"]["marks"]["rect"], "P(j | i)")
    assert len(coact) == chart_traces.EXPERTS**2
    assert max(coact) == pytest.approx(max(max(row) for row in matrix), abs=1e-6)

    # two panels (router, block) with one point per latency row
    latency = charts["latency"]["marks"]["symbol"]
    assert len(latency) == 2 * chart_traces.STEPS * len(report["layers"])
    blocks = _label_values([x for x in latency if "block ms" in x], "block ms")
    fastest = min(item["block_ms"]["p50"] for item in report["latency"]["layers"])
    assert min(blocks) <= fastest


def test_compare_and_simulate_pages_render(trace: Path, tmp_path: Path) -> None:
    flat = chart_traces.build(tmp_path / "flat", skew=0.0, seed=1)
    out = tmp_path / "cmp.html"
    run = _cli("report", str(trace), str(flat), "--compare", "--html", str(out))
    assert run.returncode == 0, run.stderr
    page, _ = _open(out)
    assert len(page["charts"]) == 10
    assert len(page["charts"]["a-heatmap"]["marks"]["rect"]) == len(page["charts"]["b-heatmap"]["marks"]["rect"]) == 24

    out = tmp_path / "sim.html"
    run = _cli("simulate", str(trace), "--strategy", "capacity:cf=1.0", "--eplb", "gpus=4,replicas=12", "--html", str(out),
               "--json")
    assert run.returncode == 0, run.stderr
    sim = json.loads(run.stdout)
    page, _ = _open(out)
    assert set(page["charts"]) == {"strategies", "strategies-balancedness", "eplb", "eplb-balancedness"}
    # layer x GPU cells for contiguous and EPLB placement, and their balancedness bars
    cells = page["charts"]["eplb"]["marks"]["rect"]
    assert len(cells) == 2 * len(sim["eplb"]["layers"]) * 4
    bars = page["charts"]["eplb-balancedness"]["marks"]["rect"]
    shown = sorted(_label_values(bars, "balancedness"))
    expected = sorted(sim["eplb"]["eplb"]["balancedness"] + sim["eplb"]["contiguous"]["balancedness"])
    assert shown == pytest.approx(expected, abs=1e-6)


def test_the_harness_sees_errors_and_fetches(tmp_path: Path) -> None:
    """The checks above can fail: a spec Vega rejects and a chart that tries to fetch its data are both seen."""
    from moeprobe.charts import page, render

    broken = page.Chart("broken", "broken", {"mark": "no-such-mark", "data": {"values": [{"a": 1}]}})
    remote = page.Chart("remote", "remote", {"mark": "point", "data": {"url": "http://127.0.0.1:9/data.json"},
                                             "encoding": {"x": {"field": "a", "type": "quantitative"}}})
    bundle = render.javascript_bundle()
    for chart in (broken, remote):
        path = tmp_path / f"{chart.name}.html"
        path.write_text(page.html_page("t", [], [chart], [chart], bundle=bundle), encoding="utf-8")
        result = browser.open_page(path, ready=READY, evaluate="document.body.dataset.rendered")
        assert result.errors, chart.name
        if chart is broken:
            assert result.value == "error" and any("moeprobe: a chart failed" in e for e in result.errors)
        else:  # the fetch is refused by the page's Content-Security-Policy, and that is an error too
            assert any("Content Security Policy" in e for e in result.errors), result.errors
