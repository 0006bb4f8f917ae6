"""Capacity and token dropping on hand-made batches."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate.capacity import apply_capacity, drop_summary, expert_capacity, gshard_top2


def test_expert_capacity() -> None:
    assert expert_capacity(8, 4, 1.0) == 2
    assert expert_capacity(8, 4, 1.25) == 3  # 2.5 rounds up
    assert expert_capacity(100, 10, 1.1) == 11  # not 12 from 11.000000000000002
    assert expert_capacity(8, 4, 1.0, top_k=2) == 4
    assert expert_capacity(3, 8, 0.5) == 1


def test_top1_drops_by_position() -> None:
    # 8 tokens, 4 experts, cf 1.0 -> 2 slots each. Expert 0 is chosen by tokens 0 1 2 4 6: the last three
    # (positions 2, 4, 6) are past capacity.
    experts = np.array([[0], [0], [0], [1], [0], [2], [0], [3]])
    dropped = apply_capacity(experts, num_experts=4, groups=np.zeros(8), capacity_factor=1.0,
                             positions=np.arange(8))
    assert np.flatnonzero(dropped[:, 0]).tolist() == [2, 4, 6]


def test_position_order_is_position_then_sequence_not_row() -> None:
    # Two sequences interleaved differently from row order: positions decide, then sequence.
    experts = np.zeros((4, 1), dtype=np.int64)
    positions = np.array([1, 0, 1, 0])
    sequences = np.array([0, 0, 1, 1])
    dropped = apply_capacity(experts, num_experts=2, groups=np.zeros(4), slots=3, positions=positions,
                             sequences=sequences)
    assert np.flatnonzero(dropped[:, 0]).tolist() == [2]  # (pos 1, seq 1) is served last


def test_top1_drops_lowest_score() -> None:
    experts = np.array([[0], [0], [0], [1]])
    weights = np.array([[0.9], [0.2], [0.5], [0.7]], dtype=np.float32)
    dropped = apply_capacity(experts, num_experts=2, groups=np.zeros(4), capacity_factor=1.0, order="score",
                             weights=weights)
    # capacity = ceil(4 / 2 * 1.0) = 2: expert 0 keeps its two best (0.9, 0.5), drops 0.2.
    assert np.flatnonzero(dropped[:, 0]).tolist() == [1]


def test_topk_serves_first_choices_before_second_choices() -> None:
    # 4 tokens, top-2 over 2 experts, cf 0.5 -> capacity ceil(4 * 2 / 2 * 0.5) = 2 per expert.
    # Expert 0: first choice of tokens 0, 1, 2; second choice of token 3 -> tokens 2 (first, late) and
    # 3 (second choice) are dropped. Expert 1: first choice of 3, second of 0 1 2 -> 1 and 2 dropped.
    experts = np.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    dropped = apply_capacity(experts, num_experts=2, groups=np.zeros(4), capacity_factor=0.5,
                             positions=np.arange(4))
    assert dropped.tolist() == [[False, False], [False, True], [True, True], [False, True]]


def test_each_batch_has_its_own_capacity_and_missing_choices_are_ignored() -> None:
    experts = np.array([[0], [0], [0], [0], [-1]])
    groups = np.array([0, 0, 1, 1, 1])
    dropped = apply_capacity(experts, num_experts=2, groups=groups, slots=1, positions=np.arange(5))
    assert np.flatnonzero(dropped[:, 0]).tolist() == [1, 3]


def test_drop_summary_by_expert_and_position() -> None:
    experts = np.array([[0, 1], [0, 2], [0, 1]])
    dropped = np.array([[False, False], [True, False], [True, True]])
    summary = drop_summary(experts, dropped, np.array([0, 1, 2]), 3)
    assert summary.routed_by_expert.tolist() == [3, 2, 1]
    assert summary.dropped_by_expert.tolist() == [2, 1, 0]
    assert summary.routed_by_position.tolist() == [2, 2, 2]
    assert summary.dropped_by_position.tolist() == [0, 1, 2]


def test_gshard_second_choice_random_test_and_capacity() -> None:
    # g2 = 0 is never kept; g2 = 0.5 always is (2 * 0.5 = 1 > U(0, 1)).
    experts = np.array([[0, 1], [1, 0], [0, 1]])
    weights = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 1.0]], dtype=np.float32)
    result = gshard_top2(experts, weights, num_experts=2, groups=np.zeros(3), capacity_factor=10.0,
                         rng=np.random.default_rng(0))
    assert result.weights[1].tolist() == pytest.approx([0.5, 0.5])
    assert result.dropped[0].tolist() == [False, True] and result.dropped[1].tolist() == [False, False]
    # Capacity 1 per expert: first choices (tokens 0 and 2 on expert 0, token 1 on expert 1) come first.
    tight = gshard_top2(experts, weights, num_experts=2, groups=np.zeros(3), capacity_factor=1 / 3,
                        rng=np.random.default_rng(0))
    assert tight.dropped[:, 0].tolist() == [False, False, True]
    assert tight.dropped[1, 1]  # second choice found expert 0 full


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        apply_capacity(np.zeros((1, 1)), num_experts=1, groups=np.zeros(1))
    with pytest.raises(ValueError, match="weights"):
        apply_capacity(np.zeros((1, 1)), num_experts=1, groups=np.zeros(1), slots=1, order="score")
