"""Counts mode's noted path (host_counts) writes what the per-call host path writes: the same state, step rows and
counts, whether the model's thread flushes the notes into the live buffers or a drain hands them to the writer to
write into its copies; ids written in place after their router returned are reported, never silently counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeprobe.hooks import graph_ops as ops
from moeprobe.hooks.host_counts import DeferredCounts, apply

LAYERS, EXPERTS, K, ROOM = 3, 6, 2, 64
ROW = LAYERS * (EXPERTS + 1)
# Slots both paths must agree on (the rest: cursors of rings counts mode does not use, or the sampled flag).
SLOTS = [ops.STEP, ops.STEP_CURSOR, ops.STEP_TOKENS, ops.COUNTS_BASE, ops.COUNTS_LOST, ops.MASK_MISMATCH, ops.COUNTS_OFFSET, ops.STEP_PADDED]


def _buffers(window: int, step_rows: int = 64) -> dict[str, torch.Tensor]:
    state = torch.zeros(ops.STATE_SIZE, dtype=torch.int64)
    state[ops.STEP] = -1
    return {
        "state": state,
        "steps": torch.zeros((step_rows + 1, ops.STEP_COLUMNS), dtype=torch.int32),
        "valid": torch.zeros(ROOM, dtype=torch.int32),
        "counts": torch.zeros((window + 1, LAYERS, EXPERTS + 1), dtype=torch.int32),
    }


def _script(seed: int) -> list[tuple[str, object]]:
    """A run as the wrappers see it: ('step', (batch, seq_len, new)) and ('call', (layer, indices)); a prefill,
    decode steps, a layer routing another number of tokens, ids the layer does not have, a call before any step,
    calls of (batch, seq, k) shape, and an empty call."""
    g = torch.Generator().manual_seed(seed)
    events: list[tuple[str, object]] = [("call", (1, torch.randint(0, EXPERTS, (2, K), generator=g)))]
    for step in range(11):
        batch, seq_len = (3, 5) if step == 0 else (3, 1)
        events.append(("step", (batch, seq_len, step == 0)))
        for layer in range(LAYERS):
            tokens = batch * seq_len + (1 if (step, layer) == (4, 1) else 0)
            indices = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(tokens)])
            if (step, layer) == (6, 2):
                indices[0, 0], indices[1, 0], indices[2, 1] = -1, EXPERTS + 7, -4
            if step == 8:
                indices = indices.reshape(batch, seq_len, K)
            events.append(("call", (layer, indices)))
        if step == 9:
            events.append(("call", (0, torch.zeros((0, K), dtype=torch.int64))))
    return events


def _per_call(events: list[tuple[str, object]], window: int) -> dict[str, torch.Tensor]:
    b = _buffers(window)
    for kind, what in events:
        if kind == "step":
            batch, seq_len, new = what  # type: ignore[misc]
            ops.record_plain_step_host(b["steps"], b["state"], batch, seq_len, new, window, ROW)
        else:
            layer, indices = what  # type: ignore[misc]
            if indices.numel():
                ops.count_host(ops._rows(b["counts"]), ops._view(b["state"]), b["valid"], indices, indices.numel() // K, K, layer)
    return b


def _noted(events: list[tuple[str, object]], window: int, *, flush_every: int, max_tokens: int = 1 << 14) -> dict[str, torch.Tensor]:
    b = _buffers(window)
    deferred = DeferredCounts(b["state"], b["steps"], b["counts"], b["valid"], K, max_tokens=max_tokens)
    for n, (kind, what) in enumerate(events, 1):
        if kind == "step":
            deferred.note_step(*what)  # type: ignore[misc]
        else:
            deferred.note_call(*what)  # type: ignore[misc]
        if n % flush_every == 0:
            deferred.flush()
    deferred.flush()
    return b


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a["state"][SLOTS].tolist() == b["state"][SLOTS].tolist()
    used = min(int(a["state"][ops.STEP_CURSOR]), a["steps"].shape[0] - 1)
    assert torch.equal(a["steps"][:used], b["steps"][:used])
    assert torch.equal(a["counts"][:-1], b["counts"][:-1])  # the trash slot may differ, nothing else


@pytest.mark.parametrize("window", [16, 4])
@pytest.mark.parametrize("flush_every", [1, 5, 1000])
def test_noted_steps_and_calls_equal_the_per_call_path(window: int, flush_every: int) -> None:
    events = _script(1)
    want = _per_call(events, window)
    got = _noted(events, window, flush_every=flush_every)
    _same(got, want)
    s = got["state"]
    # The call before any step (the state says 0 tokens) and step 4's layer 1.
    assert int(s[ops.MASK_MISMATCH]) == 2 and int(s[ops.COUNTS_IDS_CHANGED]) == 0
    if window == 16:  # the bad ids of step 6 in layer 2's last column, nowhere else
        assert int(got["counts"][:-1, :, -1].sum()) == int(got["counts"][6, 2, -1]) == 3
        assert int(got["counts"].sum()) == int(want["counts"].sum()) > 0
    else:
        assert int(s[ops.COUNTS_LOST]) == 11 - 4


@pytest.mark.parametrize("max_tokens", [1, 7, 16])
def test_a_flush_forced_by_the_noted_tokens_keeps_the_step_of_later_calls(max_tokens: int) -> None:
    events = _script(2)
    _same(_noted(events, 16, flush_every=1000, max_tokens=max_tokens), _per_call(events, 16))


def test_the_writer_writes_a_drains_notes_into_its_copies_as_the_live_buffers_would_be() -> None:
    """The drain's split: the model's thread takes the notes and moves the step id on (advance); the writer
    writes them into copies of the buffers made before that (apply). Copies = per-call path; the live state then
    describes the last step exactly as the per-call path's does."""
    events = _script(3)
    want = _per_call(events, 16)
    live = _buffers(16)
    deferred = DeferredCounts(live["state"], live["steps"], live["counts"], live["valid"], K)
    for kind, what in events:
        (deferred.note_step if kind == "step" else deferred.note_call)(*what)  # type: ignore[operator]
    copies = {name: t.clone() for name, t in live.items()}
    noted = deferred.take()
    assert noted is not None and deferred.take() is None
    deferred.advance(noted)
    apply(noted, copies["state"].numpy(), copies["steps"].numpy(), copies["counts"])
    _same(copies, want)
    assert live["state"][[ops.STEP, ops.STEP_TOKENS, ops.COUNTS_OFFSET, ops.STEP_PADDED]].tolist() == want["state"][
        [ops.STEP, ops.STEP_TOKENS, ops.COUNTS_OFFSET, ops.STEP_PADDED]
    ].tolist()
    assert int(live["counts"].sum()) == 0 and int(live["state"][ops.STEP_CURSOR]) == 0  # nothing written live


def test_a_step_ring_too_small_counts_its_overflow_like_the_per_call_path() -> None:
    events = _script(4)
    want = _buffers(16, step_rows=5)
    for kind, what in events:
        if kind == "step":
            ops.record_plain_step_host(want["steps"], want["state"], *what, 16, ROW)  # type: ignore[misc]
    got = _buffers(16, step_rows=5)
    deferred = DeferredCounts(got["state"], got["steps"], got["counts"], got["valid"], K)
    for kind, what in events:
        if kind == "step":
            deferred.note_step(*what)  # type: ignore[misc]
    deferred.flush()
    assert int(got["state"][ops.STEP_CURSOR]) == 11 > 5
    assert torch.equal(got["steps"][:5], want["steps"][:5])


def test_ids_written_in_place_before_the_count_are_reported() -> None:
    b = _buffers(16)
    deferred = DeferredCounts(b["state"], b["steps"], b["counts"], b["valid"], K)
    deferred.note_step(2, 1, False)
    kept = torch.tensor([[0, 1], [2, 3]])
    deferred.note_call(0, kept)
    deferred.note_call(1, torch.tensor([[0, 1], [2, 3]]))
    kept[0, 0] = 5  # the model reuses the router's output buffer before the drain
    deferred.flush()
    assert int(b["state"][ops.COUNTS_IDS_CHANGED]) == 1
    assert np.array_equal(b["counts"][0, 0, :EXPERTS].numpy(), [0, 1, 1, 1, 0, 1])  # counted as it is now


def test_inference_tensors_are_counted_without_a_version_check() -> None:
    b = _buffers(16)
    deferred = DeferredCounts(b["state"], b["steps"], b["counts"], b["valid"], K)
    deferred.note_step(1, 1, True)
    with torch.inference_mode():
        indices = torch.tensor([[4, 5]])
    deferred.note_call(2, indices)
    deferred.flush()
    assert b["counts"][0, 2, 4] == b["counts"][0, 2, 5] == 1 and int(b["state"][ops.COUNTS_IDS_CHANGED]) == 0


def test_noted_tokens_past_the_bound_are_counted_at_the_next_step_not_kept_for_the_drain() -> None:
    b = _buffers(16)
    deferred = DeferredCounts(b["state"], b["steps"], b["counts"], b["valid"], K, max_tokens=10)
    deferred.note_step(3, 5, True)  # a prefill of 15 tokens: past the bound
    deferred.note_call(0, torch.zeros((15, K), dtype=torch.int64))
    assert len(deferred.calls) == 1 and int(b["counts"].sum()) == 0
    deferred.note_step(3, 1, False)  # the next step writes the prefill first
    assert deferred.calls == [] and len(deferred.steps) == 1 and deferred.tokens == 3
    assert int(b["state"][ops.STEP]) == 0 and int(b["counts"][0, 0, 0]) == 15 * K
