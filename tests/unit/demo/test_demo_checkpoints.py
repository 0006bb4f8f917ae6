"""The shipped demo checkpoints load, their cards are consistent, and greedy decoding is unchanged.

Also the demo's small pure pieces (tokenizer, prompts, the metrics on hand-made traces with known answers).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import moeprobe
from moeprobe.demo import CHECKPOINT_NAMES, checkpoints, metrics
from moeprobe.demo.corpus import DOMAINS
from moeprobe.demo.prompts import PROMPT_BYTES, PROMPTS_PER_DOMAIN, load_prompts
from moeprobe.demo.tokenizer import BOS_ID, decode, encode
from tests.support import layer_meta, routing_table, write_trace

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

CARD_KEYS = {
    "config",
    "steps",
    "tokens_seen",
    "seed",
    "command",
    "final_train_loss",
    "train_loss_per_domain",
    "held_out_loss_per_domain",
    "unigram_byte_entropy_per_domain",
    "routing",
    "routing_random_weights",
    "expected_continuation",
}


@pytest.fixture(scope="module", params=CHECKPOINT_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_both_checkpoints_ship() -> None:
    assert checkpoints.available() == list(CHECKPOINT_NAMES)


def test_card_is_complete_and_consistent(name: str) -> None:
    from moeprobe.demo.model import CONFIG

    card = checkpoints.load_card(name)
    assert card.keys() >= CARD_KEYS
    assert card["name"] == name
    assert card["config"] == CONFIG
    assert 1_000_000 <= card["parameters"] <= 3_000_000
    size = Path(str(checkpoints.weights_file(name))).stat().st_size
    assert size == card["weights_bytes"] <= 8 * 1024 * 1024
    training = card["training"]
    assert card["tokens_seen"] == card["steps"] * training["batch_sequences"] * training["seq_len"]
    assert f"--checkpoint {name}" in card["command"]
    for table in ("train_loss_per_domain", "held_out_loss_per_domain", "unigram_byte_entropy_per_domain"):
        assert set(card[table]) == set(DOMAINS)
    # The first bar: the model has learned more than byte frequencies in every domain.
    for domain in DOMAINS:
        assert card["held_out_loss_per_domain"][domain] < card["unigram_byte_entropy_per_domain"][domain]


def test_checkpoint_loads_with_its_bias(name: str) -> None:
    model = checkpoints.load_checkpoint(name)
    from moeprobe.demo.model import moe_routers

    biases = [r.e_score_correction_bias for r in moe_routers(model)]
    assert len(biases) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    moved = any(bool(b.abs().sum() > 0) for b in biases)
    # Only the balanced run updates the correction bias; a lost buffer would load as zeros.
    assert moved == (name == "balanced")


def test_greedy_continuation_matches_card(name: str) -> None:
    from moeprobe.demo.run import generate

    card = checkpoints.load_card(name)
    expected = card["expected_continuation"]
    prompt = load_prompts()[expected["prompt_index"]]
    model = checkpoints.load_checkpoint(name)
    assert generate(model, [prompt], expected["max_new_tokens"])[0] == expected["text"]


def test_tokenizer_round_trips_bytes() -> None:
    text = "def f(x):\n    return {'a': 1.5}  # ok"
    ids = encode(text)
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert decode(ids) == text


def test_prompts_are_tagged_equal_length_and_held_out() -> None:
    from moeprobe.demo.corpus import build_corpus

    prompts = load_prompts()
    assert [p.domain for p in prompts] == [d for d in DOMAINS for _ in range(PROMPTS_PER_DOMAIN)]
    assert {len(p.text.encode()) for p in prompts} == {PROMPT_BYTES}
    corpus = build_corpus()
    for p in prompts:
        window = p.text.encode()
        assert window in corpus[p.domain].held_out
        assert window not in corpus[p.domain].train


def test_normalised_mi_known_answers() -> None:
    # The demo uses the report's one definition (stats.mutual_information): the bias term counts the experts
    # and domains that occur, and NMI is clipped to [0, 1].
    from moeprobe.analysis import stats

    # Experts that identify the domain exactly: I = H(domain), so NMI = 1 minus the bias term (2 experts occur).
    perfect = np.zeros((4, 2))
    perfect[0, 0] = perfect[1, 1] = 500
    bias = (2 - 1) * (2 - 1) / (2 * 1000) / math.log(2)
    assert metrics.normalised_mi(perfect) == pytest.approx(1 - bias)
    assert metrics.normalised_mi(perfect) == stats.mutual_information(perfect.T).nmi
    # Independent expert and domain: I = 0; the bias-corrected value would be negative and is clipped to 0.
    independent = np.full((4, 2), 125.0)
    assert metrics.normalised_mi(independent) == 0.0


def test_metrics_on_hand_made_trace(tmp_path: Path) -> None:
    # Layer 0: sequence 0 (domain a) always picks experts 0,1 with expert 0 weighted higher; sequence 1
    # (domain b) picks 2,3 with expert 3 higher. Loads: 4 experts x 10 tokens each, perfectly balanced.
    experts = np.array([[1, 0]] * 10 + [[2, 3]] * 10)
    weights = np.array([[0.4, 0.6]] * 10 + [[0.3, 0.7]] * 10)
    table = routing_table(experts, weights=weights, sequence=np.repeat([0, 1], 10))
    tags = {"sequence": [0, 1], "key": ["domain", "domain"], "value": ["a", "b"]}
    import pyarrow as pa

    from moeprobe.traces.schema import TABLES

    write_trace(
        tmp_path / "t",
        {"routing": table, "tags": pa.table(tags, schema=TABLES["tags"])},
        layers=layer_meta(1, num_experts=4, top_k=2),
    )
    with moeprobe.open_trace(tmp_path / "t") as trace:
        assert metrics.max_vio_global(trace) == {0: pytest.approx(0.0)}
        counts, domains = metrics.expert_domain_counts(trace)
    assert domains == ["a", "b"]
    # first choice is the highest weight (expert 0 and expert 3), not the row with k = 0
    assert counts[0][:, 0].tolist() == [10, 0, 0, 0]
    assert counts[0][:, 1].tolist() == [0, 0, 0, 10]
