"""The order in which torch's CPU ``sort(descending=True)`` leaves equal values.

torch sorts (value, index) pairs with libstdc++'s ``std::sort`` (introsort: median-of-three quicksort down
to runs of 16, heapsort past a depth limit, then insertion sort), comparing values only. That is not a
stable sort: for more than 16 items, equal values can come out in any index order, and deepseek-ai/EPLB
relies on this order to decide which replica lands on which GPU. To reproduce the reference's output
exactly, ``argsort_desc_like_torch`` replays the same algorithm step for step. Rows without equal values
take numpy's fast path: any correct sort orders them the same way.
"""

from __future__ import annotations

import numpy as np

_THRESHOLD = 16  # libstdc++ _S_threshold


def _introsort(keys: list[float], perm: list[int]) -> None:
    """libstdc++ std::sort over ``perm`` (positions into ``keys``), descending by key."""
    n = len(perm)
    if n < 2:
        return

    def before(a: int, b: int) -> bool:  # comp(a, b): a's value sorts strictly before b's
        return keys[a] > keys[b]

    def adjust_heap(first: int, hole: int, length: int, value: int) -> None:
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if before(perm[first + child], perm[first + child - 1]):
                child -= 1
            perm[first + hole] = perm[first + child]
            hole = child
        if (length & 1) == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            perm[first + hole] = perm[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and before(perm[first + parent], value):
            perm[first + hole] = perm[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        perm[first + hole] = value

    def heap_sort(first: int, last: int) -> None:  # std::__partial_sort(first, last, last)
        length = last - first
        if length >= 2:  # make_heap
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, perm[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:  # sort_heap
            last -= 1
            value = perm[last]
            perm[last] = perm[first]
            adjust_heap(first, 0, last - first, value)

    def move_median_to_first(result: int, a: int, b: int, c: int) -> None:
        pa, pb, pc = perm[a], perm[b], perm[c]
        if before(pa, pb):
            pick = b if before(pb, pc) else (c if before(pa, pc) else a)
        elif before(pa, pc):
            pick = a
        elif before(pb, pc):
            pick = c
        else:
            pick = b
        perm[result], perm[pick] = perm[pick], perm[result]

    def partition_pivot(first: int, last: int) -> int:
        mid = first + (last - first) // 2
        move_median_to_first(first, first + 1, mid, last - 1)
        pivot = perm[first]
        lo, hi = first + 1, last
        while True:
            while before(perm[lo], pivot):
                lo += 1
            hi -= 1
            while before(pivot, perm[hi]):
                hi -= 1
            if not lo < hi:
                return lo
            perm[lo], perm[hi] = perm[hi], perm[lo]
            lo += 1

    def introsort_loop(first: int, last: int, depth: int) -> None:
        while last - first > _THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            cut = partition_pivot(first, last)
            introsort_loop(cut, last, depth)
            last = cut

    def linear_insert(last: int) -> None:  # __unguarded_linear_insert
        value = perm[last]
        prev = last - 1
        while before(value, perm[prev]):
            perm[last] = perm[prev]
            last = prev
            prev -= 1
        perm[last] = value

    def insertion_sort(first: int, last: int) -> None:
        for i in range(first + 1, last):
            if before(perm[i], perm[first]):
                value = perm[i]
                perm[first + 1 : i + 1] = perm[first:i]
                perm[first] = value
            else:
                linear_insert(i)

    introsort_loop(0, n, 2 * (n.bit_length() - 1))
    if n > _THRESHOLD:
        insertion_sort(0, _THRESHOLD)
        for i in range(_THRESHOLD, n):
            linear_insert(i)
    else:
        insertion_sort(0, n)


def argsort_desc_like_torch(values: np.ndarray) -> np.ndarray:
    """Row-wise indices that sort ``values`` (X, n) descending, ties ordered as torch's CPU sort orders them."""
    values = np.asarray(values)
    order = np.argsort(-values, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    tied = (ranked[:, 1:] == ranked[:, :-1]).any(axis=1) if values.shape[1] > _THRESHOLD else np.zeros(len(values), bool)
    for row in np.flatnonzero(tied):
        keys = values[row].tolist()
        perm = list(range(len(keys)))
        _introsort(keys, perm)
        order[row] = perm
    return order
