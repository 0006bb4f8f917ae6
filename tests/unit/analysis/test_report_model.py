"""The typed report is the JSON report, key for key: every output renders from it, and --json is its to_json()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moeprobe
from moeprobe.analysis.filters import Filters
from moeprobe.analysis.report_json import ReportOptions, compare, compare_reports
from moeprobe.analysis.report_model import LayerReport, Report
from tests import chart_traces


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> moeprobe.Trace:
    """Latency, two tag keys, three layers: most of the report's optional parts are present."""
    return moeprobe.open_trace(chart_traces.build(tmp_path_factory.mktemp("model") / "t"))


@pytest.mark.parametrize(
    ("filters", "options"),
    [
        (None, None),
        (None, ReportOptions(full=True)),  # count tables, matrices, first-choice counts
        (Filters(steps=(1, None), layers=(0, 2)), ReportOptions(window_steps=2, top_n=3)),
        (Filters(steps=(100, None)), None),  # nothing matches: the empty overall
    ],
)
def test_typed_report_round_trips_to_the_same_json(trace: moeprobe.Trace, filters: Filters | None,
                                                   options: ReportOptions | None) -> None:
    summary = trace.summary(filters, options)
    typed = trace.report(filters, options)
    assert typed == Report.from_json(summary)
    # The same keys in the same order, so json.dumps (what --json prints) is byte for byte the same.
    assert json.dumps(typed.to_json()) == json.dumps(summary)


def test_fields_are_typed_records(trace: moeprobe.Trace) -> None:
    report = trace.report(options=ReportOptions(full=True))
    layer = report.layers[0]
    assert isinstance(layer, LayerReport) and layer.first_choice_counts is not None
    assert layer.random.maxvio_global is not None and layer.ep.balancedness is not None
    assert report.latency is not None and report.latency.layers[0].block_ms.n == chart_traces.STEPS
    assert {t.key for t in report.specialization.tags} == {"domain", "run"}
    assert report.overall.metrics["maxvio_global"].worst_layer in (0, 1, 2)
    plain = trace.report()
    assert plain.layers[0].first_choice_counts is None and "first_choice_counts" not in plain.to_json()["layers"][0]


def test_reading_is_strict(trace: moeprobe.Trace) -> None:
    """A field the builder adds but the model lacks fails loudly instead of vanishing from every output."""
    summary = trace.summary()
    extra = json.loads(json.dumps(summary))
    extra["layers"][0]["new_metric"] = 1.0
    with pytest.raises(ValueError, match="LayerReport: fields the model does not declare: new_metric"):
        Report.from_json(extra)
    missing = json.loads(json.dumps(summary))
    del missing["overall"]["balancedness"]
    with pytest.raises(ValueError, match="Overall: missing field 'balancedness'"):
        Report.from_json(missing)


def test_comparison_round_trips(trace: moeprobe.Trace, tmp_path: Path) -> None:
    other = moeprobe.open_trace(chart_traces.build(tmp_path / "b", skew=0.5, seed=1))
    a, b = trace.summary(), other.summary()
    typed = compare_reports(trace.report(), other.report())
    assert json.dumps(typed.to_json()) == json.dumps(compare(a, b))
    assert typed.diff.layers[0].values["maxvio_global"].a == a["layers"][0]["maxvio_global"]


def test_to_json_is_a_copy_of_the_records_lists(trace: moeprobe.Trace) -> None:
    """to_json copies lists of numbers without a call per element: still a copy, so that changing the JSON
    (a caller that post-processes it) never changes the typed report it came from."""
    typed = trace.report(None, ReportOptions(full=True))
    before = json.dumps(typed.to_json())
    doc = typed.to_json()
    doc["layers"][0]["counts"].append(-1)
    doc["layers"][0]["ep"]["loads"].append(-1)
    doc["specialization"]["coactivation"]["layers"][0]["matrix"][0].append(-1)
    doc["trace"]["segments"]["routing"] = -1
    assert json.dumps(typed.to_json()) == before
