"""Routed vs processed load (dropped choices excluded), and filters naming what the trace has when they match
nothing (a tag key, a tag value, a phase)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis.filters import FilterError, Filters
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace


def _with_drops(path: Path) -> Path:
    # 4 experts, top-1: expert 0 gets 6 tokens, the others 2 each; 4 of expert 0's are dropped over capacity.
    experts = np.array([0] * 6 + [1, 2, 3] * 2)
    table = routing_table(experts)
    dropped = np.zeros(len(experts), bool)
    dropped[:4] = True
    table = table.set_column(table.schema.get_field_index("dropped"), "dropped", pa.array(dropped))
    tags = pa.table({"sequence": [0], "key": ["domain"], "value": ["code"]}, schema=TABLES["tags"])
    return write_trace(path, {"routing": table, "tags": tags}, layers=layer_meta(1, 4, 1))


def test_report_has_routed_and_processed_load(tmp_path: Path) -> None:
    with moeprobe.open_trace(_with_drops(tmp_path / "t")) as trace:
        report = trace.summary()
    layer = report["layers"][0]
    assert layer["counts"] == [6, 2, 2, 2]
    assert layer["maxvio_global"] == pytest.approx(6 / 3 - 1)  # routed: what the router asked for
    assert layer["processed"]["counts"] == [2, 2, 2, 2]
    assert layer["processed"]["maxvio_global"] == pytest.approx(0.0)  # processed: what the experts computed
    assert layer["dropped"] == 4 and layer["dropped_share"] == pytest.approx(4 / 12)
    overall = report["overall"]
    assert overall["dropped"] == 4 and overall["processed"]["maxvio_global"] == pytest.approx(0.0)


def test_compare_shows_the_processed_difference(tmp_path: Path) -> None:
    from moeprobe.analysis.report_json import compare

    plain = write_trace(tmp_path / "plain", {"routing": routing_table(np.array([0] * 6 + [1, 2, 3] * 2))},
                        layers=layer_meta(1, 4, 1))
    with moeprobe.open_trace(plain) as a, moeprobe.open_trace(_with_drops(tmp_path / "d")) as b:
        diff = compare(a.summary(), b.summary())["diff"]
    assert diff["overall"]["maxvio_global"]["delta"] == pytest.approx(0.0)
    assert diff["overall"]["maxvio_global_processed"]["delta"] == pytest.approx(-1.0)
    assert diff["overall"]["dropped_share"]["b"] == pytest.approx(4 / 12)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (Filters(tags=(("nosuch", "x"),)), "no sequence has the tag key 'nosuch' (tag keys: domain)"),
        (Filters(tags=(("domain", "math"),)), "no sequence has domain=math (domain values: code)"),
        (Filters(phase="decode"), "this trace has no decode steps (it has prefill steps only)"),
    ],
)
def test_a_filter_the_trace_cannot_match_names_what_it_has(tmp_path: Path, filters: Filters, message: str) -> None:
    with moeprobe.open_trace(_with_drops(tmp_path / "t")) as trace, pytest.raises(FilterError) as err:
        trace.summary(filters)
    assert message in str(err.value)


def test_a_trace_without_tags_says_so(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t", {"routing": routing_table(np.array([0, 1]))}, layers=layer_meta(1, 4, 1))
    with moeprobe.open_trace(path) as trace, pytest.raises(FilterError, match="this trace has no tags"):
        trace.summary(Filters(tags=(("domain", "code"),)))


def test_inspect_counts_dropped_choices(tmp_path: Path) -> None:
    import json
    import subprocess

    from tests.conftest import PYTHON, run_cli_env

    path = _with_drops(tmp_path / "t")
    text = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(path)], capture_output=True, text=True,
                          env=run_cli_env(), timeout=60)
    assert text.returncode == 0, text.stderr
    assert "dropped choices (over capacity): 4 of 12 routing decisions" in text.stdout
    raw = subprocess.run([PYTHON, "-m", "moeprobe", "inspect", str(path), "--json"], capture_output=True, text=True,
                         env=run_cli_env(), timeout=60)
    assert json.loads(raw.stdout)["dropped_choices"] == 4
