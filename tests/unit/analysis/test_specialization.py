"""Specialization with known answers: repetition baselines from random routing, NMI 1 and 0, the three
per-tag normalisations, vocabulary specialization and its baseline, co-activation, and the sequence sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import moeprobe
from moeprobe.analysis.filters import Filters
from moeprobe.analysis.sampling import sample as sample_routing
from moeprobe.traces.schema import TABLES
from tests.support import layer_meta, routing_table, write_trace


def _random_topk(rng: np.random.Generator, tokens: int, experts: int, k: int) -> np.ndarray:
    return np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]


def _sequences(n_seq: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) per token for n_seq sequences of ``length`` tokens."""
    return np.repeat(np.arange(n_seq), length), np.tile(np.arange(length), n_seq)


def _tags(domains: list[str]) -> pa.Table:
    return pa.table(
        {"sequence": np.arange(len(domains)), "key": ["domain"] * len(domains), "value": domains}, schema=TABLES["tags"]
    )


def test_uniform_random_routing_reproduces_the_repetition_baselines(tmp_path: Path) -> None:
    # Mixtral §5 / docs/metrics.md: 1/E = 12.5 % and 1 - C(6,2)/C(8,2) = 46.4 % for E=8, k=2.
    rng = np.random.default_rng(1234)
    seq, pos = _sequences(20, 1000)
    experts = _random_topk(rng, 20_000, 8, 2)
    routing = routing_table(experts, sequence=seq, position=pos)
    write_trace(tmp_path / "t", {"routing": routing}, layers=layer_meta(1, 8, 2))
    spec = moeprobe.open_trace(tmp_path / "t").specialization()
    (rep,) = spec.repetition
    assert rep.pairs == 20 * 999
    # binomial standard errors are 0.0023 and 0.0035: four of them either way
    assert rep.first == pytest.approx(0.125, abs=0.01)
    assert rep.any == pytest.approx(0.4643, abs=0.015)
    assert (rep.random_first, round(rep.random_any, 4)) == (0.125, 0.4643)


def test_a_sticky_router_repeats_every_time(tmp_path: Path) -> None:
    experts = np.tile([[3, 5]], (50, 1))
    write_trace(tmp_path / "t", {"routing": routing_table(experts)}, layers=layer_meta(1, 8, 2))
    (rep,) = moeprobe.open_trace(tmp_path / "t").specialization().repetition
    assert (rep.pairs, rep.first, rep.any) == (49, 1.0, 1.0)


def test_expert_determined_by_domain_gives_nmi_one(tmp_path: Path) -> None:
    domains = ["code", "math", "prose", "chat"]
    seq, pos = _sequences(4, 400)
    experts = 2 * seq  # domain d always goes to expert 2d
    tables = {"routing": routing_table(experts, sequence=seq, position=pos), "tags": _tags(domains)}
    write_trace(tmp_path / "t", tables, layers=layer_meta(1, 8, 1))
    (tag,) = moeprobe.open_trace(tmp_path / "t").specialization().tags
    assert tag.key == "domain" and tag.values == sorted(domains)
    layer = tag.layer(0)
    assert layer.mi.nmi == pytest.approx(1.0, abs=0.005)  # 1 - bias / H = 1 - (9/3200) / ln 4
    code = tag.values.index("code")
    assert layer.share[code, 0] == 1.0  # Mixtral: share of the domain's assignments (uniform 1/E)
    assert layer.olmoe[code, 0] == 1.0  # OLMoE: k x share (k = 1; uniform k/E)
    assert layer.relative_load[code, 0] == 8.0  # DeepSeek-V3: c_e / c_bar within the domain (uniform 1)


def test_expert_independent_of_domain_gives_nmi_about_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    seq, pos = _sequences(8, 1000)
    experts = _random_topk(rng, 8000, 8, 2)
    tables = {"routing": routing_table(experts, sequence=seq, position=pos), "tags": _tags(["a", "b"] * 4)}
    write_trace(tmp_path / "t", tables, layers=layer_meta(1, 8, 2))
    (tag,) = moeprobe.open_trace(tmp_path / "t").specialization().tags
    layer = tag.layer(0)
    assert layer.mi.nmi == pytest.approx(0.0, abs=0.005)
    assert layer.share.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert layer.olmoe == pytest.approx(2 * layer.share) and layer.relative_load == pytest.approx(8 * layer.share)
    assert layer.relative_load.mean(axis=1) == pytest.approx([1.0, 1.0])


def test_vocabulary_specialization_and_its_random_baseline(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    token_id = rng.integers(0, 50, size=5000)
    determined = np.stack([token_id % 8, (token_id + 1) % 8], axis=1)  # first choice is a function of the id
    random = _random_topk(rng, 5000, 8, 2)
    tables = {
        "routing": [
            routing_table(determined, token_id=token_id, layer=0),
            routing_table(random, token_id=token_id, layer=1),
        ]
    }
    write_trace(tmp_path / "t", tables, layers=layer_meta(2, 8, 2))
    vocab = moeprobe.open_trace(tmp_path / "t").specialization(min_count=10).vocabulary
    fixed, uniform = vocab.layers
    assert fixed.value == 1.0 and fixed.token_ids == 50 and fixed.token_ids_below == 0
    # about 100 occurrences per id: random routing's top expert takes ~ 0.19 of them; the measured value and
    # the baseline computed from the same counts agree
    assert uniform.random == pytest.approx(fixed.random)
    assert 0.15 < uniform.random < 0.25
    assert uniform.value == pytest.approx(uniform.random, abs=0.02)
    assert moeprobe.open_trace(tmp_path / "t").specialization(min_count=10_000).vocabulary.layers[0].token_ids == 0


def test_coactivation_known_matrix(tmp_path: Path) -> None:
    experts = np.array([[0, 1], [0, 1], [0, 1], [0, 2]])
    write_trace(tmp_path / "t", {"routing": routing_table(experts)}, layers=layer_meta(1, 4, 2))
    (co,) = moeprobe.open_trace(tmp_path / "t").specialization().coactivation
    assert co.matrix[0, 1] == 0.75 and co.matrix[0, 2] == 0.25  # N(0 and j) / N(0), N(0) = 4
    assert co.matrix[1, 0] == 1.0 and co.matrix[2, 0] == 1.0 and co.matrix[3].sum() == 0
    assert co.random == pytest.approx(1 / 3)  # (k - 1) / (E - 1)
    assert {(i, j) for i, j, _ in co.top_pairs(2)} == {(1, 0), (2, 0)}


def test_sample_keeps_whole_sequences_within_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    seq, pos = _sequences(40, 50)  # 40 sequences of 50 tokens, k=2: 100 decisions each, 4000 in all
    routing = routing_table(_random_topk(rng, 2000, 8, 2), sequence=seq, position=pos)
    write_trace(tmp_path / "t", {"routing": routing}, layers=layer_meta(1, 8, 2))
    trace = moeprobe.open_trace(tmp_path / "t")
    sample = sample_routing(trace.context(Filters()), 1000)
    assert sample.decisions <= 1000 and sample.sequences == sample.decisions // 100
    assert sample.fraction == pytest.approx(sample.decisions / 4000)
    rows = trace.sql(f"SELECT sequence, count(*) AS n FROM {sample.table} GROUP BY sequence").to_pylist()
    assert {r["n"] for r in rows} == {100}  # whole sequences only
    assert sample_routing(trace.context(Filters()), 1000).predicate == sample.predicate  # deterministic
    full = sample_routing(trace.context(Filters()), 0)
    assert (full.fraction, full.decisions, full.sequences) == (1.0, 4000, 40)
    (rep,) = trace.specialization(sample_budget=1000).repetition
    assert rep.pairs == sample.sequences * 49


def test_count_tables_read_the_copied_sample_only_when_it_holds_the_same_sequences(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    seq, pos = _sequences(8, 50)
    tables = {
        "routing": routing_table(_random_topk(rng, 400, 8, 2), sequence=seq, position=pos, token_id=rng.integers(0, 20, 400)),
        "tags": _tags(["code", "math"] * 4),
    }
    write_trace(tmp_path / "t", tables, layers=layer_meta(1, 8, 2))
    trace = moeprobe.open_trace(tmp_path / "t")
    ctx = trace.context()
    everything, copied = sample_routing(ctx, 0, materialize=False), sample_routing(ctx, 0)
    assert everything.reading(copied).table == copied.table  # same sequences: the copy
    part = sample_routing(ctx, 200)
    assert part.predicate != "true" and everything.reading(part).table == everything.table  # others: the trace
    # the count tables come out the same either way: with the copy (both budgets hold everything) and without
    reused = trace.specialization(count_budget=0, sample_budget=0, min_count=2)
    decoded = trace.specialization(count_budget=0, sample_budget=200, min_count=2)
    assert reused.counts_sample.fraction == decoded.counts_sample.fraction == 1.0 and decoded.sample.fraction < 1
    np.testing.assert_array_equal(reused.tags[0].layer(0).counts, decoded.tags[0].layer(0).counts)
    assert reused.vocabulary == decoded.vocabulary
