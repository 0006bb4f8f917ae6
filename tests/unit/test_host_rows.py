"""Graph capture's noted rows (host_rows) equal the host paths that write them in place: routing rows as
record_routing_impl writes them, a plain step's token rows as record_plain_tokens_host does; the same cursors, the
same rows where the drain's copy holds them, overflow counted the same; tensors written in place before the
writer read them are reported."""

from __future__ import annotations

import numpy as np
import torch

from moeprobe.hooks import graph_ops as ops
from moeprobe.hooks.host_rows import RoutingNotes, fill, fill_tokens

K, COLUMNS = 2, ops.ROUTING_FIXED + 2 * 2


def _state(step: int, keep: bool) -> torch.Tensor:
    s = torch.zeros(ops.STATE_SIZE, dtype=torch.int64)
    s[ops.STEP], s[ops.KEEP] = step, int(keep)
    return s


def _calls() -> list[tuple[int, int, bool, torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for step in range(5):
        for layer in range(2):
            tokens = 6 if step == 0 else 3
            indices = torch.randint(0, 8, (tokens, K), generator=g)
            weights = None if (step, layer) == (2, 1) else torch.rand(tokens, K, generator=g, dtype=torch.float64 if layer else torch.float32)
            out.append((step, layer, step != 3, indices, weights))  # step 3 not sampled
    return out


def test_notes_filled_by_the_writer_equal_the_rows_written_in_place() -> None:
    capacity = 20  # the calls need 6 x 2 + 3 x 2 x 3 = 30 rows: the ring overflows
    want = torch.zeros((capacity + 1, COLUMNS), dtype=torch.int32)
    live = torch.zeros((capacity + 1, COLUMNS), dtype=torch.int32)
    notes = RoutingNotes(live, K)
    s_want, s_live = _state(0, True), _state(0, True)
    for step, layer, keep, indices, weights in _calls():
        for s in (s_want, s_live):
            s[ops.STEP], s[ops.KEEP] = step, int(keep)
        w = weights if weights is not None else torch.full(indices.shape, float("nan"))
        ops.record_routing_impl(want, s_want, indices, w, layer)
        notes.note(s_live.numpy(), layer, indices, weights)
    assert int(s_live[ops.ROUTING_CURSOR]) == int(s_want[ops.ROUTING_CURSOR]) > capacity
    assert int(live.abs().sum()) == 0  # nothing written on the model's thread
    copy = torch.cat([live[:capacity], live[-1:]])  # the drain's copy: the used rows and the trash row's place
    routing, tokens = notes.take()
    assert fill(routing, copy.numpy(), K) == 0 and tokens == [] and notes.take() == ([], [])
    assert torch.equal(copy[:capacity], want[:capacity])


def test_tensors_changed_in_place_before_the_fill_are_reported() -> None:
    ring = torch.zeros((9, COLUMNS), dtype=torch.int32)
    notes = RoutingNotes(ring, K)
    s = _state(0, True).numpy()
    indices, weights = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    notes.note(s, 0, indices, weights)
    notes.note(s, 1, torch.tensor([[5, 6], [7, 0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    weights.mul_(2)  # the model rescales the gate weights in place
    assert fill(notes.take()[0], ring.numpy(), K) == 1
    assert np.array_equal(ring.numpy()[:2, ops.ROUTING_FIXED + K :].view(np.float32), [[1.0, 1.0], [0.5, 1.5]])


def test_noted_token_rows_equal_the_rows_written_in_place() -> None:
    capacity = 10  # a prefill of 2 x 4 and decode steps of 2: the ring overflows at the second decode step
    steps = [(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), 0), (torch.tensor([[13], [14]]), 4), (torch.tensor([[15], [16]]), 5)]
    rings = []
    for noted in (False, True):
        state = _state(-1, False)
        step_ring = torch.zeros((9, ops.STEP_COLUMNS), dtype=torch.int32)
        token_ring = torch.zeros((capacity + 1, ops.TOKEN_COLUMNS), dtype=torch.int32)
        notes = RoutingNotes(torch.zeros((4, COLUMNS), dtype=torch.int32), K)
        for ids, past in steps:
            ops.record_plain_tokens_host(step_ring, token_ring, state, ids, past, past == 0, 1, 0, 0, notes.note_tokens if noted else None)
        if noted:
            assert int(token_ring.abs().sum()) == 0  # nothing written on the model's thread
            steps[1][0][0, 0] = 99  # the caller reuses a step's ids buffer before the drain
            assert fill_tokens(notes.take()[1], token_ring.numpy()) == 1
        rings.append((state, token_ring))
    (want_state, want), (got_state, got) = rings
    assert got_state.tolist() == want_state.tolist() and int(got_state[ops.TOKEN_CURSOR]) == 12 > capacity
    assert torch.equal(got[:8], want[:8]) and got[8, 1] == 99 and torch.equal(got[9], want[9])
    assert got[:capacity, 2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 4]  # positions past + 0..seq_len-1 per row
