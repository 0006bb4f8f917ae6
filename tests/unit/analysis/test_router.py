"""Router diagnostics from captured logits: entropy, margin, z-loss, Switch and DeepSeek-V3 sequence-wise
losses, and the share of tokens whose biased and unbiased (group-limited) choices differ."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis.report_json import ReportOptions
from moeprobe.analysis.report_model import Report
from moeprobe.analysis.tables import header
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace


def _scores(logits: np.ndarray, layer: int, step: int = 0) -> pa.Table:
    n = len(logits)
    return pa.table(
        {
            "step": np.full(n, step, np.int32),
            "sequence": np.zeros(n, np.int64),
            "position": np.arange(n, dtype=np.int32),
            "layer": np.full(n, layer, np.int16),
            "scores": [list(map(float, row)) for row in logits],
        },
        schema=TABLES["scores"],
    )


def test_softmax_router_confidence_and_aux_losses(tmp_path: Path) -> None:
    # Layer 0: every token has logits (ln 3, 0, 0, 0) -> p = (1/2, 1/6, 1/6, 1/6), and goes to expert 0.
    # Layer 1: flat logits, tokens spread evenly over the four experts.
    skewed = np.tile([math.log(3), 0, 0, 0], (10, 1))
    flat = np.zeros((8, 4))
    tables = {
        "routing": [routing_table(np.zeros(10, int), layer=0), routing_table(np.arange(8) % 4, layer=1)],
        "scores": [_scores(skewed, 0), _scores(flat, 1)],
    }
    write_trace(tmp_path / "t", tables, layers=layer_meta(2, 4, 1))
    first, even = moeprobe.open_trace(tmp_path / "t").router()
    p = np.array([1 / 2, 1 / 6, 1 / 6, 1 / 6])
    assert first.tokens == 10
    assert first.entropy_norm == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert first.margin == pytest.approx(1 / 2 - 1 / 6)
    assert first.z_loss == pytest.approx(math.log(6) ** 2)  # (logsumexp)^2
    assert first.switch_loss == pytest.approx(2.0)  # E * f_0 * P_0 = 4 * 1 * 1/2
    assert first.deepseek_seq_loss == pytest.approx(2.0)  # f_0 = E/(kT) * T = 4, P_0 = 1/2
    assert first.bias_flip is None
    assert even.entropy_norm == pytest.approx(1.0) and even.margin == pytest.approx(0.0)
    assert even.switch_loss == pytest.approx(1.0) and even.deepseek_seq_loss == pytest.approx(1.0)


def _logit(q: list[float]) -> list[float]:
    return [math.log(v / (1 - v)) for v in q]


def test_biased_and_unbiased_choices_with_group_limited_routing(tmp_path: Path) -> None:
    # DeepSeek-V3 style, E=4 in 2 groups, keep 1 group, top-1. Token 0: sigmoid scores (.9, .1, .6, .6) and
    # bias (.5, 0, 0, 0): with bias group {0,1} scores 1.5 > 1.2 and expert 0 wins; without bias group {2,3}
    # scores 1.2 > 1.0 and expert 2 wins: the choices differ. Token 1 (.9, .8, .1, .1) picks 0 either way.
    logits = np.array([_logit([0.9, 0.1, 0.6, 0.6]), _logit([0.9, 0.8, 0.1, 0.1])])
    bias = pa.table({"step": [0, 0], "layer": [0, 1], "bias": [[0.5, 0.0, 0.0, 0.0]] * 2}, schema=TABLES["bias"])
    grouped = layer_meta(1, 4, 1, scoring="sigmoid", n_group=2, topk_group=1, has_bias=True)
    ungrouped = layer_meta(2, 4, 1, scoring="sigmoid", has_bias=True)[1:]
    tables = {
        "routing": [routing_table(np.array([0, 0]), layer=0), routing_table(np.array([0, 0]), layer=1)],
        "scores": [_scores(logits, 0), _scores(logits, 1)],
        "bias": bias,
    }
    write_trace(tmp_path / "t", tables, layers=grouped + ungrouped)
    limited, plain = moeprobe.open_trace(tmp_path / "t").router()
    assert limited.scoring == "sigmoid"
    assert limited.bias_tokens == 2 and limited.bias_flip == pytest.approx(0.5)
    # without group limiting expert 0 is the best score with or without the bias
    assert plain.bias_flip == pytest.approx(0.0)
    # sigmoid routers: the distribution is the normalised sigmoid scores
    s = np.array([[0.9, 0.1, 0.6, 0.6], [0.9, 0.8, 0.1, 0.1]])
    p = s / s.sum(axis=1, keepdims=True)
    assert limited.entropy_norm == pytest.approx(float((-(p * np.log(p)).sum(axis=1) / math.log(4)).mean()), rel=1e-5)
    assert limited.margin == pytest.approx(np.mean([0.9 - 0.6, 0.9 - 0.8]), rel=1e-5)


def test_bias_applies_from_the_step_it_took_effect(tmp_path: Path) -> None:
    logits = np.array([_logit([0.6, 0.65, 0.1, 0.1])] * 2)
    scores = pa.concat_tables([_scores(logits[:1], 0, step=0), _scores(logits[1:], 0, step=1)])
    # bias known from step 1 only: the step-0 token has no bias to compare with and is not counted
    bias = pa.table({"step": [1], "layer": [0], "bias": [[0.1, 0.0, 0.0, 0.0]]}, schema=TABLES["bias"])
    routing = routing_table(np.array([1, 0]), step=np.array([0, 1]))
    meta = layer_meta(1, 4, 1, scoring="sigmoid", has_bias=True)
    write_trace(tmp_path / "t", {"routing": routing, "scores": scores, "bias": bias}, layers=meta)
    (layer,) = moeprobe.open_trace(tmp_path / "t").router()
    assert layer.bias_tokens == 1 and layer.bias_flip == 1.0


def test_no_logits_no_router_section(tmp_path: Path) -> None:
    write_trace(tmp_path / "t", {"routing": routing_table(np.array([0, 1]))}, layers=layer_meta(1, 4, 1))
    trace = moeprobe.open_trace(tmp_path / "t")
    assert trace.router() == []
    report = trace.summary()
    assert report["specialization"]["router"] is None and report["overall"]["aux_loss"] is None


def _four_sequences(rng: np.random.Generator, keep: list[int] | None = None) -> dict[str, Any]:
    """Four sequences of 8 tokens, one layer of 4 experts, top-1, each sequence with its own logit scale: their
    router statistics differ, so a statistic over the wrong tokens shows."""
    logits = np.concatenate([rng.normal(0.0, 1.0 + s, size=(8, 4)) for s in range(4)])
    experts = logits.argmax(axis=1)
    sequence = np.repeat(np.arange(4), 8)
    position = np.tile(np.arange(8), 4)
    rows = np.flatnonzero(np.isin(sequence, keep if keep is not None else range(4)))
    scores = _scores(logits[rows], 0)
    scores = scores.set_column(1, "sequence", pa.array(sequence[rows], pa.int64()))
    scores = scores.set_column(2, "position", pa.array(position[rows], pa.int32()))
    routing = routing_table(experts[rows], sequence=sequence[rows], position=position[rows])
    return {"routing": routing, "scores": scores}


def test_logit_budget_reads_fewer_whole_sequences_and_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    write_trace(tmp_path / "all", _four_sequences(rng), layers=layer_meta(1, 4, 1))
    trace = moeprobe.open_trace(tmp_path / "all")
    # 32 tokens x 4 logits = 128 logits: a budget of 40 logits (10 decisions) keeps one whole sequence of 8 tokens
    (budgeted,) = trace.router(logit_budget=40)
    assert budgeted.tokens == 8
    report = trace.summary(options=ReportOptions(logit_budget=40))
    router = report["specialization"]["router"]
    assert router["logit_budget"] == 40 and router["sample"]["sequences"] == 1
    assert router["sample"]["fraction"] == pytest.approx(0.25)
    assert report["specialization"]["sample"]["fraction"] == 1.0  # repetition and co-activation still read all
    lines = header(Report.from_json(report))
    assert any("router 25.0% (1 sequences, --logit-sample)" in line for line in lines)

    # the statistics are those of the chosen sequence alone (the routing it joins with is that sequence's too)
    chosen = int(trace.sql("SELECT DISTINCT sequence FROM scores WHERE " + _predicate(trace, 40))["sequence"][0].as_py())
    write_trace(tmp_path / "one", _four_sequences(np.random.default_rng(7), keep=[chosen]), layers=layer_meta(1, 4, 1))
    (alone,) = moeprobe.open_trace(tmp_path / "one").router(logit_budget=0)
    for name in ("tokens", "entropy_norm", "margin", "z_loss", "switch_loss", "deepseek_seq_loss"):
        assert getattr(budgeted, name) == pytest.approx(getattr(alone, name)), name

    # a budget that holds every logit, or none (0), reads the token-level sample itself
    for budget in (0, 128):
        (whole,) = trace.router(logit_budget=budget)
        assert whole.tokens == 32
        assert trace.summary(options=ReportOptions(logit_budget=budget))["specialization"]["router"]["sample"]["fraction"] == 1.0


def _predicate(trace: moeprobe.Trace, budget: int) -> str:
    from moeprobe.analysis import router
    from moeprobe.analysis.sampling import sample

    ctx = trace.context()
    return router.choose_sample(ctx, sample(ctx, 0), budget).predicate


def _group_topk_reference(v: list[float], groups: int, kept: int, k: int) -> list[int]:
    """DeepSeek-V3's group-limited top-k written out one token at a time (ties: lower index first)."""
    size = len(v) // groups
    score = [sum(sorted(v[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(groups)]
    best = sorted(range(groups), key=lambda g: (-score[g], g))[:kept]
    masked = [x if i // size in best and i < groups * size else -1e30 for i, x in enumerate(v)]
    return sorted(sorted(range(len(v)), key=lambda i: (-masked[i], i))[:k])


@pytest.mark.parametrize(("experts", "groups", "kept", "k"), [(16, 4, 2, 3), (12, 3, 1, 2), (10, 3, 2, 4), (8, 1, 1, 2)])
def test_group_limited_top_k_matches_the_definition(experts: int, groups: int, kept: int, k: int) -> None:
    from moeprobe.analysis.router import _group_topk

    rng = np.random.default_rng(experts * 100 + groups)
    v = rng.random((200, experts))
    v[:20] = np.round(v[:20], 1)  # ties
    got = _group_topk(v, groups, kept, k)
    assert got.tolist() == [_group_topk_reference(list(row), groups, kept, k) for row in v]


# What the SQL implementation (list lambdas, before the numpy one) computed on the trace of _golden_trace; the
# numpy one must give the same to the last digits a report shows (it rounds to 6 decimals).
_SQL_FIGURES = {
    0: ("sigmoid", 36, 0.9179294870673841, 0.06838849779978722, 18.77374153471193, 1.0639945587947586,
        1.050109780481393, 0.3611111111111111, 36),
    1: ("softmax", 36, 0.5962280254025668, 0.018819736523903986, 17.78953714211407, 1.2706260637506064,
        1.26485829940356, 0.8888888888888888, 36),
}


def _golden_trace(path: Path) -> None:
    """Two layers of 16 experts, top-4: a DeepSeek-V3-style one (sigmoid, 4 groups, 2 kept) and a softmax one,
    each with a correction bias (layer 0's changing at step 2); 3 sequences of 12 tokens over 4 steps."""
    rng = np.random.default_rng(0)
    E, k = 16, 4
    seq, pos = np.repeat(np.arange(3), 12), np.tile(np.arange(12), 3)
    step = pos // 3
    layers = layer_meta(2, E, k, scoring="sigmoid", n_group=4, topk_group=2, has_bias=True)
    layers[1]["scoring"] = "softmax"
    layers[1].pop("n_group", None)
    layers[1].pop("topk_group", None)
    routing, scores = [], []
    for layer in range(2):
        x = rng.normal(0, 2, size=(36, E)).astype(np.float32)
        top = np.argsort(-x, axis=1, kind="stable")[:, :k]
        routing.append(routing_table(top, sequence=seq, position=pos, step=step, layer=layer))
        table = _scores(x, layer).set_column(0, "step", pa.array(step, pa.int32()))
        table = table.set_column(1, "sequence", pa.array(seq, pa.int64()))
        scores.append(table.set_column(2, "position", pa.array(pos, pa.int32())))
    bias = pa.table(
        {"step": [0, 2, 0], "layer": [0, 0, 1], "bias": [list(map(float, rng.normal(0, 0.05, E))) for _ in range(3)]},
        schema=TABLES["bias"],
    )
    write_trace(path, {"routing": routing, "scores": scores, "bias": bias}, layers=layers)


def test_router_figures_are_those_of_the_sql_implementation(tmp_path: Path) -> None:
    _golden_trace(tmp_path / "t")
    got = moeprobe.open_trace(tmp_path / "t").router(logit_budget=0)
    assert [r.layer for r in got] == [0, 1]
    for r in got:
        expected = _SQL_FIGURES[r.layer]
        assert (r.scoring, r.tokens, r.bias_tokens) == (expected[0], expected[1], expected[8])
        measured = (r.entropy_norm, r.margin, r.z_loss, r.switch_loss, r.deepseek_seq_loss, r.bias_flip)
        assert measured == pytest.approx(expected[2:8], rel=1e-12, abs=0)
