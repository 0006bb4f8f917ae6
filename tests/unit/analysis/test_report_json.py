"""The report object: documented keys, JSON-safe values, --full extras, and the comparison of two traces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moeprobe
from moeprobe.analysis.report_json import FORMAT_VERSION, ReportOptions, clean, compare, compare_reports
from moeprobe.analysis.report_model import Comparison, FiltersInfo, Report
from moeprobe.analysis.tables import compare_tables, describe_filters, report_tables
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace


def _write(path: Path, experts: np.ndarray) -> Path:
    n = len(experts)
    tags = pa.table({"sequence": [0, 1], "key": ["domain", "domain"], "value": ["code", "math"]}, schema=TABLES["tags"])
    seq = np.repeat([0, 1], n // 2)
    routing = [routing_table(experts, sequence=seq, position=np.tile(np.arange(n // 2), 2), layer=i) for i in (0, 1)]
    return write_trace(path, {"routing": routing, "tags": tags}, layers=layer_meta(2, 8, 2))


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[moeprobe.Trace, moeprobe.Trace]:
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    balanced = np.argsort(rng.random((400, 8)), axis=1)[:, :2]
    skewed = np.column_stack([np.zeros(400, int), 1 + rng.integers(0, 7, 400)])
    return moeprobe.open_trace(_write(root / "a", balanced)), moeprobe.open_trace(_write(root / "b", skewed))


def test_top_level_schema(traces: tuple[moeprobe.Trace, moeprobe.Trace]) -> None:
    report = traces[0].summary()
    assert report["format_version"] == FORMAT_VERSION == 1
    assert set(report) == {"format_version", "generator", "trace", "filters", "options", "overall", "layers",
                           "specialization", "latency"}
    assert set(report["overall"]) >= {"layers", "decisions", "tokens", "steps", "metrics", "balancedness", "windows", "aux_loss"}
    assert set(report["overall"]["metrics"]["maxvio_global"]) == {"mean", "p50", "p90", "min", "max", "worst_layer", "random"}
    layer = report["layers"][0]
    for key in ("layer", "experts", "top_k", "maxvio_global", "maxvio_batch_mean", "maxvio_batch_worst", "cv",
                "entropy_norm", "gini", "top_n_coverage", "dead_experts", "counts", "utilisation", "random", "ep", "windows"):
        assert key in layer
    spec = report["specialization"]
    assert set(spec) == {"counts_sample", "sample", "tags", "tags_skipped", "vocabulary", "repetition", "coactivation", "router"}
    assert spec["tags"][0]["key"] == "domain"
    assert report["latency"] is None  # nothing timed in this trace
    json.dumps(report, allow_nan=False)  # NaN never reaches the JSON


def test_full_adds_count_tables_and_matrices(traces: tuple[moeprobe.Trace, moeprobe.Trace]) -> None:
    report = traces[0].summary(options=ReportOptions(full=True))
    assert np.array(report["specialization"]["coactivation"]["layers"][0]["matrix"]).shape == (8, 8)
    assert np.array(report["specialization"]["tags"][0]["layers"][0]["counts"]).shape == (2, 8)
    assert "matrix" not in traces[0].summary()["specialization"]["coactivation"]["layers"][0]


def test_compare_lines_up_two_traces(traces: tuple[moeprobe.Trace, moeprobe.Trace]) -> None:
    a, b = (t.summary() for t in traces)
    result = compare(a, b)
    maxvio = result["diff"]["overall"]["maxvio_global"]
    assert maxvio["a"] == a["overall"]["metrics"]["maxvio_global"]["mean"]
    assert maxvio["delta"] == pytest.approx(maxvio["b"] - maxvio["a"], abs=1e-6)
    assert maxvio["b"] > maxvio["a"]  # expert 0 takes every token in b
    assert [item["layer"] for item in result["diff"]["layers"]] == [0, 1]
    typed = compare_reports(Report.from_json(a), Report.from_json(b))
    assert typed.to_json() == result and Comparison.from_json(result) == typed  # one object, typed or as JSON
    tables = compare_tables(typed)
    assert tables[0].rows[0][0] == "maxvio_global"


def test_text_tables_put_baselines_beside_metrics(traces: tuple[moeprobe.Trace, moeprobe.Trace]) -> None:
    report = traces[1].report()
    tables = {t.title.split(",")[0].split(":")[0]: t for t in report_tables(report)}
    overall = tables["Load imbalance across layers"]
    assert overall.columns[-2:] == ["random", "ideal"]
    layers = tables["Layers"]
    # "value (random)" cells
    assert "(" in layers.rows[0][2] and layers.rows[0][1] == "8/2"


def test_filters_are_described_in_words() -> None:
    filters = {"steps": [2, None], "phase": "decode", "tags": {"domain": "code"}, "layers": [0, 3], "ranks": None}
    assert describe_filters(FiltersInfo.from_json(filters)) == "steps 2:, phase decode, domain=code, layers 0,3"
    assert describe_filters(FiltersInfo(steps=None, phase=None, tags={}, layers=None, ranks=None)) == "none"


def test_clean_of_arrays_is_clean_of_their_lists() -> None:
    """The array fast path (the --full tables) gives exactly what cleaning the Python lists element by element gives."""
    floats = np.array([[1 / 3, math.nan, 2.5e-7], [math.inf, -math.inf, 1e300]])
    for array in (floats, floats.astype(np.float32), np.arange(6, dtype=np.int16).reshape(2, 3), np.array([True, False])):
        fast = clean({"a": array})["a"]
        slow = clean({"a": [[clean(v) for v in row] if isinstance(row, list) else clean(row) for row in array.tolist()]})["a"]
        assert fast == slow and [type(v) for v in np.ravel(np.array(fast, dtype=object))] == [type(v) for v in np.ravel(np.array(slow, dtype=object))]


def _rounded_one_by_one(values: np.ndarray) -> list[float | None]:
    """What clean did per element before arrays were rounded in bulk: Python's round to 6 decimals, None for
    NaN and inf."""
    return [None if math.isnan(f) or math.isinf(f) else round(f, 6) for f in values.tolist()]


def _same_floats(got: list[float | None], want: list[float | None]) -> bool:
    return len(got) == len(want) and all(
        a is None and b is None or (a is not None and b is not None and a == b and math.copysign(1, a) == math.copysign(1, b))
        for a, b in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_arrays_round_like_pythons_round_on_ties_and_extremes(dtype: type) -> None:
    """Bulk rounding of float arrays (--full tables, matrices) gives exactly Python's round(f, 6): decimal ties,
    values one ulp either side of a tie, huge and tiny magnitudes, negative zero, NaN and inf."""
    rng = np.random.default_rng(12)
    ties = (rng.integers(-10**12, 10**12, 20_000) + 0.5) / 1e6
    around = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    spread = 10.0 ** rng.uniform(-15, 16, 20_000) * rng.choice([-1.0, 1.0], 20_000)
    special = np.array([0.0, -0.0, 5e-7, -5e-7, 1.5e-6, 2.5e-6, 0.1234565, 1.0000005, 2.0**50 / 1e6, 2.0**53, 1e300,
                        -1e300, 5e-324, np.nan, np.inf, -np.inf])
    for values in (ties, around, spread, special, rng.random(20_000), rng.normal(0, 1e-4, 20_000)):
        with np.errstate(over="ignore"):  # 1e300 as float32 is inf: one more case
            values = values.astype(dtype)
        assert _same_floats(clean(values), _rounded_one_by_one(values))
        assert _same_floats(clean(values.reshape(2, -1) if len(values) % 2 == 0 else values[None, :])[0],
                            _rounded_one_by_one(values[: len(values) // 2] if len(values) % 2 == 0 else values))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=50))
def test_arrays_round_like_pythons_round_on_any_floats(values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    assert _same_floats(clean(array), _rounded_one_by_one(array))
