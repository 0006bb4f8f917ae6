"""The writer ranks each token's k choices by gate weight exactly as a stable argsort of the negated weights
would: equal weights (+0.0 and -0.0 included) keep the router's order, NaN weights go last, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.hooks.pipeline import _rank_by_weight

SPECIAL = np.array([0.0, -0.0, 0.5, 0.25, 1.0, -1.0, np.inf, -np.inf, np.nan, 3e-39, -2.5], np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_ranking_equals_a_stable_argsort(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, tokens = int(rng.integers(2, 9)), int(rng.integers(1, 70_000))
    # Ties and special values, plain random weights, or mostly ranked rows with some out of order.
    if seed % 3 == 0:
        weights = rng.choice(SPECIAL, size=(tokens, k))
    else:
        weights = rng.standard_normal((tokens, k)).astype(np.float32)
        if seed % 3 == 2:
            weights = np.ascontiguousarray(np.sort(weights, axis=1)[:, ::-1])
            weights[::5] = rng.standard_normal((len(weights[::5]), k))
    experts = rng.integers(0, 256 if seed % 2 else 65536, (tokens, k)).astype(np.uint8 if seed % 2 else np.uint16)
    order = np.argsort(-weights, axis=1, kind="stable")
    expected_w = np.take_along_axis(weights, order, axis=1)
    expected_e = np.take_along_axis(experts, order, axis=1)
    w, e = np.ascontiguousarray(weights.T), np.ascontiguousarray(experts.T)
    _rank_by_weight(e, w)
    assert np.array_equal(e.T, expected_e)
    assert np.array_equal(w.T.view(np.uint32), expected_w.view(np.uint32))
