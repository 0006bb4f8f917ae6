"""The capture ops' two implementations agree: the host path (CPU buffers, Python integers) and the device path
(cursors and flags as device tensors, masked scatters; what runs on a GPU and in CUDA graphs), forced on CPU here.
Same rows in the rings, same counts, same state, over random steps with padding, sampling, a ring that overflows
and a counts window that is passed."""

from __future__ import annotations

import pytest
import torch

from moeprobe.hooks import graph_ops as ops

LAYERS, EXPERTS, K = 3, 6, 2


def _buffers(ring_tokens: int, window: int) -> dict[str, torch.Tensor]:
    state = torch.zeros(ops.STATE_SIZE, dtype=torch.int64)
    state[ops.STEP] = -1
    return {
        "state": state,
        "steps": torch.zeros((64 + 1, ops.STEP_COLUMNS), dtype=torch.int32),
        "tokens": torch.zeros((ring_tokens + 1, ops.TOKEN_COLUMNS), dtype=torch.int32),
        "routing": torch.zeros((ring_tokens * LAYERS + 1, ops.ROUTING_FIXED + 2 * K), dtype=torch.int32),
        "valid": torch.zeros(64, dtype=torch.int32),
        "counts": torch.zeros((window + 1, LAYERS, EXPERTS + 1), dtype=torch.int32),
    }


def _run(device_path: bool, seed: int, ring_tokens: int, window: int, sample: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = _buffers(ring_tokens, window)
    previous = ops.FORCE_DEVICE_PATH
    ops.FORCE_DEVICE_PATH = device_path
    try:
        past = 0
        for step in range(9):
            batch, seq_len = (3, 5) if step == 0 else (3, 1)
            ids = torch.randint(3, 90, (batch, seq_len), generator=g)
            valid = torch.ones(batch, seq_len, dtype=torch.int64)
            valid[1, : 2 if step == 0 else 0] = 0  # a left-padded row
            positions = (torch.cumsum(valid, 1) - 1).clamp(min=0) + past if step else (torch.cumsum(valid, 1) - 1).clamp(min=0)
            past += seq_len
            ops.record_step_impl(b["steps"], b["tokens"], b["valid"], b["state"], ids, positions, valid, sample, window, LAYERS * (EXPERTS + 1))
            for layer in range(LAYERS):
                tokens = batch * seq_len if not (step == 4 and layer == 1) else batch * seq_len + 1  # one mismatch
                indices = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(tokens)])
                if step == 6 and layer == 2:
                    # ids the layer does not have, just and far out of range: the last column
                    indices[0, 0], indices[1, 0], indices[2, 0] = -1, EXPERTS + 7, -4
                weights = torch.rand(tokens, K, generator=g)
                ops.record_routing_impl(b["routing"], b["state"], indices, weights, layer)
                ops.count_routing_impl(b["counts"], b["state"], b["valid"], indices, layer)
    finally:
        ops.FORCE_DEVICE_PATH = previous
    return b


def _used(ring: torch.Tensor, cursor: int) -> torch.Tensor:
    return ring[: min(cursor, ring.shape[0] - 1)]


@pytest.mark.parametrize(("ring_tokens", "window", "sample"), [(64, 16, 1), (64, 16, 3), (8, 4, 2), (64, 16, 0)])
def test_host_and_device_paths_agree(ring_tokens: int, window: int, sample: int) -> None:
    host, device = _run(False, 1, ring_tokens, window, sample), _run(True, 1, ring_tokens, window, sample)
    assert torch.equal(host["state"][: ops.STEP_PADDED], device["state"][: ops.STEP_PADDED])
    s = host["state"]
    assert torch.equal(_used(host["steps"], int(s[ops.STEP_CURSOR])), _used(device["steps"], int(s[ops.STEP_CURSOR])))
    assert torch.equal(_used(host["tokens"], int(s[ops.TOKEN_CURSOR])), _used(device["tokens"], int(s[ops.TOKEN_CURSOR])))
    assert torch.equal(_used(host["routing"], int(s[ops.ROUTING_CURSOR])), _used(device["routing"], int(s[ops.ROUTING_CURSOR])))
    assert torch.equal(host["counts"][:-1], device["counts"][:-1])  # the trash slot may differ, nothing else
    assert int(s[ops.MASK_MISMATCH]) == 1
    if window == 16:  # step 6 inside the window: the three bad ids counted apart, in layer 2's last column only
        assert int(host["counts"][:-1, :, -1].sum()) == int(host["counts"][6, 2, -1]) == 3
    if window == 4:
        assert int(s[ops.COUNTS_LOST]) == 9 - 4  # steps past the window, never mixed into another step's slot
        assert int(s[ops.TOKEN_CURSOR]) > ring_tokens  # the ring overflowed: the cursor says by how much
    kept = {int(r[0]) for r in _used(host["tokens"], int(s[ops.TOKEN_CURSOR]))}
    assert kept <= {step for step in range(9) if sample and step % sample == 0}
    if sample == 0:  # counts mode: no token or routing rows, every step's counts
        assert int(s[ops.TOKEN_CURSOR]) == int(s[ops.ROUTING_CURSOR]) == 0 and int(host["counts"].sum()) > 0


def test_host_count_takes_indices_of_any_leading_shape() -> None:
    """Counts mode's wrapper hands the router's indices to count_host as they are ((batch, seq, k) here, no reshape):
    the same counts as the device path on the flattened (tokens, k), bad ids in the last column."""
    results = []
    for device_path in (False, True):
        b = _buffers(64, 16)
        previous = ops.FORCE_DEVICE_PATH
        ops.FORCE_DEVICE_PATH = device_path
        try:
            ids = torch.randint(3, 90, (2, 3))
            ops.record_step_impl(b["steps"], b["tokens"], b["valid"], b["state"], ids, torch.arange(3).expand(2, 3), torch.ones(2, 3, dtype=torch.int64), 0, 16, LAYERS * (EXPERTS + 1))
            indices = torch.randint(0, EXPERTS, (2, 3, K), generator=torch.Generator().manual_seed(5))
            indices[1, 2, 1] = EXPERTS + 2
            if device_path:
                ops.count_routing_impl(b["counts"], b["state"], b["valid"], indices.reshape(-1, K), 1)
            else:
                ops.count_host(ops._rows(b["counts"]), ops._view(b["state"]), b["valid"], indices, 6, K, 1)
        finally:
            ops.FORCE_DEVICE_PATH = previous
        results.append(b["counts"])
    assert torch.equal(results[0], results[1])
    assert int(results[0][0, 1].sum()) == 2 * 3 * K and int(results[0][0, 1, -1]) == 1 and int(results[0].sum()) == 2 * 3 * K


@pytest.mark.parametrize(("ring_tokens", "sample"), [(64, 1), (64, 3), (8, 1)])
def test_plain_token_steps_equal_record_step(ring_tokens: int, sample: int) -> None:
    """Graph capture's host path for a stack call without mask or positions (record_plain_tokens_host) writes the
    state, step rows and token rows record_step writes given positions past + 0..seq_len-1 and an all-real mask:
    a prefill, decode steps, sampling, and a token ring that overflows (cursor past the capacity, rows cut)."""
    steps = [(3, 5, 0)] + [(3, 1, 5 + i) for i in range(6)] + [(2, 4, 0)]  # (batch, seq_len, past): a new prompt last
    out = []
    for plain in (False, True):
        b = _buffers(ring_tokens, 16)
        for batch, seq_len, past in steps:
            ids = torch.randint(3, 90, (batch, seq_len), generator=torch.Generator().manual_seed(batch * 100 + past))
            if plain:
                ops.record_plain_tokens_host(b["steps"], b["tokens"], b["state"], ids, past, past == 0, sample, 16, LAYERS * (EXPERTS + 1))
            else:
                positions = (past + torch.arange(seq_len)).expand(batch, seq_len)
                valid = torch.ones(batch, seq_len, dtype=torch.int64)
                ops.record_step_impl(b["steps"], b["tokens"], b["valid"], b["state"], ids, positions, valid, sample, 16, LAYERS * (EXPERTS + 1))
        out.append(b)
    want, got = out
    assert got["state"].tolist() == want["state"].tolist()
    s = want["state"]
    assert torch.equal(_used(got["steps"], int(s[ops.STEP_CURSOR])), _used(want["steps"], int(s[ops.STEP_CURSOR])))
    assert torch.equal(_used(got["tokens"], int(s[ops.TOKEN_CURSOR])), _used(want["tokens"], int(s[ops.TOKEN_CURSOR])))
    assert [int(r[3]) for r in _used(want["steps"], int(s[ops.STEP_CURSOR]))] == [1, 0, 0, 0, 0, 0, 0, 1]  # new sequences: past 0 only
    if ring_tokens == 8:
        assert int(s[ops.TOKEN_CURSOR]) > ring_tokens
