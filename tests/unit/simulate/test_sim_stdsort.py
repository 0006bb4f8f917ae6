"""The tie order of torch's CPU sort, which EPLB's output depends on."""

from __future__ import annotations

import numpy as np
import pytest

from moeprobe.simulate.stdsort import argsort_desc_like_torch

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("size", [3, 16, 17, 30, 72, 288, 1000])
@pytest.mark.parametrize("distinct", [1, 2, 5, 1000])
def test_matches_torch_sort_descending(size: int, distinct: int) -> None:
    rng = np.random.default_rng(size * 7 + distinct)
    values = rng.integers(0, distinct, (12, size)).astype(np.float32)
    expected = torch.from_numpy(values).sort(-1, descending=True).indices.numpy()
    assert np.array_equal(argsort_desc_like_torch(values), expected)


def test_is_a_correct_descending_sort() -> None:
    values = np.random.default_rng(0).integers(0, 4, (20, 50)).astype(np.float32)
    order = argsort_desc_like_torch(values)
    ranked = np.take_along_axis(values, order, axis=1)
    assert (np.diff(ranked, axis=1) <= 0).all()
    assert (np.sort(order, axis=1) == np.arange(50)).all()


def _median_of_three_killer(n: int) -> np.ndarray:
    """Musser's sequence that defeats median-of-three pivots, driving introsort into its heapsort branch."""
    half = n // 2
    values = np.zeros(n)
    for i in range(1, half + 1):
        if i % 2:
            values[i - 1], values[i] = i, half + i
        values[half + i - 1] = 2 * i
    return values


@pytest.mark.parametrize("size", [40, 68, 131, 250, 397])
def test_matches_torch_where_introsort_falls_back_to_heapsort(size: int) -> None:
    rows = np.stack([_median_of_three_killer(size), -_median_of_three_killer(size),
                     np.tile([0.0, 1.0], size // 2 + 1)[:size]]).astype(np.float32)
    expected = torch.from_numpy(rows).sort(-1, descending=True).indices.numpy()
    assert np.array_equal(argsort_desc_like_torch(rows), expected)
