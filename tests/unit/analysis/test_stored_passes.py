"""The passes that read a format-2 trace's stored rows instead of the logical routing view (analysis.stored, the
token table of analysis.choices, the count tables read from it) give the report the view gives, on traces made
to break them: several ranks, a sample smaller than the trace, a token row stored twice, a position routed in two
steps, layers of two shapes (rows that do not use every choice column), rows that break the contract, drops, and
a format-1 trace.

The reference is the same report through a filter that keeps every layer: a filtered report never takes the
stored paths (the stored rows stand for the routing only without filters), so it is the view's answer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moeprobe
from moeprobe.analysis import choices, stored
from moeprobe.analysis.filters import Filters
from moeprobe.analysis.report_json import ReportOptions, build
from moeprobe.analysis.sampling import sample
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace

DATA = Path(__file__).resolve().parents[2] / "data"


def _shard(rng: np.random.Generator, layers: list[dict[str, Any]], *, sequences: int = 6, tokens: int = 30,
           step: int = 0, drops: bool = False) -> list[pa.Table]:
    """One routing table per layer: ``sequences`` sequences of ``tokens`` tokens, k distinct experts a token from
    a skewed popularity, token ids from a small vocabulary (so that the vocabulary table has ids seen often)."""
    out = []
    n = sequences * tokens
    for meta in layers:
        E, k = meta["num_experts"], meta["top_k"]
        popularity = np.exp(rng.normal(0, 1.2, E))
        picks = np.stack([rng.choice(E, k, replace=False, p=popularity / popularity.sum()) for _ in range(n)])
        table = routing_table(
            picks,
            step=np.full(n, step) + np.repeat(np.arange(sequences), tokens) // 3,
            sequence=np.repeat(np.arange(sequences), tokens),
            position=np.tile(np.arange(tokens), sequences),
            token_id=rng.integers(0, 12, n),
            layer=meta["index"],
        )
        if drops:  # every 9th token's choices dropped over capacity
            flags = np.repeat(np.arange(n) % 9 == 0, k)
            table = table.set_column(table.schema.get_field_index("dropped"), "dropped", pa.array(flags))
        out.append(table)
    return out


def _tags(sequences: int = 6) -> pa.Table:
    return pa.table(
        {"sequence": np.arange(sequences), "key": ["domain"] * sequences, "value": [["code", "math", "prose"][s % 3] for s in range(sequences)]},
        schema=TABLES["tags"],
    )


def _write(path: Path, case: str) -> Path:
    rng = np.random.default_rng(7)
    layers = layer_meta(3, 16, 4)
    if case == "two layer shapes":  # layer 2 routes top-2 of 8: its rows use 2 of the 4 choice columns
        layers[2] = {**layers[2], "num_experts": 8, "top_k": 2}
    routing = _shard(rng, layers, drops=case == "drops")
    if case == "token row twice":  # token 8 of every sequence stored again in layer 0, other experts, same step
        again = routing[0].filter(pa.compute.equal(routing[0]["position"], 8))
        expert = again.schema.get_field_index("expert")
        routing.append(again.set_column(expert, "expert", pa.array((np.asarray(again["expert"]) + 5) % 16, pa.int16())))
    if case == "position in two steps":  # sequence 1 routed again at a later step (a recomputed prompt)
        routing += [t.slice(30 * 4, 30 * 4) for t in _shard(rng, layers, step=40)]
    path = write_trace(path, {"routing": routing, "tags": _tags()}, layers=layers, world_size=2 if case == "two ranks" else 1)
    if case == "two ranks":  # rank 1: other experts for the same sequence numbers (its own sequences)
        write_trace(path, {"routing": _shard(rng, layers), "tags": _tags()}, layers=layers, rank=1, world_size=2)
    if case == "invalid rows":  # two stored rows name experts past the layer's 16
        segment = next((path / "rank=0" / "routing").glob("*.parquet"))
        table = pq.read_table(segment)
        column = table.column("expert_1").to_pylist()
        column[3], column[40] = 16, 200
        index = table.schema.get_field_index("expert_1")
        pq.write_table(table.set_column(index, table.schema.field(index), pa.array(column, table.schema.field(index).type)), segment)
    return path


CASES = ["plain", "two ranks", "token row twice", "position in two steps", "two layer shapes", "invalid rows", "drops"]
# Which cases read the stored rows for the token table: the others must fall back to the grouped decisions.
STORED_TOKENS = {"plain", "two ranks", "position in two steps", "drops"}


def _without_filters(report: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in report.items() if key != "filters"}


@pytest.mark.parametrize(
    ("budget", "count_budget"), [(0, 0), (700, 700), (700, 1500), (700, 0)],
    ids=["whole trace", "sampled", "larger count sample", "counts of the whole trace"],
)
@pytest.mark.parametrize("case", CASES)
def test_report_equals_the_views_report(tmp_path: Path, case: str, budget: int, count_budget: int) -> None:
    path = _write(tmp_path / "t", case)
    options = ReportOptions(full=True, sample_budget=budget, count_budget=count_budget)
    with moeprobe.open_trace(path) as trace:
        ctx = trace.context()
        found = choices.choices(ctx, sample(ctx, budget))
        assert found is not None and found.stored == (case in STORED_TOKENS)
        assert (stored.rows(ctx) is not None) == (case != "invalid rows")
        got = build(trace, None, options)
    with moeprobe.open_trace(path) as trace:
        want = build(trace, Filters(layers=(0, 1, 2)), options)
    assert _without_filters(got) == _without_filters(want)
    if budget:  # the sample really is a part of the trace, and the count sample another part or all of it
        assert 0 < got["specialization"]["sample"]["fraction"] < 1
        counted, sampled = got["specialization"]["counts_sample"]["fraction"], got["specialization"]["sample"]["fraction"]
        assert counted == (1 if not count_budget else sampled) if count_budget <= budget else sampled < counted < 1
    assert got["specialization"]["tags"] and got["specialization"]["vocabulary"]["layers"]


def test_a_format_1_trace_keeps_the_view(tmp_path: Path) -> None:
    path = tmp_path / "v1"
    shutil.copytree(DATA / "v1-good", path)
    with moeprobe.open_trace(path) as trace:
        ctx = trace.context()
        assert stored.rows(ctx) is None and not stored.has_no_drops(ctx)
        found = choices.choices(ctx, sample(ctx, 0))
        assert found is None or not found.stored
        got = build(trace)
        layers = tuple(sorted(ctx.layers))
    with moeprobe.open_trace(path) as trace:
        assert _without_filters(got) == _without_filters(build(trace, Filters(layers=layers)))


@pytest.mark.parametrize("case", ["plain", "drops", "invalid rows"])
@pytest.mark.parametrize("filters", [Filters(), Filters(layers=(1,)), Filters(steps=(0, 1))], ids=["none", "layer", "steps"])
def test_no_drops_only_where_the_view_has_none(tmp_path: Path, case: str, filters: Filters) -> None:
    with moeprobe.open_trace(_write(tmp_path / "t", case)) as trace:
        ctx = trace.context(filters)
        dropped = ctx.query("load_dropped")
        if stored.has_no_drops(ctx):
            assert len(dropped["layer"]) == 0
        assert stored.has_no_drops(ctx) == (case != "drops")
        if case == "drops" and filters == Filters():
            assert int(dropped["dropped"].sum()) > 0


@pytest.mark.parametrize("case", CASES)
def test_sequence_sizes_equal_the_views(tmp_path: Path, case: str) -> None:
    with moeprobe.open_trace(_write(tmp_path / "t", case)) as trace:
        ctx = trace.context()
        fast = stored.sequences_sql(ctx)
        assert (fast is not None) == (case != "invalid rows")
        if fast is None:
            return
        layer = next(iter(ctx.layers))
        view = (f"SELECT rank, sequence, count(*) * {len(ctx.layers)} AS n FROM {ctx.sources()['routing']} AS r "
                f"WHERE layer = {layer} GROUP BY ALL")
        order = " ORDER BY rank, sequence"
        assert trace.sql(f"SELECT * FROM ({fast}){order}").to_pylist() == trace.sql(f"SELECT * FROM ({view}){order}").to_pylist()
