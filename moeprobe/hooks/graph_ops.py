"""The graph-safe capture as operations inside the model's own graph (``torch.library`` custom ops).

Python hooks do not run in a CUDA graph replay, and hooks with host side effects break ``torch.compile``. These
ops do only device work: each writes rows into a preallocated ring buffer at a cursor that lives on the device,
and counts on the device what did not fit. ``torch.compile(fullgraph=True)`` traces them as opaque ops (their
fake implementations say they return nothing and mutate their buffers); a captured CUDA graph replays them
with the same buffers, whose addresses never change.

Eagerly (not inside a graph being traced) the wrappers call the implementations directly: the same kernels,
without the dispatcher's per-call cost (about 50x that of a small kernel on CPU). In a traced graph they are the
ops.

Every op is branch-free on the host: no ``.item()``, no host-side condition on a device value, no allocation
that depends on a device value. Rows that do not fit go to one extra "trash" row past the ring's capacity.

The state vector (int64, on the device) is shared by the ops of one probe; its slots are named below.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# Slots of the state vector.
STEP = 0  # id of the step in flight (starts at -1; record_step adds 1)
KEEP = 1  # 1 when the step in flight is sampled (its tokens and routing go to the rings), else 0
STEP_CURSOR = 2  # rows written to the step ring since the last drain (may pass its capacity)
TOKEN_CURSOR = 3
ROUTING_CURSOR = 4
STEP_TOKENS = 5  # tokens of the step in flight (batch x seq_len): routing of another size cannot use its mask
COUNTS_BASE = 6  # first step of the counts window (set by the drain)
COUNTS_LOST = 7  # layer calls whose step fell outside the counts window (window too small for the drain period)
MASK_MISMATCH = 8  # counted layer calls whose token count differed from the step's (counted without the mask)
COUNTS_OFFSET = 9  # flat offset of the step's slot in the counts buffer (the trash slot when outside the window)
STEP_PADDED = 10  # 1 when the step in flight has padding tokens
COUNTS_IDS_CHANGED = 11  # host counts mode: noted router calls whose indices were written in place before counted
STATE_SIZE = 12

# Buffers in host memory can be read without a sync, so on CPU the implementations take a shorter path (Python
# integers for cursors and flags, slices instead of masked scatters): the same rows, the same counts, far fewer
# kernel launches. The unit tests run both paths on the same inputs; this switch forces the device path.
FORCE_DEVICE_PATH = False


def _host(state: Tensor) -> bool:
    return state.is_cpu and not FORCE_DEVICE_PATH


def _view(t: Tensor) -> np.ndarray:
    """The numpy view of a host buffer (same memory), made once per buffer and kept on it: the buffers are
    allocated once and never resized, and each ``Tensor.numpy()`` call costs about as much as the counting."""
    view = getattr(t, "_moeprobe_view", None)
    if view is None:
        view = t.numpy()
        t._moeprobe_view = view  # type: ignore[attr-defined]
    return view


_ONES: list[Tensor] = []
_ONES_BY_LENGTH: dict[Any, Tensor] = {}  # views of _ONES[0] by length or shape: a decode loop asks for the same few


def _ones(n: int) -> Tensor:
    """n int32 ones on the host (a view of one buffer grown as needed): the counts' source without an allocation,
    and without a slicing op when the length was asked for before."""
    view = _ONES_BY_LENGTH.get(n)
    if view is not None:
        return view
    if not _ONES or _ONES[0].shape[0] < n:
        _ONES[:] = [torch.ones(max(n, 1 << 12), dtype=torch.int32)]
        _ONES_BY_LENGTH.clear()
    if len(_ONES_BY_LENGTH) >= 256:  # prefill lengths vary: a bounded cache
        _ONES_BY_LENGTH.clear()
    view = _ONES_BY_LENGTH[n] = _ONES[0][:n]
    return view


def _write_host(ring: Tensor, s: np.ndarray, cursor_slot: int, rows: np.ndarray) -> None:
    """Host path: ``s`` is the state vector's numpy view (same memory), ``rows`` a numpy array."""
    n = rows.shape[0]
    cursor = int(s[cursor_slot])
    fit = max(0, min(n, ring.shape[0] - 1 - cursor))
    if fit:
        _view(ring)[cursor : cursor + fit] = rows[:fit]
    s[cursor_slot] = cursor + n

STEP_COLUMNS = 5  # step, batch, seq_len, new sequences (0/1), real tokens
TOKEN_COLUMNS = 4  # step, token id, position, real (0/1)
ROUTING_FIXED = 3  # step, layer, token row; then k expert ids and k gate weights (float32 bits)


def _write(ring: Tensor, state: Tensor, cursor_slot: int, rows: Tensor, keep: Tensor) -> None:
    """Write ``rows`` at the ring's device-side cursor when ``keep``; rows past the capacity go to the trash row.

    The cursor advances past the capacity, so the drain knows how many rows were lost."""
    n = rows.shape[0]
    if n == 0:
        return
    capacity = ring.shape[0] - 1
    cursor = state[cursor_slot]
    pos = cursor + torch.arange(n, device=ring.device, dtype=torch.int64)
    ok = (pos < capacity) & keep
    ring.index_copy_(0, torch.where(ok, pos, capacity), rows.to(ring.dtype))
    state[cursor_slot] += n * keep.to(torch.int64)


def record_step_impl(
    step_ring: Tensor,
    token_ring: Tensor,
    valid_now: Tensor,
    state: Tensor,
    ids: Tensor,
    positions: Tensor,
    valid: Tensor,
    sample: int,
    counts_window: int,
    counts_row: int,
) -> None:
    """Start a step: advance the step id, decide whether it is sampled, and record the stack's token context.

    ``sample``: the step's tokens go to the ring for 1 step in ``sample`` (0: never, counts mode).
    ``ids``, ``positions`` and ``valid`` are (batch, seq_len): token ids (-1 when unknown), positions (-1 when
    unknown) and 1 for a real token, 0 for padding. The real-token mask also goes to ``valid_now``, where the
    layers of this step read it to leave padding out of the counts. ``counts_window`` steps of ``counts_row``
    (layers x experts) counts fit the counts buffer; the step's slot there is decided once, here.
    """
    batch, seq_len = ids.shape
    n = batch * seq_len
    if _host(state):
        _record_step_host(step_ring, token_ring, valid_now, state, ids, positions, valid, sample, counts_window, counts_row)
        return
    state[STEP] += 1
    step = state[STEP]
    keep = ((step % max(sample, 1)) == 0) & (sample > 0)  # sample 0: no token rows at all (counts mode)
    state[KEEP] = keep.to(torch.int64)
    state[STEP_TOKENS] = n
    real = valid.reshape(-1).to(torch.int64)
    state[STEP_PADDED] = (real == 0).any().to(torch.int64)
    starts = torch.where(valid.bool(), positions.to(torch.int64), torch.iinfo(torch.int64).max).amin(dim=1)
    new = (starts == 0).all()  # every row starts at position 0: new sequences (the writer's rule too)
    header = torch.stack(
        [step, torch.full_like(step, batch), torch.full_like(step, seq_len), new.to(torch.int64), real.sum()]
    ).reshape(1, STEP_COLUMNS)
    _write(step_ring, state, STEP_CURSOR, header, torch.ones((), dtype=torch.bool, device=state.device))
    if n <= valid_now.shape[0]:
        valid_now[:n].copy_(real.to(valid_now.dtype))
    if counts_window:
        slot = step - state[COUNTS_BASE]
        inside = (slot >= 0) & (slot < counts_window)
        state[COUNTS_LOST] += (~inside).to(torch.int64)
        state[COUNTS_OFFSET] = torch.where(inside, slot, counts_window) * counts_row
    rows = torch.stack([step.expand(n), ids.reshape(-1).to(torch.int64), positions.reshape(-1).to(torch.int64), real], dim=1)
    _write(token_ring, state, TOKEN_CURSOR, rows, keep)


def _record_step_host(
    step_ring: Tensor, token_ring: Tensor, valid_now: Tensor, state: Tensor, ids: Tensor, positions: Tensor, valid: Tensor,
    sample: int, counts_window: int, counts_row: int,
) -> None:
    # numpy views share the tensors' memory: element reads and writes without a tensor op each (about 50x
    # cheaper per access on CPU), the same results as the device path (tests/unit/test_graph_ops.py).
    batch, seq_len = ids.shape
    n = batch * seq_len
    s = _view(state)
    step = int(s[STEP]) + 1
    keep = sample > 0 and step % sample == 0
    real = valid.numpy().reshape(-1)
    real_count = int(real.sum())
    padded = real_count != n
    pos = positions.numpy()
    if not seq_len:
        new = False
    elif padded:
        new = bool((np.where(real.reshape(batch, seq_len) != 0, pos, np.iinfo(np.int64).max).min(axis=1) == 0).all())
    else:
        new = bool((pos.min(axis=1) == 0).all())
    s[STEP], s[KEEP], s[STEP_TOKENS], s[STEP_PADDED] = step, int(keep), n, int(padded)
    _write_host(step_ring, s, STEP_CURSOR, np.array([[step, batch, seq_len, int(new), real_count]], dtype=np.int32))
    if padded and n <= valid_now.shape[0]:
        _view(valid_now)[:n] = real
    if counts_window:
        _point_counts_at(s, step, counts_window, counts_row)
    if keep:
        rows = np.empty((n, TOKEN_COLUMNS), dtype=np.int64)
        rows[:, 0] = step
        rows[:, 1] = ids.numpy().reshape(-1)
        rows[:, 2] = pos.reshape(-1)
        rows[:, 3] = real
        _write_host(token_ring, s, TOKEN_CURSOR, rows.astype(np.int32))


def _point_counts_at(s: np.ndarray, step: int, counts_window: int, counts_row: int) -> None:
    """Host path: aim the counts offset at ``step``'s row in the window, or at the trash row (counted lost) when
    the step falls outside it."""
    slot = step - int(s[COUNTS_BASE])
    inside = 0 <= slot < counts_window
    if not inside:
        s[COUNTS_LOST] += 1
    s[COUNTS_OFFSET] = (slot if inside else counts_window) * counts_row


def record_plain_step_host(step_ring: Tensor, state: Tensor, batch: int, seq_len: int, new: bool, counts_window: int, counts_row: int) -> None:
    """record_step for counts mode on the host when the stack got no mask and no positions (every token real,
    positions from the cache length): the same state and step row, from Python integers, without building the
    position and mask tensors that only token rows and padding would need. Eager calls only."""
    _plain_step(_view(state), step_ring, batch, seq_len, new, 0, counts_window, counts_row)


def _plain_step(s: np.ndarray, step_ring: Tensor, batch: int, seq_len: int, new: bool, sample: int, counts_window: int, counts_row: int) -> tuple[int, bool]:
    """The state and step row of a plain step (every token real), shared by the two host paths below; returns
    the step and whether its tokens are kept (1 step in ``sample``; never with sample 0)."""
    n = batch * seq_len
    step = int(s[STEP]) + 1
    keep = sample > 0 and step % sample == 0
    s[STEP], s[KEEP], s[STEP_TOKENS], s[STEP_PADDED] = step, int(keep), n, 0
    cursor = int(s[STEP_CURSOR])
    ring = _view(step_ring)
    if cursor < ring.shape[0] - 1:
        ring[cursor] = (step, batch, seq_len, int(new), n)
    s[STEP_CURSOR] = cursor + 1
    if counts_window:
        _point_counts_at(s, step, counts_window, counts_row)
    return step, keep


def record_plain_tokens_host(
    step_ring: Tensor, token_ring: Tensor, state: Tensor, ids: Tensor, past: int, new: bool, sample: int, counts_window: int, counts_row: int,
    note_tokens: Any = None,
) -> None:
    """record_step on the host for a stack call without mask or positions whose positions are ``past + 0..seq_len-1``
    in every row (an int cache length, or no cache: past 0) and every token real: the same state, step row and
    token rows as record_step_impl given those positions and an all-real mask, written straight into the rings'
    views without building the position and mask tensors (graph capture's per-step cost). Eager calls only.

    ``note_tokens(row, fit, step, ids, past)``, when given, is called instead of writing the token rows that fit
    (graph capture hands them to the writer thread: host_rows); the cursor advances the same."""
    batch, seq_len = ids.shape
    n = batch * seq_len
    s = _view(state)
    step, keep = _plain_step(s, step_ring, batch, seq_len, new, sample, counts_window, counts_row)
    if keep and n:
        cursor = int(s[TOKEN_CURSOR])
        fit = max(0, min(n, token_ring.shape[0] - 1 - cursor))
        if fit:
            if note_tokens is not None:
                note_tokens(cursor, fit, step, ids, past)
            else:
                write_plain_tokens(_view(token_ring)[cursor : cursor + fit], step, ids, past)
        s[TOKEN_CURSOR] = cursor + n


def write_plain_tokens(rows: np.ndarray, step: int, ids: Tensor, past: int) -> None:
    """The first ``len(rows)`` token rows of a plain step (record_plain_tokens_host): step, token id, position
    ``past + 0..seq_len-1`` in every batch row, real."""
    batch, seq_len = ids.shape
    fit = len(rows)
    rows[:, 0] = step
    rows[:, 1] = ids.numpy().reshape(-1)[:fit]
    rows[:, 2] = np.tile(np.arange(past, past + seq_len, dtype=np.int32), batch)[:fit]
    rows[:, 3] = 1


def _rows(counts: Tensor) -> list[Tensor]:
    """``counts`` as a list of its (experts + 1) rows, slot-major then layer (row ``offset // width + layer``), made
    once per buffer and kept on it (like :func:`_view`): picking a row is then a list index, not a tensor op."""
    rows = getattr(counts, "_moeprobe_rows", None)
    if rows is None:
        rows = list(counts.view(-1, counts.shape[-1]).unbind(0))
        counts._moeprobe_rows = rows  # type: ignore[attr-defined]
    return rows


def _ones_shaped(shape: torch.Size) -> Tensor:
    """int32 ones of ``shape`` on the host: a view of the shared ones buffer, kept per shape."""
    view = _ONES_BY_LENGTH.get(shape)
    if view is None:
        n = 1
        for d in shape:
            n *= int(d)
        view = _ones(n).view(shape)
        if len(_ONES_BY_LENGTH) >= 256:
            _ONES_BY_LENGTH.clear()
        _ONES_BY_LENGTH[shape] = view
    return view


def count_host(rows: list[Tensor], s: np.ndarray, valid_now: Tensor, indices: Tensor, tokens: int, k: int, layer: int) -> None:
    """count_routing's host path: ``rows`` from :func:`_rows`, ``s`` the state's numpy view, ``indices`` the call's
    ``tokens`` x ``k`` expert ids (any shape whose last dimension is k, tokens > 0).

    Two torch ops (clamp, one accumulating index_put_ with ids of the indices' own shape), no numpy on the tensors:
    inside a decode loop (caches cold after the model's own work) each op costs a few microseconds, the torch ops
    the model also runs the least (a numpy bincount path cost 110 us per call, seven torch ops about 40)."""
    row = rows[int(s[COUNTS_OFFSET]) // rows[0].shape[0] + layer]  # the offset is slot x layers x width
    width = row.shape[0]  # experts + 1
    # Ids the layer does not have go to the last column: clamped to -1..experts, and index_put_ wraps -1 to the
    # last column (index_add_ would refuse it).
    ids = indices.clamp(-1, width - 1)
    mismatch = tokens > valid_now.shape[0] or int(s[STEP_TOKENS]) != tokens
    if mismatch:
        s[MASK_MISMATCH] += 1
    if not mismatch and s[STEP_PADDED]:
        row.index_put_((ids.reshape(-1),), valid_now[:tokens].repeat_interleave(k), accumulate=True)
    else:
        row.index_put_((ids,), _ones_shaped(ids.shape), accumulate=True)


RECORD_STEP = torch.library.custom_op("moeprobe::record_step", record_step_impl, mutates_args=("step_ring", "token_ring", "valid_now", "state"))


@RECORD_STEP.register_fake
def _record_step_fake(step_ring, token_ring, valid_now, state, ids, positions, valid, sample, counts_window, counts_row):  # type: ignore[no-untyped-def]
    return None


def record_routing_impl(ring: Tensor, state: Tensor, indices: Tensor, weights: Tensor, layer: int) -> None:
    """Record one MoE layer call's routing (indices and gate weights, (tokens, k)) if the step is sampled."""
    tokens, k = indices.shape
    if tokens == 0:
        return
    if _host(state):
        s = _view(state)
        if not s[KEEP]:
            return
        # _write_host's rule, written straight into the ring's view (no row array to build and copy): the rows
        # that fit, the cursor advanced by all of them.
        cursor = int(s[ROUTING_CURSOR])
        out = _view(ring)
        fit = max(0, min(tokens, out.shape[0] - 1 - cursor))
        if fit:
            rows = out[cursor : cursor + fit]
            rows[:, 0] = s[STEP]
            rows[:, 1] = layer
            rows[:, 2] = np.arange(fit, dtype=np.int32)
            rows[:, ROUTING_FIXED : ROUTING_FIXED + k] = indices.numpy()[:fit]
            w = weights.detach()
            if w.dtype != torch.float32:
                w = w.to(torch.float32)
            rows[:, ROUTING_FIXED + k :] = w.numpy().reshape(tokens, k)[:fit].view(np.int32)
        s[ROUTING_CURSOR] = cursor + tokens
        return
    step = state[STEP]
    bits = weights.reshape(tokens, k).to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    device_rows = torch.cat(
        [
            step.expand(tokens, 1),
            torch.full((tokens, 1), layer, dtype=torch.int64, device=indices.device),
            torch.arange(tokens, device=indices.device, dtype=torch.int64).reshape(tokens, 1),
            indices.reshape(tokens, k).to(torch.int64),
            bits,
        ],
        dim=1,
    )
    _write(ring, state, ROUTING_CURSOR, device_rows, state[KEEP].bool())


RECORD_ROUTING = torch.library.custom_op("moeprobe::record_routing", record_routing_impl, mutates_args=("ring", "state"))


@RECORD_ROUTING.register_fake
def _record_routing_fake(ring, state, indices, weights, layer):  # type: ignore[no-untyped-def]
    return None


def count_routing_impl(counts: Tensor, state: Tensor, valid_now: Tensor, indices: Tensor, layer: int) -> None:
    """Add one MoE layer call's choices to the step's slot of ``counts`` (window + 1, layers, experts + 1), int32,
    padding left out. An expert id outside ``0..experts-1`` is counted in the last column (reported by the drain,
    never added to another expert or layer). A step outside the window lands in the trash slot (counted by
    record_step in COUNTS_LOST), never in another step's counts."""
    tokens, k = indices.shape
    if tokens == 0:
        return
    width = counts.shape[2]  # experts + 1
    if _host(state):
        count_host(_rows(counts), _view(state), valid_now, indices, tokens, k, layer)
        return
    offset = state[COUNTS_OFFSET] + layer * width
    ids = indices.reshape(-1).to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < width - 1), ids, width - 1)
    flat = ids + offset
    if tokens <= valid_now.shape[0]:
        same = state[STEP_TOKENS] == tokens
        state[MASK_MISMATCH] += (~same).to(torch.int64)
        # A layer that sees another number of tokens than the stack (counted) is counted without the mask.
        real = torch.where(same, valid_now[:tokens], 1)
        counts.view(-1).index_add_(0, flat, real.repeat_interleave(k))
    else:
        state[MASK_MISMATCH] += 1
        counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


COUNT_ROUTING = torch.library.custom_op("moeprobe::count_routing", count_routing_impl, mutates_args=("counts", "state"))


@COUNT_ROUTING.register_fake
def _count_routing_fake(counts, state, valid_now, indices, layer):  # type: ignore[no-untyped-def]
    return None
