"""Repetition and co-activation from one row per token with its choices side by side (analysis.choices) give the
same numbers as the row-level self-joins they replace, and fall back to those joins where the side-by-side
table would not be exact (a choice rank twice in a token, a position routed in two steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import moeprobe
from moeprobe.analysis import choices, coactivation, repetition
from moeprobe.analysis.sampling import sample
from tests.support import layer_meta, routing_table, write_trace


def _routing(rng: np.random.Generator, layer: int, experts: int, top_k: int, step: int = 0) -> pa.Table:
    """Three sequences of 40 tokens, k distinct experts per token drawn from a skewed popularity."""
    tokens = 120
    weights = np.exp(rng.normal(0, 1.5, experts))
    picks = np.stack([rng.choice(experts, top_k, replace=False, p=weights / weights.sum()) for _ in range(tokens)])
    return routing_table(
        picks,
        sequence=np.repeat(np.arange(3), 40),
        position=np.tile(np.arange(40), 3),
        step=np.full(tokens, step),
        layer=layer,
    )


def _row_level(trace: moeprobe.Trace) -> tuple[dict, dict]:
    """What the self-joins give: co-activation counts per layer, repetition rows per layer."""
    ctx = trace.context()
    s = sample(ctx, 0)
    joint = coactivation._row_level(ctx, s)
    got = ctx.query("repetition", sample=s.table)
    rep = {int(layer): (int(p), int(f), int(a)) for layer, p, f, a in zip(got["layer"], got["pairs"], got["first_same"], got["any_same"], strict=True)}
    return joint, rep


def _compare(trace: moeprobe.Trace) -> None:
    joint, rep = _row_level(trace)
    ctx = trace.context()
    s = sample(ctx, 0)
    got = coactivation.compute(ctx, s)
    assert [c.layer for c in got] == sorted(joint)
    for c in got:
        counts, pairs = joint[c.layer]
        np.testing.assert_array_equal(c.chosen, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_array_equal(c.matrix, np.where(counts[:, None] > 0, pairs / counts[:, None], 0.0))
    layers = repetition.compute(ctx, s)
    assert {r.layer: (r.pairs, round(r.first * r.pairs), round(r.any * r.pairs)) for r in layers} == rep


def test_side_by_side_counts_equal_the_row_level_joins(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # layers of different shapes (top-2 of 8, top-6 of 16), and some choices missing (a token with fewer rows)
    tables = [_routing(rng, 0, 8, 2), _routing(rng, 1, 16, 6)]
    tables[1] = tables[1].filter(pa.array(rng.random(len(tables[1])) > 0.1))
    write_trace(tmp_path / "t", {"routing": tables}, layers=[*layer_meta(1, 8, 2), *layer_meta(2, 16, 6)[1:]])
    trace = moeprobe.open_trace(tmp_path / "t")
    ctx = trace.context()
    found = choices.choices(ctx, sample(ctx, 0))
    assert found is not None and found.regular and found.positions_unique and found.top_k == 6
    _compare(trace)


def test_side_by_side_counts_a_token_choosing_one_expert_twice_as_the_joins_do(tmp_path: Path) -> None:
    # Ranks 0 and 1 of 15 tokens name the same expert (a foreign writer's rows): no co-activation of an expert
    # with itself, while its pairs with the token's other choices count once per rank, as in the joins.
    rng = np.random.default_rng(7)
    table = _routing(rng, 0, 8, 3)
    expert = table["expert"].to_numpy().copy()
    first = np.flatnonzero(table["k"].to_numpy() == 0)[:15]
    expert[first + 1] = expert[first]  # rows are tokens x k: a token's rank 1 follows its rank 0
    table = table.set_column(table.schema.get_field_index("expert"), "expert", pa.array(expert, pa.int16()))
    write_trace(tmp_path / "t", {"routing": table}, layers=layer_meta(1, 8, 3))
    trace = moeprobe.open_trace(tmp_path / "t")
    ctx = trace.context()
    found = choices.choices(ctx, sample(ctx, 0))
    assert found is not None and found.regular
    _compare(trace)


@pytest.mark.parametrize("case", ["choice rank twice", "position in two steps"])
def test_irregular_tokens_keep_the_row_level_joins(tmp_path: Path, case: str) -> None:
    rng = np.random.default_rng(5)
    table = _routing(rng, 0, 8, 2)
    if case == "choice rank twice":  # the first choice of 10 tokens recorded again with another expert
        again = table.filter(pc.equal(table["k"], 0)).slice(0, 10)
        again = again.set_column(again.schema.get_field_index("expert"), "expert", pc.cast(pc.add(pc.cast(again["expert"], pa.int32()), 1), pa.int16()))
        again = again.set_column(again.schema.get_field_index("expert"), "expert", pc.cast(pc.if_else(pc.equal(again["expert"], 8), 0, again["expert"]), pa.int16()))
        tables = [table, again]
    else:  # sequence 0 routed again at step 1 (a recomputed prompt) with other experts
        tables = [table, _routing(rng, 0, 8, 2, step=1).slice(0, 80)]
    write_trace(tmp_path / "t", {"routing": tables}, layers=layer_meta(1, 8, 2))
    trace = moeprobe.open_trace(tmp_path / "t")
    ctx = trace.context()
    found = choices.choices(ctx, sample(ctx, 0))
    assert found is not None
    assert (found.regular, found.positions_unique) == ((False, True) if case == "choice rank twice" else (True, False))
    _compare(trace)
