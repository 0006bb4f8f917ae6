"""Format v2: routing stored one row per token, read back as the same logical routing table (pyarrow and
DuckDB), each weight encoding within its documented bound, and v1 traces still read through the same view."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moeprobe
from moeprobe.traces.compact import RoutingEncoding
from moeprobe.traces.schema import FORMAT_VERSION, ROUTING
from tests.conftest import DATA
from tests.support import layer_meta, write_trace

COLUMNS = ROUTING.names


def _logical(rng: np.random.Generator, tokens: int = 50, k: int = 4, experts: int = 16) -> pa.Table:
    """Routing rows as a writer might be handed them: several steps, layers, both phases, dropped tokens,
    weights not in rank order inside some tokens (k says the rank), a missing (NaN) weight."""
    expert = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)])
    weight = rng.random((tokens, k)).astype(np.float32) * 3
    weight[3, 1] = np.nan
    per_token = lambda values: np.repeat(values, k)  # noqa: E731
    step = np.arange(tokens) // 10
    return pa.table(
        {
            "step": per_token(step).astype(np.int32),
            "sequence": per_token(np.arange(tokens) % 3).astype(np.int64),
            "position": per_token(np.arange(tokens)).astype(np.int32),
            "token_id": per_token(rng.integers(-1, 50_000, tokens)).astype(np.int32),
            "phase": per_token(np.where(step % 2 == 0, "prefill", "decode")),
            "layer": per_token(np.arange(tokens) % 2).astype(np.int16),
            "k": np.tile(np.arange(k), tokens).astype(np.int8),
            "expert": expert.reshape(-1).astype(np.int16),
            "weight": weight.reshape(-1),
            "dropped": per_token(np.arange(tokens) % 7 == 0),
        },
        schema=ROUTING,
    )


def _same(got: pa.Table, want: pa.Table) -> bool:
    """Equal rows and types, a NaN weight equal to a NaN weight (Arrow's equals says NaN != NaN)."""
    types = lambda t: [(f.name, f.type) for f in t.schema]  # noqa: E731 - nullability differs between readers
    if types(got) != types(want) or got.num_rows != want.num_rows:
        return False
    for name in want.column_names:
        a, b = got.column(name).to_numpy(), want.column(name).to_numpy()
        if not np.array_equal(a, b, equal_nan=name == "weight"):
            return False
    return True


def _half_mantissa(w: np.ndarray) -> np.ndarray:
    """Reference rounding to 11 significant bits, half to even, by a different route than the writer's."""
    mantissa, exponent = np.frexp(w.astype(np.float64))
    return np.ldexp(np.round(mantissa * 2048) / 2048, exponent).astype(np.float32)


def test_fp16_rounding_keeps_special_values_and_matches_ieee_half_in_its_range() -> None:
    from moeprobe.traces.compact import round_to_half_mantissa

    w = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 0.1, 2.5, 1e-7, 1e6, 0.33325195, 0.33349609], np.float32)
    got = w.copy()
    round_to_half_mantissa(got)
    assert np.array_equal(got[:5], w[:5], equal_nan=True)
    assert np.array_equal(got[5:], _half_mantissa(w[5:]))
    normal = [0.1, 2.5, 0.33325195, 0.33349609]
    assert np.array_equal(_half_mantissa(np.array(normal, np.float32)), np.array(normal, np.float16).astype(np.float32))


def _view(trace: moeprobe.Trace) -> pa.Table:
    return trace.sql(f"select {', '.join(COLUMNS)} from routing order by step, layer, sequence, position, k")


def _sorted(table: pa.Table) -> pa.Table:
    return table.select(COLUMNS).sort_by([(c, "ascending") for c in ("step", "layer", "sequence", "position", "k")])


def test_fp32_round_trip_is_exact_through_pyarrow_and_duckdb(tmp_path: Path) -> None:
    logical = _logical(np.random.default_rng(0))
    path = write_trace(tmp_path / "t", {"routing": logical}, layers=layer_meta(2, 16, 4), options={"weights": "fp32"})
    trace = moeprobe.open_trace(path)
    assert trace.manifest["format_version"] == FORMAT_VERSION == 2
    assert trace.manifest["encoding"]["routing"] == {"layout": "per_token", "expert": "uint8", "weights": "fp32", "top_k": 4}
    # pyarrow path: same rows, same order as written
    assert _same(trace.routing().select(COLUMNS), logical)
    # DuckDB view: the same rows
    assert _same(_view(trace), _sorted(logical))
    stored = pq.read_table(next((path / "rank=0" / "routing").glob("*.parquet")))
    assert stored.num_rows == 50  # one stored row per token, not per decision
    assert trace.reader.segments("routing")[0].rows == 200  # segments count decisions
    assert trace.manifest["counters"]["rows"]["routing"] == 200


@pytest.mark.parametrize("weights", ["fp16", "u8"])
def test_lossy_weights_stay_within_documented_bounds(tmp_path: Path, weights: str) -> None:
    logical = _logical(np.random.default_rng(1))
    path = write_trace(tmp_path / "t", {"routing": logical}, layers=layer_meta(2, 16, 4), options={"weights": weights})
    trace = moeprobe.open_trace(path)
    for got, exact in ((trace.routing().select(COLUMNS), logical), (_view(trace), _sorted(logical))):
        assert _same(got.drop_columns(["weight"]), exact.drop_columns(["weight"]))
        want = exact.column("weight").to_numpy()
        have = got.column("weight").to_numpy()
        assert np.array_equal(np.isnan(have), np.isnan(want))  # a missing weight stays missing
        present = ~np.isnan(want)
        error = np.abs(have[present] - want[present])
        if weights == "fp16":
            assert (error <= np.abs(want[present]) * 2.0**-11).all()
            assert np.array_equal(have[present], _half_mantissa(want[present]))
            assert error.max() > 0
        else:
            span = float(max(0.0, want[present].max()) - min(0.0, want[present].min()))
            assert error.max() <= span / 508 * (1 + 1e-5) + 1e-6
            assert error.max() > 0  # quantised, so not exact: the check above is not vacuous


def test_uneven_top_k_and_unranked_input_kept_exactly(tmp_path: Path) -> None:
    # layer 0 routes top-1, layer 1 top-3: rows of layer 0 use one of the three choice columns
    rows = {
        "step": [0, 0, 0, 0], "sequence": [0, 0, 0, 0], "position": [0, 0, 0, 0], "token_id": [5, 5, 5, 5],
        "phase": ["prefill"] * 4, "layer": [0, 1, 1, 1], "k": [0, 0, 1, 2], "expert": [7, 1, 2, 3],
        "weight": [1.0, 0.5, 0.25, 0.25], "dropped": [False] * 4,
    }
    logical = pa.table(rows, schema=ROUTING)
    meta = layer_meta(1, 8, 1) + layer_meta(2, 8, 3)[1:]
    path = write_trace(tmp_path / "a", {"routing": logical}, layers=meta)
    trace = moeprobe.open_trace(path)
    assert _same(trace.routing().select(COLUMNS), logical)
    assert _same(_view(trace), _sorted(logical))
    assert trace.reader.segments("routing")[0].rows == 4

    # ranks that are not 0, 1, 2... in storage order (hand-written input): kept as given
    unranked = pa.table({**rows, "layer": [1] * 4, "k": [1, 0, 3, 2], "position": [0, 0, 1, 1]}, schema=ROUTING)
    path = write_trace(tmp_path / "b", {"routing": unranked}, layers=layer_meta(2, 8, 2))
    trace = moeprobe.open_trace(path)
    assert _same(trace.routing().select(COLUMNS), unranked)
    assert _same(_view(trace), _sorted(unranked))

    # a capacity simulation leaves gaps: token 0 keeps choices 0 and 2, token 1 only choice 1
    gaps = pa.table({**rows, "layer": [1] * 4, "k": [0, 2, 1, 0], "position": [0, 0, 1, 2]}, schema=ROUTING)
    path = write_trace(tmp_path / "c", {"routing": gaps}, layers=layer_meta(2, 8, 3))
    trace = moeprobe.open_trace(path)
    assert _same(trace.routing().select(COLUMNS), gaps)
    assert _same(_view(trace), _sorted(gaps))


def test_wide_expert_ids_use_uint16_and_out_of_range_ids_are_refused(tmp_path: Path) -> None:
    assert RoutingEncoding.for_layers(256, 8).expert == "uint8"
    assert RoutingEncoding.for_layers(257, 8).expert == "uint16"
    logical = _logical(np.random.default_rng(2), experts=300)
    path = write_trace(tmp_path / "t", {"routing": logical}, layers=layer_meta(2, 300, 4), options={"weights": "fp32"})
    assert _same(moeprobe.open_trace(path).routing().select(COLUMNS), logical)
    with pytest.raises(ValueError, match="expert id out of range"):
        write_trace(tmp_path / "u", {"routing": logical}, layers=layer_meta(2, 16, 4))


def test_v1_and_v2_traces_expose_the_same_routing_view(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    shutil.copytree(DATA / "v1-good", v1)
    old = moeprobe.open_trace(v1)
    assert json.loads((v1 / "manifest.json").read_text())["format_version"] == 1
    logical = old.routing().select(COLUMNS)
    v2 = write_trace(tmp_path / "v2", {"routing": logical}, layers=old.layers, options={"weights": "fp32"})
    new = moeprobe.open_trace(v2)
    describe = "select column_name, column_type from (describe routing)"
    assert _same(old.sql(describe), new.sql(describe))
    assert _same(_view(old), _view(new))
    assert _same(new.routing().select(COLUMNS), logical)


def test_unknown_encoding_is_a_clear_error(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t", {"routing": _logical(np.random.default_rng(3))}, layers=layer_meta(2, 16, 4))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["encoding"]["routing"]["weights"] = "fp8"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(moeprobe.TraceError, match="unknown routing encoding"):
        moeprobe.open_trace(path)


def test_segment_with_impossible_choice_counts_is_refused(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t", {"routing": _logical(np.random.default_rng(4))}, layers=layer_meta(2, 16, 4))
    segment = next((path / "rank=0" / "routing").glob("*.parquet"))
    stored = pq.read_table(segment)
    stored = stored.set_column(stored.schema.get_field_index("choices"), stored.schema.field("choices"),
                               pa.array(np.full(stored.num_rows, 9, np.int8)))
    pq.write_table(stored, segment)
    with pytest.raises(moeprobe.TraceError, match="choice counts outside 1..4"):
        moeprobe.open_trace(path)


@pytest.mark.parametrize("weights", ["fp16", "u8"])
def test_ranked_weights_stored_as_differences_read_back_as_the_plain_encoding_would(tmp_path: Path, weights: str) -> None:
    # Ranked rows (weights falling with k) are stored as differences between neighbouring ranks; rows that
    # cannot be (a NaN, a null, a negative weight, a rising code, a row using fewer columns) store their codes.
    rng = np.random.default_rng(7)
    tokens, k = 40, 4
    weight = -np.sort(-rng.random((tokens, k)).astype(np.float32), axis=1)
    weight[1, 2] = np.nan
    weight[2] = [-0.1, -0.2, -0.3, -0.4]  # falls, but negative codes rise
    weight[3, 0] = 0.0  # rises after a zero: not ranked by size
    weight[4] = [0.5, 0.5, 0.5, 0.5]  # ties: differences of zero
    logical = _logical(rng, tokens=tokens, k=k)
    logical = logical.set_column(logical.schema.get_field_index("weight"), "weight", pa.array(weight.reshape(-1)))
    logical = logical.set_column(logical.schema.get_field_index("k"), "k", pa.array(np.tile(np.arange(k), tokens).astype(np.int8)))
    with_null = pa.array([None if i == 5 * k + 1 else w for i, w in enumerate(weight.reshape(-1).tolist())], pa.float32())
    logical = logical.set_column(logical.schema.get_field_index("weight"), "weight", with_null)
    fewer = logical.filter(pa.array(~((np.arange(tokens * k) // k == 6) & (np.arange(tokens * k) % k == 3))))  # token 6: 3 choices
    path = write_trace(tmp_path / "t", {"routing": fewer}, layers=layer_meta(2, 16, k), options={"weights": weights})
    trace = moeprobe.open_trace(path)
    stored = pq.read_table(next((path / "rank=0" / "routing").glob("*.parquet")))
    delta = stored.column("weight_delta").to_pylist()
    # u8 codes rise with the value whatever its sign, so falling negative weights are differences there too
    negative_ranked = weights == "u8"
    assert delta[:7] == [True, False, negative_ranked, False, True, False, True]
    assert sum(delta) == tokens - 3 - (not negative_ranked)
    # the same rows as the codes alone would give: round or quantise without differences, by hand
    want = fewer.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    if weights == "fp16":
        expected = _half_mantissa(want)
    else:
        present = want[~np.isnan(want)]
        lo, hi = min(0.0, float(present.min())), max(0.0, float(present.max()))
        low, scale = np.float32(lo), np.float32((hi - lo) / 254)
        expected = (low + np.clip(np.rint((want - low) / scale), 0, 254).astype(np.float32) * scale).astype(np.float32)
        expected[np.isnan(want)] = np.nan
    nulls = fewer.column("weight").is_null().to_numpy(zero_copy_only=False)
    got = trace.routing().select(COLUMNS)
    assert got.column("weight").is_null().to_numpy(zero_copy_only=False).tolist() == nulls.tolist()
    assert np.array_equal(got.column("weight").to_numpy(zero_copy_only=False)[~nulls], expected[~nulls], equal_nan=True)
    assert _same(got.drop_columns(["weight"]), fewer.drop_columns(["weight"]))
    view = trace.sql(
        "select weight, weight is null as missing from routing order by step, layer, sequence, position, k"
    )
    order = np.lexsort([fewer.column(c).to_numpy() for c in ("k", "position", "sequence", "layer", "step")])
    assert view.column("missing").to_pylist() == nulls[order].tolist()
    have = view.column("weight").to_numpy(zero_copy_only=False)
    assert np.array_equal(have[~nulls[order]], expected[order][~nulls[order]], equal_nan=True)


def test_view_reads_full_rank_segments_without_rank_lookups_and_others_in_full(tmp_path: Path) -> None:
    full = _logical(np.random.default_rng(8))  # every token uses all 4 choices, in rank order
    rows = {
        "step": [9, 9, 9], "sequence": [0, 0, 0], "position": [0, 0, 1], "token_id": [5, 5, 6],
        "phase": ["decode"] * 3, "layer": [1, 1, 1], "k": [1, 0, 0], "expert": [7, 1, 2],
        "weight": [0.25, 0.5, 1.0], "dropped": [False] * 3,
    }
    uneven = pa.table(rows, schema=ROUTING)  # token 0: ranks given out of order; token 1: one choice
    # left open (status None): closing would merge the two segments into one (compaction)
    path = write_trace(tmp_path / "t", {"routing": [full, uneven]}, layers=layer_meta(2, 16, 4), status=None)
    trace = moeprobe.open_trace(path)
    assert [s.full_rank for s in trace.reader.segments("routing")] == [True, False]
    both = pa.concat_tables([full, uneven])
    got = _view(trace)
    assert _same(got.drop_columns(["weight"]), _sorted(both).drop_columns(["weight"]))
    assert np.array_equal(got.column("weight").to_numpy(), _half_mantissa(_sorted(both).column("weight").to_numpy()), equal_nan=True)
